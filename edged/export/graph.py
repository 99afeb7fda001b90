"""Reading and editing the exported causal-LM graph: LM head, embedding, last-token logits.

Everything here works on graphs loaded without their external data (`load_graph`), so a 3 GB
fp32 export is inspected and edited without reading its weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edged.engine.manifest import Quantization

from .options import ExportError

log = logging.getLogger(__name__)

LOGITS = "logits"
LOGITS_KEEP = "logits_to_keep"
_INT64_MAX = 2**63 - 1
# Ops between the LM head and `logits`: exporters add Identity/Cast, dynamic int8 quantization
# adds Cast and a Mul by the dequantization scale after MatMulInteger.
_PASS_THROUGH = {"Identity", "Cast", "Mul"}
_HEAD_OPS = {"MatMul", "MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul"}
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}


def load_graph(path: Path) -> onnx.ModelProto:
    """The graph with external tensors left on disk (their dims are still known)."""
    return onnx.load(str(path), load_external_data=False)


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def _initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in graph.initializer}


def lm_head_node(model: onnx.ModelProto) -> onnx.NodeProto:
    """The node that projects hidden states to the vocabulary (MatMul; MatMulNBits or
    MatMulInteger once quantized), found by walking back from the `logits` output."""
    graph = model.graph
    if LOGITS not in {o.name for o in graph.output}:
        names = ", ".join(o.name for o in graph.output)
        raise ExportError(f"graph has no {LOGITS!r} output (outputs: {names})")
    producers = _producers(graph)
    constants = set(_initializers(graph))
    node = producers.get(LOGITS)
    while node is not None and node.op_type in _PASS_THROUGH:
        data = [i for i in node.input if i and i not in constants]
        node = producers.get(data[0]) if data else None
    if node is None or node.op_type not in _HEAD_OPS:
        found = node.op_type if node is not None else "a graph input or constant"
        raise ExportError(f"{LOGITS!r} is produced by {found}, expected the LM head MatMul")
    return node


def embedding_node(model: onnx.ModelProto) -> onnx.NodeProto:
    """The token-embedding lookup: the Gather (or GatherBlockQuantized) fed by `input_ids`."""
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == "input_ids":
            return node
        if node.op_type == "GatherBlockQuantized" and node.input[1] == "input_ids":
            return node
    raise ExportError("graph has no embedding Gather reading 'input_ids'")


def vocab_and_hidden(model: onnx.ModelProto) -> tuple[int, int]:
    """(vocab, hidden) from the fp32 embedding initializer, before quantization."""
    node = embedding_node(model)
    init = _initializers(model.graph).get(node.input[0])
    if init is None or len(init.dims) != 2:
        raise ExportError(f"embedding {node.name!r} has no 2-D constant table")
    return int(init.dims[0]), int(init.dims[1])


def logits_mode(model: onnx.ModelProto) -> str:
    """`last_n` when the graph has the `logits_to_keep` input (the last N positions, 1 unless
    fed), `last` when its logits have a static 1 on the sequence axis, else `all`."""
    if any(i.name == LOGITS_KEEP for i in model.graph.input):
        return "last_n"
    for out in model.graph.output:
        if out.name == LOGITS:
            dims = out.type.tensor_type.shape.dim
            if len(dims) == 3 and dims[1].HasField("dim_value") and dims[1].dim_value == 1:
                return "last"
    return "all"


def slice_to_last_token(model: onnx.ModelProto) -> None:
    """Make the LM head project only the last position, in place.

    A prefill of n tokens otherwise multiplies n hidden states by the (hidden x vocab) head only
    to keep the last row: for Qwen3 that is n x 151936 wasted dot products per prompt token.
    """
    graph = model.graph
    head = lm_head_node(model)
    if head.op_type != "MatMul":
        raise ExportError(f"LM head {head.name!r} is {head.op_type}; slice before quantizing")
    hidden = head.input[0]
    sliced = f"{hidden}/last_position"
    consts = {
        f"{sliced}/starts": [-1],
        f"{sliced}/ends": [_INT64_MAX],
        f"{sliced}/axes": [1],
    }
    graph.initializer.extend(
        numpy_helper.from_array(_int64(values), name) for name, values in consts.items()
    )
    slice_node = helper.make_node(
        "Slice", [hidden, *consts], [sliced], name=f"{head.name or 'lm_head'}/last_position"
    )
    head.input[0] = sliced
    # Keep the node list topologically sorted: the slice goes right before the head.
    index = list(graph.node).index(head)
    graph.node.insert(index, slice_node)
    for out in graph.output:
        if out.name == LOGITS:
            dim = out.type.tensor_type.shape.dim[1]
            dim.Clear()
            dim.dim_value = 1
    log.info("LM head %s now projects the last position only", head.name)


def _int64(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def float_vocab_matrices(model: onnx.ModelProto, vocab: int, hidden: int) -> list[str]:
    """Float initializers shaped like an embedding or an LM head: none may survive int4."""
    shapes = {(vocab, hidden), (hidden, vocab)}
    return [
        init.name
        for init in model.graph.initializer
        if init.data_type in _FLOAT_TYPES and tuple(init.dims) in shapes
    ]


def describe_quantization(model: onnx.ModelProto) -> Quantization:
    """What the graph really holds, read from its ops, so the manifest cannot claim more."""
    ops = {node.op_type for node in model.graph.node}
    head = lm_head_node(model)
    embed = embedding_node(model)
    embedding = "GatherBlockQuantized" if embed.op_type == "GatherBlockQuantized" else "fp32"
    if "MatMulNBits" in ops:
        nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        attrs = {a.name: helper.get_attribute_value(a) for a in nbits[0].attribute}
        bits = attrs.get("bits", 4)
        head_bits = (
            next((a.i for a in head.attribute if a.name == "bits"), 4)
            if head.op_type == "MatMulNBits"
            else None
        )
        return Quantization(
            method=f"int{bits}",
            block_size=int(attrs["block_size"]),
            # MatMulNBits inputs: A, B, scales, [zero_points]; no zero points means symmetric.
            symmetric=all(len(n.input) < 4 or not n.input[3] for n in nbits),
            accuracy_level=int(attrs["accuracy_level"]) if "accuracy_level" in attrs else None,
            lm_head=head.op_type == "MatMulNBits",
            embedding=embedding,
            lm_head_bits=head_bits if head_bits not in (None, bits) else None,
        )
    if ops & {"DynamicQuantizeMatMul", "MatMulInteger"}:
        # onnxruntime's dynamic QInt8 weights are symmetric (its WeightSymmetric default).
        return Quantization(
            method="int8",
            symmetric=True,
            lm_head=head.op_type in {"MatMulInteger", "DynamicQuantizeMatMul"},
            embedding=embedding,
        )
    return Quantization(method="fp32", lm_head=False, embedding=embedding)
