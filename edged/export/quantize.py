"""Weight quantization of the fp32 export with onnxruntime's own quantizers.

int4 follows what runs fastest on ARM CPUs with onnxruntime: MatMulNBits for every MatMul with a
constant weight, the LM head included, and GatherBlockQuantized for the token embedding, so no
(vocab x hidden) fp32 table is left (for Qwen3-0.6B that table alone is 622 MB in fp32).
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from . import graph as g
from .options import INT4_ALGORITHMS, ExportError

log = logging.getLogger(__name__)

INT4_BLOCK_SIZE = 32
"""Quantization block along K; 32 keeps Qwen3's agreement with fp32 high at a 12.5 % scale cost."""
INT4_ACCURACY_LEVEL = 4
"""MatMulNBits computes with int8 activations (fastest on ARM dot-product and x86 VNNI)."""
EXTERNAL_DATA_ABOVE = 1 << 30
"""Graphs whose weights exceed this are saved as model.onnx + model.onnx.data: protobuf cannot
hold a message over 2 GiB, and the margin covers the graph itself."""
DATA_SUFFIX = ".data"


def save_model(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Save `model` as `path` (and `path` + .data when large); return the files written."""
    weight_bytes = sum(_tensor_bytes(t) for t in model.graph.initializer)
    if weight_bytes <= EXTERNAL_DATA_ABOVE:
        onnx.save_model(model, str(path))
        return [path]
    data = path.with_name(path.name + DATA_SUFFIX)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )
    return [path, data]


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    for entry in tensor.external_data:
        if entry.key == "length":
            return int(entry.value)
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count * 4


def _rtn_config(ops: tuple[str, ...], symmetric: bool = True) -> object:
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig

    return DefaultWeightOnlyQuantConfig(
        block_size=INT4_BLOCK_SIZE,
        is_symmetric=symmetric,
        accuracy_level=INT4_ACCURACY_LEVEL,
        quant_format=QuantFormat.QOperator,
        op_types_to_quantize=ops,
        # MatMul weights (K, N) in blocks along K; the embedding (vocab, hidden) along hidden,
        # so one token's row dequantizes from its own blocks.
        quant_axes=(("MatMul", 0), ("Gather", 1)),
        bits=4,
    )


def _matmul_config(algorithm: str, calibration: object | None) -> object:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        GPTQWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        KQuantWeightOnlyQuantConfig,
    )

    if algorithm == "hqq":
        return HQQWeightOnlyQuantConfig(
            block_size=INT4_BLOCK_SIZE, op_types_to_quantize=("MatMul",)
        )
    if algorithm == "kquant":
        return KQuantWeightOnlyQuantConfig(op_types_to_quantize=("MatMul",))
    if algorithm == "gptq":
        if calibration is None:
            raise ExportError("int4 algorithm gptq needs calibration data (--calibration FILE)")
        return GPTQWeightOnlyQuantConfig(
            calibration_data_reader=calibration,  # type: ignore[arg-type]
            block_size=INT4_BLOCK_SIZE,
            op_types_to_quantize=("MatMul",),
        )
    return _rtn_config(("MatMul",), symmetric=algorithm == "rtn")


def quantize_int4(
    src: Path, dst: Path, algorithm: str = "rtn", calibration: object | None = None
) -> list[Path]:
    """MatMulNBits int4 (block 32, accuracy level 4) incl. LM head, and GatherBlockQuantized
    (symmetric round-to-nearest) for the embedding. `algorithm`: see INT4_ALGORITHMS;
    `calibration`: an onnxruntime CalibrationDataReader, for gptq."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if algorithm not in INT4_ALGORITHMS:
        raise ExportError(
            f"int4 algorithm {algorithm!r} is not one of {', '.join(INT4_ALGORITHMS)}"
        )
    # It logs every node it skips at INFO: thousands of lines for a real model.
    logging.getLogger(MatMulNBitsQuantizer.__module__).setLevel(logging.WARNING)
    model = onnx.load(str(src))
    vocab, hidden = g.vocab_and_hidden(model)
    passes = [_rtn_config(("MatMul", "Gather"))]
    if algorithm != "rtn":  # the MatMuls their own way, then the embedding as always
        passes = [_matmul_config(algorithm, calibration), _rtn_config(("Gather",))]
    for config in passes:
        quantizer = MatMulNBitsQuantizer(
            model,
            block_size=INT4_BLOCK_SIZE,
            is_symmetric=algorithm in ("rtn", "gptq"),
            accuracy_level=INT4_ACCURACY_LEVEL,
            algo_config=config,  # type: ignore[arg-type]
        )
        quantizer.process()
        model = quantizer.model.model
    _int8_compute(model)
    check_int4(model, vocab, hidden)
    return save_model(model, dst)


def _int8_compute(model: onnx.ModelProto) -> None:
    """Every MatMulNBits computes with int8 activations (accuracy level 4): HQQ's quantizer
    leaves the attribute out, and the default, fp32 compute, decodes several times slower."""
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and not any(
            a.name == "accuracy_level" for a in node.attribute
        ):
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", INT4_ACCURACY_LEVEL))


def check_int4(model: onnx.ModelProto, vocab: int, hidden: int) -> None:
    """Fail unless every weight MatMul, the LM head and the embedding were quantized."""
    constants = {init.name for init in model.graph.initializer}
    left = [
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in constants
    ]
    if left:
        raise ExportError(f"int4: {len(left)} MatMul with constant weights left fp32: {left[:5]}")
    head = g.lm_head_node(model)
    if head.op_type != "MatMulNBits":
        raise ExportError(f"int4: LM head {head.name!r} is {head.op_type}, expected MatMulNBits")
    embed = g.embedding_node(model)
    if embed.op_type != "GatherBlockQuantized":
        raise ExportError(
            f"int4: embedding {embed.name!r} is {embed.op_type}, expected GatherBlockQuantized"
        )
    floats = g.float_vocab_matrices(model, vocab, hidden)
    if floats:
        raise ExportError(
            f"int4: float initializers shaped ({vocab}, {hidden}) or ({hidden}, {vocab}) "
            f"remain: {floats}"
        )


def quantize_int8(src: Path, dst: Path) -> list[Path]:
    """onnxruntime dynamic quantization: QInt8 weights for MatMul (LM head included)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    large = sum(_tensor_bytes(t) for t in model.graph.initializer) > EXTERNAL_DATA_ABOVE
    quantize_dynamic(
        model,
        str(dst),
        op_types_to_quantize=["MatMul"],
        weight_type=QuantType.QInt8,
        per_channel=False,
        use_external_data_format=large,
        # Only weights: quantizing attention's activation x activation MatMuls costs accuracy.
        extra_options={"MatMulConstBOnly": True},
    )
    # quantize_dynamic names its data file `<graph>.data`, our convention too.
    return [dst, dst.with_name(dst.name + DATA_SUFFIX)] if large else [dst]
