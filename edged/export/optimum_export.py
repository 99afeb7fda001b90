"""The fp32 ONNX export of a causal LM with optimum, in the layout the engine runs.

Graph inputs: input_ids, attention_mask, position_ids, past_key_values.N.key/value;
outputs: logits, present.N.key/value (past grows by the new tokens each call).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from .options import ExportError

log = logging.getLogger(__name__)

TASK = "text-generation-with-past"
_HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]


def resolve_source(source: str) -> Path:
    """A local checkpoint directory for `source`: itself, or its hub snapshot."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ExportError(f"source = {source!r} is a directory without config.json")
        return path
    if path.exists() or source.startswith((".", "/", "~")):
        raise ExportError(f"source = {source!r} is not a checkpoint directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=_HUB_FILES))
    except Exception as exc:
        raise ExportError(
            f"source = {source!r} is neither a directory nor a reachable hub model "
            f"(with HF_HUB_OFFLINE=1 only models already in the hub cache work): {exc}"
        ) from exc


def export_fp32(checkpoint: Path, workdir: Path) -> Path:
    """Export `checkpoint` to `workdir`/model.onnx (+ its external data) in fp32 on the CPU."""
    from optimum.exporters.onnx import main_export
    from torch.jit import TracerWarning

    workdir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # The tracer warns about every Python-side shape check in transformers' masking code;
        # the greedy parity check afterwards is what proves the trace generalises.
        warnings.simplefilter("ignore", TracerWarning)
        # optimum 2.1 drives torch's TorchScript exporter, which torch deprecates; it is still
        # the exporter optimum's Qwen3 config is written for.
        warnings.filterwarnings(
            "ignore", "You are using the legacy TorchScript", DeprecationWarning
        )
        warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
        # From an index op in transformers' mask code, "wrong for negative indices": the
        # greedy parity check with transformers is what shows the traced graph is right.
        warnings.filterwarnings("ignore", "Exporting aten::index operator", UserWarning)
        main_export(
            str(checkpoint),
            output=workdir,
            task=TASK,
            device="cpu",
            dtype="fp32",
            # Post-processing would dedupe the tied LM head into Transpose -> MatMul of the
            # embedding table, and the int4 quantizer skips a MatMul whose weight is not a
            # constant: the largest matrix would stay fp32.
            no_post_process=True,
            # optimum's own check compares on random inputs with a loose tolerance; ours
            # (greedy parity with transformers) is stricter and runs when verify is on.
            do_validation=False,
            local_files_only=True,
            library_name="transformers",
        )
    graph = workdir / "model.onnx"
    if not graph.is_file():
        found = ", ".join(sorted(p.name for p in workdir.iterdir()))
        raise ExportError(f"optimum wrote no model.onnx in {workdir} (found: {found})")
    check_layout(graph)
    return graph


def check_layout(graph: Path) -> None:
    """Fail early if the graph's inputs or outputs are not the layout the engine drives."""
    from .graph import load_graph

    model = load_graph(graph)
    inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    for name in ("input_ids", "attention_mask", "position_ids", "past_key_values.0.key"):
        if name not in inputs:
            raise ExportError(f"{graph}: input {name!r} missing (inputs: {sorted(inputs)})")
    for name in ("logits", "present.0.key"):
        if name not in outputs:
            raise ExportError(f"{graph}: output {name!r} missing (outputs: {sorted(outputs)})")
    pasts = sorted(n for n in inputs if n.startswith("past_key_values."))
    presents = {n.replace("present", "past_key_values") for n in outputs if n.startswith("present")}
    if set(pasts) != presents:
        raise ExportError(f"{graph}: past inputs {pasts} do not pair with present outputs")
