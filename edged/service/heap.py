"""Give the C heap's free pages back to the kernel once a burst of work is over.

glibc returns freed memory to the kernel only from the top of each arena: one chunk still in use
above the freed ones pins them all. A burst (a broker that comes back with a queue of queries and
a minute of vitals) therefore left the daemon's RSS a step higher each time it reached further
than the one before: +1.1, +0.2, +0.2, +0.2 MiB after successive 60 s broker outages in the soak
(tools/soak.py, issue #16), and none of it came back. `malloc_trim(0)` walks every arena and
hands back each whole free page (madvise), wherever it lies; on the soak's 115 MB daemon it takes
0.3 ms, and the same outages then leave RSS where the previous burst left it.

C libraries without `malloc_trim` (musl) get nothing done: their allocators return memory
differently, and nothing here depends on it.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


def _load_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library the process already runs on
    except (AttributeError, OSError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


_TRIM = _load_trim()


def can_release() -> bool:
    """Whether this C library can hand free heap pages back on request (glibc can)."""
    return _TRIM is not None


def release_free_heap() -> bool:
    """Hand every whole free page of the C heap back to the kernel. True when some memory was
    released; False when there was none to release or the C library cannot."""
    if _TRIM is None:
        return False
    # ctypes lets go of the GIL for the call: the transport and delivery threads run on.
    return bool(_TRIM(0))


class IdleTrim:
    """Release the heap once each time the worker goes idle after doing work: after a burst, not
    on every idle poll (the worker polls its queue every 200 ms)."""

    def __init__(self, release: Callable[[], bool] = release_free_heap) -> None:
        self._release = release
        self._worked = False

    def worked(self) -> None:
        self._worked = True

    def idle(self) -> None:
        if self._worked:
            self._worked = False
            released = self._release()
            log.debug("heap: free pages %s", "handed back" if released else "none to hand back")
