"""Progress bars for the long export steps; silent when disabled or when tqdm is missing."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


def bar(items: Iterable[T], desc: str, enabled: bool, total: int | None = None) -> Iterable[T]:
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, total=total, leave=False)


class Stages:
    """The export's named steps, shown as one bar and logged with their duration."""

    def __init__(self, names: Sequence[str], enabled: bool) -> None:
        self._names = list(names)
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=len(self._names), desc="export", unit="step")
            except ImportError:
                self._bar = None
        self.durations: dict[str, float] = {}

    def extend(self, names: Sequence[str]) -> None:
        """Plan more steps (what follows depends on what the first steps found)."""
        self._names.extend(names)
        if self._bar is not None:
            self._bar.total = len(self._names)
            self._bar.refresh()

    def run(self, name: str) -> _Stage:
        if name not in self._names:
            raise KeyError(f"stage {name!r} is not one of {self._names}")
        return _Stage(self, name)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class _Stage:
    def __init__(self, stages: Stages, name: str) -> None:
        self._stages = stages
        self._name = name
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.monotonic()
        if self._stages._bar is not None:
            self._stages._bar.set_description(f"export: {self._name}")

    def __exit__(self, *exc: object) -> None:
        took = time.monotonic() - self._start
        self._stages.durations[self._name] = took
        if self._stages._bar is not None:
            self._stages._bar.update(1)
        if exc[0] is None:
            peak = peak_rss_gb()
            memory = f"; this process's peak RSS so far {peak:.2f} GB" if peak is not None else ""
            log.info("%s took %.1f s%s", self._name, took, memory)


def peak_rss_gb() -> float | None:
    """This process's resident high-water mark (Linux VmHWM), or None where there is none.
    Logged after each stage, it shows which stage sets an export's memory peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        return None
    return None
