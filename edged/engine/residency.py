"""Give back the pages of the model's weights file that onnxruntime read once and keeps mapped.

onnxruntime memory-maps external data (`model.onnx.data`), one private mapping per tensor, and
repacks every MatMulNBits weight onto the heap at load. Reading a tensor to repack it faults
its pages in, and some stay mapped after: the tied embedding's int4 blocks, which the lookup
(GatherBlockQuantized) keeps, were read whole to pack the LM head that shares them. They count
in the process's RSS (150-200 MB at Qwen3-1.7B) though the lookup needs a few rows per token.

Those pages are the file's: nobody wrote them through the mapping, so the page cache holds
exactly what they hold. Dropping them from this process's page tables (madvise MADV_DONTNEED)
costs nothing but a minor fault the next time a row is read, from the page cache. A page
written through a private mapping is an anonymous copy that exists nowhere else (smaps'
`Anonymous`); a mapping with any is left alone. The mappings are also marked for random
access, so that a row read later faults in its own page and not the 64 KB around it. Linux
only; elsewhere nothing is done.

That happens after load. During load, `LoadPager` keeps the file's pages from piling up while
onnxruntime repacks: the file's read pages and the growing repacked heap copy were resident
together, and that moment was the process's peak (Qwen3-1.7B, default graph: 1,996 MB, against
about 1,600 once loaded). It cannot use MADV_DONTNEED: it runs beside onnxruntime, from a
snapshot of the mappings that is stale by the time its call lands, and a range onnxruntime
unmapped meanwhile may already be malloc's. DONTNEED there zeroes live heap memory (tried: a
load died in `free(): invalid pointer`). MADV_PAGEOUT (Linux 5.4+) only asks the kernel to
reclaim, which never changes what memory reads back: a clean file page is read again from the
file, and a heap page stays (or, with swap, is swapped out and back), so a stale range costs
time at worst, never data. What it costs: a reclaimed page leaves the page cache too, where
DONTNEED leaves it, so the next start reads it from disk again (Qwen3-1.7B all-int4: about 430 of
the file's 1,033 MB; on a Pi's SD card, seconds). Measured (tools/bench_load.py, plain start,
median of 3, 2026-12-07): peak RSS Qwen3-1.7B default graph 1,997 -> 1,736 MB, all-int4
1,700 -> 1,512, Qwen3-0.6B 688 -> 617; load time and decode unchanged within noise.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

_MADV_RANDOM = 1
_MADV_DONTNEED = 4
_MADV_PAGEOUT = 21
_EINVAL = 22
_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str
    path: str
    rss_kb: int
    anonymous_kb: int
    """Pages written through a private mapping: copies that exist only here."""


def mappings_of(path: Path, smaps: str) -> list[Mapping]:
    """The mappings of `path` in a /proc/<pid>/smaps text, with their resident and anonymous
    kB."""
    target = str(path)
    blocks: list[tuple[re.Match[str], dict[str, int]]] = []
    for line in smaps.splitlines():
        header = _HEADER.match(line)
        if header:
            blocks.append((header, {}))
        elif blocks and ":" in line:
            key, value = line.split(":", 1)
            fields = value.split()
            if fields and fields[0].isdigit():
                blocks[-1][1][key] = int(fields[0])
    return [
        Mapping(
            start=int(h.group(1), 16),
            end=int(h.group(2), 16),
            perms=h.group(3),
            path=target,
            rss_kb=f.get("Rss", 0),
            anonymous_kb=f.get("Anonymous", 0),
        )
        for h, f in blocks
        if h.group(4) == target
    ]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def drop_clean_pages(path: Path) -> int:
    """Drop this process's resident pages of `path`'s mappings that are the file's (none
    written through the mapping); the kB dropped."""
    try:
        smaps = Path("/proc/self/smaps").read_text()
        libc = _libc()
    except OSError:
        return 0
    dropped = 0
    for m in mappings_of(path.resolve(), smaps):
        if m.anonymous_kb != 0:
            continue
        # A lookup reads a row (a page or two) per token: fault in that page, not the 64 KB
        # around it that the kernel reads by default.
        libc.madvise(m.start, m.end - m.start, _MADV_RANDOM)
        if m.rss_kb and libc.madvise(m.start, m.end - m.start, _MADV_DONTNEED) == 0:
            dropped += m.rss_kb
        elif m.rss_kb:
            log.debug("madvise %s at %#x: errno %d", path, m.start, ctypes.get_errno())
    return dropped


def page_out(mappings: Sequence[Mapping], libc: ctypes.CDLL | None = None) -> bool:
    """Ask the kernel to reclaim the pages of `mappings` (MADV_PAGEOUT); False when this kernel
    has no MADV_PAGEOUT (before 5.4). A range no longer mapped (ENOMEM) is skipped."""
    libc = libc or _libc()
    for m in mappings:
        failed = libc.madvise(m.start, m.end - m.start, _MADV_PAGEOUT) != 0
        if failed and ctypes.get_errno() == _EINVAL:
            return False
    return True


class LoadPager:
    """While onnxruntime builds a session from `paths` (repacking their weights onto the heap),
    page out what it has read every `interval_s`; a context manager around the build.

    /proc/self/maps, not smaps, because a pass must be cheap beside the load: about 4 ms
    against 38 for the ~300 mappings of a Qwen3-1.7B graph. Every 10 ms, not 50: a tensor read
    whole (the 8-bit LM head, 300 MB) piled up for up to a whole interval beside its repacked
    copy, so the peak depended on when the passes fell. Qwen3-1.7B, 8 loads each, peak RSS
    (median and range): default graph 1,738 (1,604-1,818) -> 1,548 (1,531-1,568) MB, all-int4
    1,512 (1,396-1,531) -> 1,388 (1,363-1,401); load time the same (3.0 s, 2.8 s), the pager's
    CPU 0.2 -> 0.55 s of it, on the core onnxruntime's single-threaded load leaves idle. More
    of the file leaves the page cache (all-int4: 472 of 1,033 MB still cached after the load,
    against 607), which a restart reads again."""

    def __init__(self, paths: Sequence[Path], interval_s: float = 0.01) -> None:
        self.paths = [p.resolve() for p in paths]
        self.interval_s = interval_s
        self.passes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LoadPager:
        if self.paths and Path("/proc/self/maps").exists():
            self._thread = threading.Thread(target=self._run, name="edged-load-pager", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        try:
            libc = _libc()
            while not self._stop.wait(self.interval_s):
                maps = Path("/proc/self/maps").read_text()
                if not page_out([m for p in self.paths for m in mappings_of(p, maps)], libc):
                    log.debug("no MADV_PAGEOUT on this kernel: the load's peak stays as it is")
                    return
                self.passes += 1
        except OSError as exc:  # no /proc or no libc: the load goes on, as before this existed
            log.debug("load pager stopped: %s", exc)
