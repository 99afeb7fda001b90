"""Where the answered store lives: `delivery.state_dir` when the daemon can write there, else a
volatile place in RAM, so that a state directory that cannot be used costs durability, not the
service.

An SD card the kernel remounted read-only, a file where the directory should be, a non-root
user and /var/lib/edged: refusing to start would stop the alerts with the answers (systemd
restarting into the same error every few seconds). So the daemon comes up `degraded`, says why
loudly (log, node error topic), and keeps its answered store in the runtime directory: systemd's
`RuntimeDirectory=edged` (/run/edged, kept across restarts by `RuntimeDirectoryPreserve=restart`),
or /dev/shm/edged-<node> without systemd. Both are tmpfs: a redelivery after a daemon crash or a
broker restart still gets the stored reply byte-identical; only a power cut loses them. Replies
the durable file already holds are still looked up there, read-only (a read-only card can still
be read). The next start on a usable state dir takes the volatile replies over into it.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from edged.config.loader import state_dir_problem
from edged.service.answer_store import STORE_NAME, AnswerStore, store_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StorePlace:
    store: AnswerStore
    problem: str | None
    """None: the store is durable in delivery.state_dir. Else why it is not, and where it is."""


def volatile_dir(node_id: str) -> Path:
    """The directory in RAM the store falls back to (see the module's docstring)."""
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    if runtime:  # systemd: a colon-separated list when several are configured
        return Path(runtime.split(":")[0])
    return Path("/dev/shm") / f"edged-{node_id}"


def open_answer_store(state_dir: Path, node_id: str, ttl_s: float) -> StorePlace:
    volatile = volatile_dir(node_id)
    durable = state_dir / STORE_NAME
    problem = state_dir_problem(state_dir, create=True)
    if problem is None:
        try:
            store = AnswerStore(durable, ttl_s)
        except (OSError, sqlite3.Error) as exc:  # a full disk at start, failing storage
            problem = f"delivery.state_dir = '{state_dir}': {STORE_NAME} cannot be opened ({exc})"
        else:
            _take_over(store, volatile / STORE_NAME)
            return StorePlace(store, None)
    # Replies go to RAM; those the durable file holds are still looked up there, read-only.
    read_through = durable if durable.is_file() else None
    try:
        volatile.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Replies are health data: never in a directory someone else owns or can read.
        if volatile.stat().st_uid != os.geteuid() or volatile.stat().st_mode & 0o077:
            raise PermissionError(f"{volatile} is not private to this user")
        store = AnswerStore(volatile / STORE_NAME, ttl_s, read_through)
        where = f"{volatile} (RAM: kept across daemon restarts, lost on power loss)"
    except (OSError, sqlite3.Error) as exc:
        log.error("volatile answered store at %s cannot be used either (%s)", volatile, exc)
        store = AnswerStore(None, ttl_s, read_through)
        where = "this process's memory (lost when the daemon restarts)"
    problem = f"{problem}; answered queries are stored in {where} until that is fixed"
    log.error("%s: serving degraded", problem)
    return StorePlace(store, problem)


def _take_over(store: AnswerStore, volatile: Path) -> None:
    """Replies a degraded run kept in RAM, into the durable store, so that a redelivery of one
    of them still gets the same bytes; then the volatile copy is removed."""
    if not volatile.exists():
        return
    try:
        moved = store.absorb(volatile)
    except sqlite3.Error as exc:
        log.warning("replies in the volatile store %s could not be taken over (%s)", volatile, exc)
        return
    for part in store_files(volatile):
        part.unlink(missing_ok=True)
    log.info("took over %d answered queries from the volatile store %s", moved, volatile)


def read_only_mount(root: Path, path: Path) -> bool:
    """Whether `path` lies on a mount that is read-only now, from `root`/proc/self/mountinfo
    (`root`: governor.sensor_root). The kernel remounts an SD card read-only on I/O errors
    (errors=remount-ro) while the daemon runs; its store then refuses every reply for good."""
    try:
        lines = (root / "proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return False
    target = os.path.realpath(path) if root == Path("/") else str(path)
    best, read_only = -1, False
    for line in lines:
        # "36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue"
        head, _, tail = line.partition(" - ")
        fields, super_fields = head.split(), tail.split()
        if len(fields) < 6 or len(super_fields) < 3:
            continue
        mount = fields[4].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= best:  # the deepest mount; a later one shadows an earlier
            best = len(mount)
            read_only = "ro" in fields[5].split(",") or "ro" in super_fields[2].split(",")
    return read_only
