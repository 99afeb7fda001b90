"""systemd's side of the notify protocol, for the tests: a unix datagram socket that reads
sd_notify messages all the time, as systemd does."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path


class FakeSystemd:
    """Reads sd_notify datagrams all the time, as systemd does, into a list."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[str] = []
        self.stamped: list[tuple[float, str]] = []
        """Every field with the time.monotonic() it arrived at."""
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                fields = self.sock.recv(4096).decode().split("\n")
            except (TimeoutError, OSError):
                continue
            now = time.monotonic()
            with self._lock:
                self.messages.extend(fields)
                self.stamped.extend((now, f) for f in fields)

    def collect(self, seconds: float) -> list[str]:
        """The messages that arrive within the next `seconds`."""
        with self._lock:
            start = len(self.messages)
        time.sleep(seconds)
        with self._lock:
            return self.messages[start:]

    def wait_for(self, field: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while field not in self.messages and time.monotonic() < deadline:
            self.collect(0.2)
        assert field in self.messages, f"no {field} within {timeout} s: {self.messages}"

    def close(self) -> None:
        self._closed.set()
        self._reader.join(2)
        self.sock.close()
