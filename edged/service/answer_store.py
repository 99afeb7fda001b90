"""Durable record of answered queries, so a redelivered query is never generated twice.

MQTT QoS 1 is at-least-once: after a daemon crash or a broker restart the broker redelivers
every query the daemon had not acknowledged, including ones whose answer was already sent.
The final reply is stored here *before* it is published, keyed by (wearer, id), and a
redelivered id gets the stored bytes again — byte-identical, as API.md requires.

SQLite in WAL mode with synchronous=FULL: a reply is on disk before it is published, so not
even a power cut between publishing and acknowledging leads to a second, different answer. One
fsync per answered query is nothing next to the seconds a generation takes on a board.

The same file keeps the queries queued and not answered yet (`pending`, edged.service.inbox),
each until the transaction that stores its reply: a second fsync per query, so that a query the
broker forgets in a crash is still answered after the daemon's next start.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

STORE_NAME = "answered.sqlite3"
_CACHE_KIB = 256

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answered (
    wearer      TEXT NOT NULL,
    id          TEXT NOT NULL,
    topic       TEXT NOT NULL,
    payload     BLOB NOT NULL,
    correlation BLOB,
    answered_at REAL NOT NULL,
    PRIMARY KEY (wearer, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS answered_at_idx ON answered (answered_at);
CREATE TABLE IF NOT EXISTS pending (
    wearer      TEXT NOT NULL,
    id          TEXT NOT NULL,
    work        BLOB NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (wearer, id)
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class StoredReply:
    topic: str
    payload: bytes
    correlation: bytes | None
    answered_at: float


def store_files(path: Path) -> list[Path]:
    """The database and the WAL files SQLite keeps beside it."""
    return [Path(f"{path}{suffix}") for suffix in ("", "-wal", "-shm")]


KEEP_DAMAGED = 3
"""Damaged stores kept for a post-mortem: a card that keeps failing must not fill up with them."""


def _aside_name(path: Path) -> Path:
    """`answered.sqlite3.damaged-<unix time>`, with `-<n>` if two are set aside in a second."""
    stem = f"{path.name}.damaged-{int(time.time())}"
    aside = path.with_name(stem)
    n = 1
    while any(part.exists() for part in store_files(aside)):
        aside = path.with_name(f"{stem}-{n}")
        n += 1
    return aside


def _drop_old_copies(path: Path) -> None:
    """Keep the newest KEEP_DAMAGED set-aside stores (with their -wal and -shm)."""
    copies = [
        p
        for p in path.parent.glob(f"{path.name}.damaged-*")
        if not p.name.endswith(("-wal", "-shm"))
    ]
    copies.sort(key=lambda p: (p.stat().st_ctime_ns, p.name))
    for old in copies[:-KEEP_DAMAGED]:
        for part in store_files(old):
            part.unlink(missing_ok=True)
        log.warning("answered store: deleted the old damaged copy %s", old.name)


class AnswerStore:
    def __init__(self, path: Path | None, ttl_s: float, read_through: Path | None = None) -> None:
        """`path` None: in this process's memory. `read_through`: a store file to look replies
        up in as well, never written: the durable store of a node that can no longer write it
        (edged.service.store_place), so that a query answered before its SD card went
        read-only still gets its first answer."""
        self.path = path
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        if path is None:
            self._db = self._open(":memory:")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = self._open_or_set_aside(path)
        self._schemas: tuple[str, ...] = ("main",)
        if read_through is not None and read_through.exists():
            self._attach_read_only(read_through)

    def _open_or_set_aside(self, path: Path) -> sqlite3.Connection:
        db = None
        try:
            db = self._open(path)
            self._db = db
            self.purge()
        except sqlite3.OperationalError as exc:
            # Full, read-only or failing storage (SQLITE_FULL, _IOERR, _READONLY, _CANTOPEN):
            # nothing says the file is damaged, so it is never set aside for that.
            if db is None:
                raise
            log.warning("answered store %s: purge at start failed (%s); kept as it is", path, exc)
        except sqlite3.DatabaseError as exc:  # SQLITE_CORRUPT, SQLITE_NOTADB
            if db is not None:  # opened, but the purge found damage the read-through missed
                db.close()
            # A power cut or a failing SD card can leave the file unreadable. Refusing to start
            # would stop the alerts too (systemd restarting into the same error); the replies
            # it held are lost either way. Set it aside for a post-mortem and start empty.
            aside = _aside_name(path)
            log.error(
                "answered store %s is unreadable (%s): moved to %s, starting empty; "
                "redelivered queries answered before are generated again",
                path,
                exc,
                aside,
            )
            for part, moved in zip(store_files(path), store_files(aside), strict=True):
                if part.exists():
                    part.rename(moved)
            _drop_old_copies(path)
            db = self._open(path)
        return db

    @staticmethod
    def _open(path: Path | str) -> sqlite3.Connection:
        """The store at `path`, read through once: a damaged file raises DatabaseError here,
        not at the first lookup."""
        # One connection shared by the MQTT thread (lookups) and the worker (inserts), so a
        # lock serialises them; each statement takes well under a millisecond.
        db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, uri=True)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            # Lookups and inserts by key touch a few pages: SQLite's default 2 MiB page cache
            # only grows RSS for hours as the store grows (measured by tools/soak.py).
            db.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
            db.executescript(_SCHEMA)
            db.execute("SELECT count(*) FROM answered").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _attach_read_only(self, path: Path) -> None:
        """`mode=ro` reads a WAL store left by a crash (its -wal and -shm files exist);
        `immutable=1` one closed cleanly on a read-only file system, where SQLite could not
        create the -shm file `mode=ro` needs."""
        for flags in ("mode=ro", "immutable=1"):
            try:
                self._db.execute("ATTACH DATABASE ? AS durable", (f"file:{path}?{flags}",))
            except sqlite3.Error:
                continue
            try:
                self._db.execute("SELECT count(*) FROM durable.answered").fetchone()
            except sqlite3.Error:
                self._db.execute("DETACH DATABASE durable")
                continue
            self._schemas = ("main", "durable")
            log.info("answered store: replies stored before are read from %s", path)
            return
        log.warning("answered store: %s cannot be read either; its replies are not served", path)

    def get(self, wearer: str, query_id: str) -> StoredReply | None:
        """The stored reply, however old: only the purge forgets one. A lookup that judged age
        by the wall clock would take a clock set forward (a Pi without a real-time clock,
        corrected by NTP) for the TTL passing, and generate a redelivered query again."""
        row = None
        with self._lock:
            for schema in self._schemas:
                try:
                    row = self._db.execute(
                        "SELECT topic, payload, correlation, answered_at "
                        f"FROM {schema}.answered WHERE wearer = ? AND id = ?",
                        (wearer, query_id),
                    ).fetchone()
                except sqlite3.Error as exc:
                    if schema == "main":
                        raise
                    log.warning("answered store: reading %s failed (%s)", schema, exc)
                if row is not None:
                    break
        if row is None:
            return None
        return StoredReply(
            row[0], bytes(row[1]), bytes(row[2]) if row[2] is not None else None, row[3]
        )

    def put(
        self,
        wearer: str,
        query_id: str,
        topic: str,
        payload: bytes,
        correlation: bytes | None,
        now: float | None = None,
    ) -> None:
        """Store the final reply; the query's pending record goes in the same transaction."""
        now = time.time() if now is None else now
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO answered VALUES (?, ?, ?, ?, ?, ?)",
                    (wearer, query_id, topic, payload, correlation, now),
                )
                self._db.execute(
                    "DELETE FROM pending WHERE wearer = ? AND id = ?", (wearer, query_id)
                )
                self._db.execute("COMMIT")
            except sqlite3.Error:
                self._db.execute("ROLLBACK")
                raise

    def add_pending(
        self, wearer: str, query_id: str, work: bytes, now: float | None = None
    ) -> None:
        """Keep a queued query (edged.service.inbox) until its reply is stored."""
        now = time.time() if now is None else now
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO pending VALUES (?, ?, ?, ?)",
                (wearer, query_id, work, now),
            )

    def drop_pending(self, wearer: str, query_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM pending WHERE wearer = ? AND id = ?", (wearer, query_id))

    def pending(self) -> list[tuple[str, str, bytes]]:
        """(wearer, id, work) of every query kept and not answered, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT wearer, id, work FROM pending ORDER BY received_at"
            ).fetchall()
        return [(row[0], row[1], bytes(row[2])) for row in rows]

    def purge(self, now: float | None = None) -> int:
        """Forget replies older than the TTL, and queries kept that long unanswered."""
        now = time.time() if now is None else now
        with self._lock:
            cur = self._db.execute(
                "DELETE FROM answered WHERE answered_at < ?", (now - self.ttl_s,)
            )
            self._db.execute("DELETE FROM pending WHERE received_at < ?", (now - self.ttl_s,))
        if cur.rowcount:
            log.debug("purged %d answered queries older than %.0f s", cur.rowcount, self.ttl_s)
        return cur.rowcount

    def absorb(self, other: Path) -> int:
        """Copy in the replies of the store at `other` that this one lacks, and the queries
        it kept unanswered; how many replies."""
        with self._lock:
            self._db.execute("ATTACH DATABASE ? AS other", (str(other),))
            try:
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO answered SELECT * FROM other.answered"
                )
                copied = cur.rowcount
                tables = self._db.execute(
                    "SELECT name FROM other.sqlite_master WHERE name = 'pending'"
                ).fetchall()
                if tables:  # a store written before queries were kept has none
                    self._db.execute(
                        "INSERT OR IGNORE INTO pending SELECT p.* FROM other.pending p "
                        "WHERE NOT EXISTS (SELECT 1 FROM answered a "
                        "WHERE a.wearer = p.wearer AND a.id = p.id)"
                    )
            finally:
                self._db.execute("DETACH DATABASE other")
        return copied

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM answered").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
