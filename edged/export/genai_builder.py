"""Export with onnxruntime-genai's model builder: the GroupQueryAttention graph.

The builder makes a leaner graph than optimum (fused QKV MatMulNBits, GroupQueryAttention with
rotary inside the op and no `position_ids`, one int4 matrix shared by the embedding and the LM
head), and the engine decodes measurably faster on it. The builder needs transformers 5, which
optimum-onnx (transformers < 4.58) cannot live beside, so it runs in its own virtualenv outside
the repository, `~/.cache/edged/venv-genai` (or `$EDGED_GENAI_VENV`), which
`ensure_genai_venv()` creates once.

What `build()` returns is a directory with `model.onnx`, `model.onnx.data` and
`genai_config.json` only; the caller (`edged.export.export_model`) adds the tokenizer and
configs of the source checkpoint and writes the manifest with exporter `ort-genai`.

The graph, for the record (onnxruntime-genai 0.18.0, `-p int4 -e cpu`):

    input_ids               int64  [batch, sequence_length]
    attention_mask          int64  [batch, total_sequence_length]   (past + new, all ones)
    past_key_values.N.key   float  [batch, kv_heads, past_sequence_length, head_dim]  (and .value)
    logits                  float  [batch, sequence_length | 1, vocab]
    present.N.key           float  [batch, kv_heads, total_sequence_length, head_dim] (and .value)

and genai_config.json says `search.past_present_share_buffer: true`: the runtime allocates one
zeroed [1, kv_heads, max_length, head_dim] buffer per past input and binds it as both the past
input and the matching present output, so GroupQueryAttention appends in place. max_length is
`search.max_length`, which the builder sets to the context length.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import platform
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import venv
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .options import ExportError

log = logging.getLogger(__name__)

VENV_ENV = "EDGED_GENAI_VENV"
DEFAULT_VENV = Path("~/.cache/edged/venv-genai")
GENAI_VERSION = "0.18.0"
_FALLBACK_ORT_VERSION = "1.32.0"
_STAMP = "edged-venv.json"
_BUILDER_MODULE = "onnxruntime_genai.models.builder"

INT4_BLOCK_SIZE = 32
INT4_ACCURACY_LEVEL = 4
"""MatMulNBits accuracy level 4: activations quantized to int8, the fast path on ARM and x86."""

GRAPH_FILES = ("model.onnx", "model.onnx.data", "genai_config.json")
"""What `build()` leaves in its output directory; the builder's own tokenizer files are dropped
because transformers 5 rewrites them and the source checkpoint's originals are authoritative."""

_PRECISIONS = {"int4": "int4", "fp32": "fp32"}
_NOISE = re.compile(r"^(\d{4}-\d\d-\d\d |Saving |\d+it \[|Loading |Reading )")

HEARTBEAT_S = 10.0
"""A slow pip step says it is still running at least this often: pip is silent for a minute
while it unpacks torch, and a bar sitting at 0 % looks like a hang."""
_PIP_NEWS = re.compile(r"^(Collecting|Downloading|Installing collected|Successfully installed) ")
"""pip's lines worth relaying: what it fetches and when it starts and ends installing."""


class GenaiBuildError(ExportError):
    """The genai virtualenv or the model builder failed; the message says which step and why."""


def _host_ort_version() -> str:
    """onnxruntime of the interpreter running edged, so both runtimes benchmark the same kernels."""
    from importlib import metadata

    try:
        return metadata.version("onnxruntime")
    except metadata.PackageNotFoundError:
        return _FALLBACK_ORT_VERSION


def genai_requirements() -> tuple[str, ...]:
    """The pinned package set of the genai virtualenv (tested together; see tools/README.md)."""
    return (
        f"onnxruntime-genai=={GENAI_VERSION}",
        f"onnxruntime=={_host_ort_version()}",
        "transformers==5.24.0",
        # Pinned like the [export] extra: pip must never pull a multi-GB CUDA build.
        "torch==2.13.0",
        "onnx>=1.17",
        "onnx_ir>=0.1",
        "safetensors>=0.4",
        "numpy>=1.24",
    )


def genai_venv_path() -> Path:
    return Path(os.environ.get(VENV_ENV) or DEFAULT_VENV).expanduser()


def genai_python(venv_dir: Path | None = None) -> Path:
    return (venv_dir or genai_venv_path()) / "bin" / "python"


@contextlib.contextmanager
def _venv_lock(venv_dir: Path) -> Iterator[None]:
    # Two exports (a benchmark and a fixture build) may race to create the same venv.
    venv_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(venv_dir.parent / f".{venv_dir.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: Sequence[str | Path], what: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise GenaiBuildError(f"{what} failed (exit {proc.returncode}): {tail}")
    return proc.stdout


def progress_writer(enabled: bool) -> Callable[[str], None]:
    """Where the venv's progress lines go: stderr, above the export's bars, when progress is
    enabled (it is a user waiting at a terminal); else the log."""
    if not enabled:
        return lambda line: log.info("%s", line)
    try:
        from tqdm import tqdm
    except ImportError:
        return lambda line: print(line, file=sys.stderr, flush=True)
    return lambda line: tqdm.write(line, file=sys.stderr)


def _pump(stream: Any, lines: queue.Queue[str | None]) -> None:
    for raw in stream:
        lines.put(raw.rstrip("\n").split("\r")[-1].strip())
    lines.put(None)


def run_reporting(
    cmd: Sequence[str | Path],
    what: str,
    say: Callable[[str], None],
    every_s: float = HEARTBEAT_S,
) -> None:
    """Run a slow command like `_run`, telling `say` what it does while it runs: pip's own
    notable lines, and "still running (N s)" whenever `every_s` passed without news."""
    tail: deque[str] = deque(maxlen=25)
    lines: queue.Queue[str | None] = queue.Queue()
    started = time.monotonic()
    next_beat = started + every_s
    with subprocess.Popen(
        [str(c) for c in cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    ) as proc:
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        while True:
            try:
                line = lines.get(timeout=max(0.0, next_beat - time.monotonic()))
            except queue.Empty:
                say(f"{what}: still running ({time.monotonic() - started:.0f} s)")
                next_beat = time.monotonic() + every_s
                continue
            if line is None:
                break
            if line:
                tail.append(line)
            if _PIP_NEWS.match(line):
                say(f"{what}: {line}")
                next_beat = time.monotonic() + every_s
        code = proc.wait()
    if code != 0:
        raise GenaiBuildError(f"{what} failed (exit {code}): " + "\n".join(tail))


def _stamp_matches(venv_dir: Path, requirements: Sequence[str]) -> bool:
    stamp = venv_dir / _STAMP
    if not (stamp.is_file() and genai_python(venv_dir).exists()):
        return False
    try:
        data = json.loads(stamp.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return data.get("requirements") == list(requirements)


def _refuse_cuda_wheels(
    pip: list[str], requirements: Sequence[str], venv_dir: Path, say: Callable[[str], None]
) -> None:
    """Resolve without installing and refuse a plan that contains a CUDA torch or nvidia-* wheels.

    On x86_64 Linux the PyPI torch is the CUDA build (plus ~3 GB of nvidia-* wheels); the CPU
    wheel comes from the machine's pip find-links (/opt/wheels here, via /etc/pip.conf), which the
    venv's pip reads like the system one. If that is missing, stop before downloading gigabytes.
    """
    with tempfile.TemporaryDirectory(prefix="edged-pip-report-") as tmp:
        report_path = Path(tmp) / "report.json"
        run_reporting(
            [*pip, "install", "--dry-run", "--quiet", "--report", report_path, *requirements],
            f"resolving {venv_dir} requirements",
            say,
        )
        report = json.loads(report_path.read_text())
    cuda = []
    for item in report.get("install", []):
        meta = item.get("metadata", {})
        name = str(meta.get("name", "")).lower()
        version = str(meta.get("version", ""))
        if name.startswith(("nvidia-", "cuda-", "triton")):
            cuda.append(f"{name}=={version}")
        elif (
            name == "torch"
            and sys.platform == "linux"
            and platform.machine() == "x86_64"
            and "+cpu" not in version
        ):
            cuda.append(f"torch=={version} (not a +cpu build)")
    if cuda:
        raise GenaiBuildError(
            f"creating {venv_dir}: pip would install CUDA packages {', '.join(cuda)}; "
            "make the CPU torch wheel reachable (pip find-links, e.g. /opt/wheels in "
            "/etc/pip.conf) and try again"
        )


def ensure_genai_venv(progress: bool = True) -> Path:
    """Create the onnxruntime-genai virtualenv if it is missing or stale; return its directory.

    Idempotent: a stamp file records the installed requirement set, and a venv whose stamp
    matches is returned as is without touching pip. Creating it takes a minute or two; with
    `progress` its steps, pip's lines and a heartbeat go to stderr (else to the log).
    """
    venv_dir = genai_venv_path()
    requirements = genai_requirements()
    if _stamp_matches(venv_dir, requirements):
        return venv_dir
    with _venv_lock(venv_dir):
        if _stamp_matches(venv_dir, requirements):
            return venv_dir
        say = progress_writer(progress)
        say(f"creating the onnxruntime-genai virtualenv in {venv_dir} (once; 1-2 minutes)")
        if not genai_python(venv_dir).exists():
            venv.EnvBuilder(with_pip=True, clear=True).create(venv_dir)
        pip = [str(genai_python(venv_dir)), "-m", "pip", "--disable-pip-version-check"]
        _refuse_cuda_wheels(pip, requirements, venv_dir, say)
        say(f"installing {' '.join(requirements)}")
        # --progress-bar off: pip's bars are noise through a pipe; its lines and the heartbeat
        # say what is happening.
        run_reporting(
            [*pip, "install", "--progress-bar", "off", *requirements],
            "genai venv: pip install",
            say,
        )
        probe = _run(
            [
                genai_python(venv_dir),
                "-c",
                "import json, torch, transformers, onnxruntime, onnxruntime_genai;"
                "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda,"
                "'transformers': transformers.__version__, 'onnxruntime': onnxruntime.__version__,"
                "'onnxruntime_genai': onnxruntime_genai.__version__}))",
            ],
            f"importing the builder's packages in {venv_dir}",
        )
        versions = json.loads(probe.strip().splitlines()[-1])
        if versions.get("cuda"):
            raise GenaiBuildError(
                f"{venv_dir}: torch {versions['torch']} is a CUDA build (cuda "
                f"{versions['cuda']}); delete the venv and make the CPU wheel reachable"
            )
        stamp = {"requirements": list(requirements), "versions": versions}
        (venv_dir / _STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
        say(f"genai virtualenv ready: {versions}")
    return venv_dir


def _opt(opts: Any, name: str, default: Any = None) -> Any:
    return getattr(opts, name, default)


def _stage_checkpoint(source: Path, context_length: int | None, stage: Path) -> Path:
    """The checkpoint to hand to the builder: `source`, or a copy capped at `context_length`.

    The builder sizes the rotary cos/sin caches and genai_config's max_length (and so the genai
    runtime's KV buffers) from max_position_embeddings; Qwen3 declares 40960, far beyond what a
    Pi can hold. The copy symlinks the weights and rewrites config.json only.
    """
    config = json.loads((source / "config.json").read_text())
    declared = config.get("max_position_embeddings")
    if not context_length or not isinstance(declared, int) or context_length >= declared:
        return source
    if config.get("rope_scaling"):
        # Scaled rotary (YaRN, dynamic NTK) derives its tables from the declared length.
        log.warning(
            "%s has rope_scaling; keeping max_position_embeddings = %d, not %d",
            source,
            declared,
            context_length,
        )
        return source
    stage.mkdir(parents=True)
    for item in source.iterdir():
        if item.name != "config.json":
            (stage / item.name).symlink_to(item.resolve())
    config["max_position_embeddings"] = int(context_length)
    (stage / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return stage


def builder_command(
    python: Path, checkpoint: Path, out: Path, cache: Path, quant: str, last_token_logits: bool
) -> list[str]:
    precision = _PRECISIONS.get(quant)
    if precision is None:
        raise GenaiBuildError(
            f"quant = {quant!r} is not supported by the ort-genai exporter "
            f"(supported: {', '.join(_PRECISIONS)}); use exporter optimum for int8"
        )
    extra = []
    if precision == "int4":
        extra += [
            f"accuracy_level={INT4_ACCURACY_LEVEL}",
            f"block_size={INT4_BLOCK_SIZE}",
            # Gather too: the embedding becomes GatherBlockQuantized reading the LM head's int4
            # matrix, so a tied model stores its largest weight once (151936 x 1024 for Qwen3).
            "op_types_to_quantize=MatMul/Gather",
        ]
    extra.append("shared_embeddings=true")
    if last_token_logits:
        extra.append("prune_lm_head=true")
    return [
        str(python),
        "-m",
        _BUILDER_MODULE,
        "-i",
        str(checkpoint),
        "-o",
        str(out),
        "-p",
        precision,
        "-e",
        "cpu",
        "-c",
        str(cache),
        "--extra_options",
        *extra,
    ]


def _builder_env() -> dict[str, str]:
    env = dict(os.environ)
    # A local checkpoint only: the builder must never reach for a hub.
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    return env


def _run_builder(cmd: list[str], progress: Any) -> None:
    log.info("running the onnxruntime-genai model builder: %s", " ".join(cmd))
    tail: deque[str] = deque(maxlen=30)
    with subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_builder_env(),
        errors="replace",
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            # tqdm redraws with carriage returns; keep the last state of each line.
            line = raw.rstrip("\n").split("\r")[-1].strip()
            if not line:
                continue
            tail.append(line)
            # The quantizer logs every node and tqdm every tensor; only the builder's own
            # lines are news.
            if progress and not _NOISE.match(line):
                log.info("builder: %s", line)
            else:
                log.debug("builder: %s", line)
        code = proc.wait()
    if code != 0:
        raise GenaiBuildError(
            f"onnxruntime-genai model builder failed (exit {code}):\n" + "\n".join(tail)
        )


def _finish_graph(out: Path) -> None:
    """Check the builder's graph, and write the KV head size into its past/present shapes.

    The builder leaves the last KV dimension symbolic (`kv_cache_dim`) although it is the fixed
    head size; a fixed dimension lets a runtime read the KV layout from the graph alone, as it
    can for optimum's. Only the small model.onnx is rewritten; the weights stay where they are.
    """
    import onnx

    config = json.loads((out / "genai_config.json").read_text())
    if not config.get("search", {}).get("past_present_share_buffer"):
        raise GenaiBuildError(
            f"{out / 'genai_config.json'}: search.past_present_share_buffer is not true; "
            "the builder did not emit GroupQueryAttention with a shared KV buffer"
        )
    head_size = int(config["model"]["decoder"]["head_size"])
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    graph = model.graph
    for value in (*graph.input, *graph.output):
        if value.name.startswith(("past_key_values.", "present.")):
            last = value.type.tensor_type.shape.dim[-1]
            if last.dim_param:
                last.Clear()
                last.dim_value = head_size
    onnx.save(model, str(out / "model.onnx"))
    inputs = {i.name for i in graph.input}
    if "position_ids" in inputs or not {"input_ids", "attention_mask"} <= inputs:
        raise GenaiBuildError(
            f"{out / 'model.onnx'}: inputs {sorted(inputs)} are not input_ids, attention_mask "
            "and past_key_values.N.key/value; this builder version changed the graph contract"
        )
    if not any(node.op_type == "GroupQueryAttention" for node in graph.node):
        raise GenaiBuildError(f"{out / 'model.onnx'}: no GroupQueryAttention node")


def _tied_checkpoint(name: str) -> Path:
    """The checkpoint directory `name` names, checked to be one the builder can share."""
    source = Path(name).expanduser()
    if not source.is_dir():
        # A hub id: its snapshot in the hub cache (offline unless the user allows otherwise).
        from .optimum_export import resolve_source

        source = resolve_source(name)
    if not (source / "config.json").is_file():
        raise GenaiBuildError(
            f"source = {str(source)!r}: the ort-genai exporter needs a Hugging Face "
            "checkpoint directory with config.json"
        )
    config = json.loads((source / "config.json").read_text())
    if not config.get("tie_word_embeddings", False):
        # shared_embeddings is only valid for tied models; the builder raises on the others.
        raise GenaiBuildError(
            f"{source / 'config.json'}: tie_word_embeddings is false; the ort-genai exporter "
            "here shares the int4 embedding with the LM head and needs a tied model"
        )
    return source


def build(opts: Any, workdir: Path) -> Path:
    """Export `opts.source` (a local HF checkpoint directory) with the onnxruntime-genai builder.

    Uses opts.source, opts.quant ("int4" or "fp32"), opts.context_length (caps the rotary
    tables and the runtime's KV buffer), opts.last_token_logits (prune the LM head to the last
    position) and opts.progress. Returns `workdir/genai`, holding model.onnx, model.onnx.data
    and genai_config.json.
    """
    source = _tied_checkpoint(str(_opt(opts, "source")))
    workdir = Path(workdir)
    out = workdir / "genai"
    if out.exists():
        shutil.rmtree(out)
    staged = workdir / "genai-source"
    if staged.exists():
        shutil.rmtree(staged)
    cache = workdir / "genai-cache"

    venv_dir = ensure_genai_venv(bool(_opt(opts, "progress", False)))
    checkpoint = _stage_checkpoint(source, _opt(opts, "context_length"), staged)
    cmd = builder_command(
        genai_python(venv_dir),
        checkpoint,
        out,
        cache,
        str(_opt(opts, "quant", "int4")),
        bool(_opt(opts, "last_token_logits", False)),
    )
    try:
        _run_builder(cmd, _opt(opts, "progress", False))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(staged, ignore_errors=True)

    missing = [name for name in ("model.onnx", "genai_config.json") if not (out / name).is_file()]
    if missing:
        raise GenaiBuildError(f"model builder wrote no {', '.join(missing)} into {out}")
    for item in out.iterdir():
        if item.name not in GRAPH_FILES:
            if item.is_dir():
                shutil.rmtree(item)
            else:
                item.unlink()
    _finish_graph(out)
    return out
