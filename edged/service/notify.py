"""systemd's notify protocol (sd_notify(3)): READY, STATUS, WATCHDOG, STOPPING.

Uses `systemd.daemon.notify` from systemd-python when it is installed (the `systemd` extra);
otherwise speaks the protocol itself — one datagram per message on the AF_UNIX socket named by
$NOTIFY_SOCKET — which is all the library does. Outside systemd, every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = env.get("NOTIFY_SOCKET") or None
        self._sock: socket.socket | None = None
        self._library = None
        if self._address is not None:
            try:
                from systemd import daemon as sd_daemon  # type: ignore[attr-defined,unused-ignore]

                self._library = sd_daemon
            except ImportError:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # Never block the daemon on a notify socket whose reader is behind: a lost
                # STATUS line is harmless, a daemon stuck in sendto() is not.
                self._sock.setblocking(False)
        self.watchdog_interval_s = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *fields: str) -> None:
        if self._address is None:
            return
        message = "\n".join(fields)
        try:
            if self._library is not None:
                self._library.notify(message)
                return
            assert self._sock is not None
            # A leading "@" names a socket in the abstract namespace (sd_notify(3)).
            address = self._address
            if address.startswith("@"):
                address = "\0" + address[1:]
            self._sock.sendto(message.encode(), address)
        except BlockingIOError:
            log.warning("systemd's notify socket is full; dropped: %s", message.split("\n")[0])
        except OSError as exc:
            log.warning("cannot notify systemd at %s: %s", self._address, exc)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self, status: str = "draining") -> None:
        self.send("STOPPING=1", f"STATUS={status}")


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """How often to ping: half of WatchdogSec, as systemd recommends (sd_watchdog_enabled(3)).
    None when no watchdog is set, or it is meant for another process (WATCHDOG_PID)."""
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        return max(0.05, int(usec) / 2 / 1_000_000)
    except ValueError:
        return None
