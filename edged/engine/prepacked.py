"""The graph with onnxruntime's prepacked weights, cached on disk per machine.

At every load onnxruntime repacks each int4 matrix into the layout its kernels read (block sums
for the int8-accumulating path) and keeps that repacked copy on the heap: a second copy of the
weights, the larger one, rebuilt at every start. onnxruntime can instead write the prepacked
copy into the external data file of an optimized graph
(`session.save_external_prepacked_constant_initializers`) and, when that graph is loaded,
memory-map it: the weights are then file-backed pages (shared, clean, reclaimable) instead of
heap, and the start skips the repacking.

The layout depends on the onnxruntime build and the CPU's instruction set, so the copy is made
on the board itself, at the first load, under `<cache_dir>/<key>/`, the key hashing the
model's manifest, the onnxruntime version and the CPU's feature flags. A probe (the logits of a
few fixed tokens) is recorded from the original graph when the copy is written and checked on
the copy at every later load; a copy that is missing, incomplete, stale or disagrees is set
aside with a warning and the original graph is used, so the cache can only ever cost a start
its time, never its answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .manifest import ModelManifest

log = logging.getLogger(__name__)

FORMAT = 1
STAMP = "edged-prepacked.json"
PROBE = "probe.npy"
GRAPH = "model.onnx"
DATA = "model.onnx.data"
PROBE_TOKENS = (1, 2, 3, 5, 8, 13, 21, 34)
PROBE_ATOL = 1e-4
"""The copy holds the very bytes the kernels used when the probe was recorded; anything beyond
float noise means it is not the same model."""
FREE_SPACE_FACTOR = 3
"""Writing the copy needs about 2.4x the model files (the originals stay in it, unread); a
copy is not started with less than 3x free."""


@dataclass(frozen=True)
class CacheEntry:
    directory: Path
    key: str

    @property
    def graph(self) -> Path:
        return self.directory / GRAPH


def cpu_flags(cpuinfo: str) -> tuple[str, ...]:
    """The instruction-set flags in /proc/cpuinfo's text, sorted (pure: `edged doctor` reads
    them from a board's cpuinfo too)."""
    for line in cpuinfo.splitlines():
        # x86 says "flags", ARM "Features"; the first core's line stands for all (a
        # big.LITTLE board's cores share one instruction set).
        if line.split(":")[0].strip() in ("flags", "Features"):
            return tuple(sorted(line.split(":", 1)[1].split()))
    return ()


def cpu_signature() -> str:
    """What the prepacked layout may depend on: architecture and instruction-set flags."""
    try:
        flags = " ".join(cpu_flags(Path("/proc/cpuinfo").read_text()))
    except OSError:
        flags = ""
    return f"{platform.machine()} {flags}"


def cache_key(manifest: ModelManifest, ort_version: str, cpu: str) -> str:
    """Stable name of the copy for this model, runtime and CPU (pure: tested directly)."""
    basis = json.dumps(
        {
            "format": FORMAT,
            "files": manifest.files,
            "onnxruntime": ort_version,
            "cpu": cpu,
        },
        sort_keys=True,
    )
    return hashlib.sha256(basis.encode()).hexdigest()[:24]


def entry_for(cache_dir: Path, manifest: ModelManifest) -> CacheEntry:
    key = cache_key(manifest, ort.__version__, cpu_signature())
    return CacheEntry(cache_dir / key, key)


def probe_feeds(session: ort.InferenceSession) -> dict[str, np.ndarray]:
    """Inputs for one prefill of PROBE_TOKENS with an empty KV cache, for either layout."""
    n = len(PROBE_TOKENS)
    feeds: dict[str, np.ndarray] = {}
    for item in session.get_inputs():
        if item.name == "input_ids":
            feeds[item.name] = np.array([PROBE_TOKENS], dtype=np.int64)
        elif item.name == "attention_mask":
            feeds[item.name] = np.ones((1, n), dtype=np.int64)
        elif item.name == "position_ids":
            feeds[item.name] = np.arange(n, dtype=np.int64)[None]
        elif item.name.startswith("past_key_values."):
            heads, dim = item.shape[1], item.shape[3]
            dtype = np.float16 if item.type == "tensor(float16)" else np.float32
            feeds[item.name] = np.zeros((1, heads, 0, dim), dtype=dtype)
    return feeds


def probe(session: ort.InferenceSession) -> np.ndarray:
    """The last position's logits for PROBE_TOKENS."""
    logits = session.run(["logits"], probe_feeds(session))[0]
    return np.asarray(logits[0, -1], dtype=np.float32)


def save_options(options: ort.SessionOptions, target: Path) -> ort.SessionOptions:
    """`options`, also asking the session to write its optimized graph with prepacked weights."""
    options.optimized_model_filepath = str(target / GRAPH)
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_file_name", DATA
    )
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
    )
    options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    return options


def has_room(cache_dir: Path, model_dir: Path, manifest: ModelManifest) -> bool:
    """Whether a copy may be written: the directory can be made and has room for one."""
    size = sum((model_dir / name).stat().st_size for name in manifest.files)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(cache_dir).free
    except OSError as exc:
        log.warning(
            "prepacked cache: cannot use %s (%s); the model loads as before", cache_dir, exc
        )
        return False
    if free < FREE_SPACE_FACTOR * size:
        log.warning(
            "prepacked cache: %s has %.1f GB free, under %dx the model's %.1f GB; not writing a "
            "copy (the model loads as before)",
            cache_dir,
            free / 1e9,
            FREE_SPACE_FACTOR,
            size / 1e9,
        )
        return False
    return True


def write_copy(
    entry: CacheEntry,
    create: Callable[[ort.SessionOptions], ort.InferenceSession],
    base_options: ort.SessionOptions,
    manifest: ModelManifest,
) -> ort.InferenceSession:
    """Create the session from the original graph while it writes the copy into a staging
    directory; record the probe; move the finished copy into place. Returns the session."""
    staging = entry.directory.with_name(f".{entry.key}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    try:
        session = create(save_options(base_options, staging))
        np.save(staging / PROBE, probe(session))
        stamp = {"format": FORMAT, "model": manifest.name, "onnxruntime": ort.__version__}
        stamp["files"] = {p.name: p.stat().st_size for p in staging.iterdir() if p.is_file()}
        (staging / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
        _replace_others(entry)
        staging.rename(entry.directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("prepacked cache: wrote %s for %s", entry.directory, manifest.name)
    return session


def _replace_others(entry: CacheEntry) -> None:
    """One copy per cache directory (one daemon, one model): older keys go."""
    for other in entry.directory.parent.iterdir():
        if other.is_dir() and other.name != entry.key and not other.name.startswith("."):
            shutil.rmtree(other, ignore_errors=True)


def check_copy(entry: CacheEntry) -> str | None:
    """Why the copy on disk cannot be used, or None if its files are complete."""
    try:
        stamp: dict[str, Any] = json.loads((entry.directory / STAMP).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"no readable {STAMP}: {exc}"
    if stamp.get("format") != FORMAT or stamp.get("onnxruntime") != ort.__version__:
        return f"made by format {stamp.get('format')} / onnxruntime {stamp.get('onnxruntime')}"
    for name, size in stamp.get("files", {}).items():
        path = entry.directory / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{name} is missing or not {size} bytes"
    return None


def open_copy(
    entry: CacheEntry, create: Callable[[Path], ort.InferenceSession]
) -> ort.InferenceSession | None:
    """The session on the cached copy, or None (with a warning, the copy set aside) when the
    copy is incomplete, fails to load or answers the probe differently."""
    problem = check_copy(entry)
    session = None
    if problem is None:
        try:
            session = create(entry.graph)
            expected = np.load(entry.directory / PROBE)
            got = probe(session)
            if got.shape != expected.shape:
                problem = f"probe logits have shape {got.shape}, recorded {expected.shape}"
            elif not np.allclose(got, expected, atol=PROBE_ATOL):
                problem = f"probe logits differ by {np.max(np.abs(got - expected)):.3g}"
        except Exception as exc:  # onnxruntime raises its own types; any failure means "no"
            problem = f"does not load: {exc}"
    if problem is None:
        return session
    log.warning("prepacked cache: %s set aside (%s); loading the original graph", entry, problem)
    shutil.rmtree(entry.directory, ignore_errors=True)
    return None
