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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_MADV_RANDOM = 1
_MADV_DONTNEED = 4
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


def drop_clean_pages(path: Path) -> int:
    """Drop this process's resident pages of `path`'s mappings that are the file's (none
    written through the mapping); the kB dropped."""
    try:
        smaps = Path("/proc/self/smaps").read_text()
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
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
