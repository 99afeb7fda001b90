"""`edged run`: start the daemon under systemd's eye, stop it gracefully on SIGTERM/SIGINT.

READY=1 goes out only once the model is loaded and the broker connection is up; WATCHDOG=1
only while `Daemon.healthy()` holds, so a wedged inference thread or a dead MQTT loop gets the
service restarted by systemd; STOPPING=1 on SIGTERM, before the graceful drain.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

from edged.config.models import EdgedConfig
from edged.service.daemon import Daemon
from edged.service.notify import Notifier

log = logging.getLogger(__name__)
_STATUS_EVERY_S = 5.0


def _status_line(daemon: Daemon) -> str:
    connected = "connected" if daemon.transport.connected else "broker unreachable"
    return f"{daemon.state.value}, governor nominal, queue {len(daemon.scheduler)}, {connected}"


def run_daemon(config: EdgedConfig, notifier: Notifier | None = None) -> int:
    notifier = notifier or Notifier()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        # Live reload is not built yet (issue #5). Ignoring SIGHUP beats Python's default of
        # dying from it, which systemd counts as a clean exit and would not restart.
        log.warning(
            "SIGHUP: configuration reload is not implemented yet; restart the service "
            "to apply a changed config"
        )

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    notifier.status("loading model")
    daemon = Daemon(config)
    daemon.start()
    notifier.status("connecting to broker")
    wait_ready = config.service.ready_timeout_s
    started = time.monotonic()
    while not stop.is_set() and not daemon.transport.wait_connected(0.2):
        if wait_ready and time.monotonic() - started >= wait_ready:
            break
    if not stop.is_set():
        notifier.ready(_status_line(daemon))
    ping_every = notifier.watchdog_interval_s or _STATUS_EVERY_S
    last_status = 0.0
    was_healthy = True
    while not stop.wait(min(ping_every, _STATUS_EVERY_S)):
        healthy, why = daemon.healthy()
        if healthy:
            notifier.watchdog()
        elif was_healthy:
            # No ping: systemd's watchdog will restart the service (WatchdogSec).
            log.error("unhealthy, withholding the watchdog ping: %s", why)
        # STATUS on every change of health, and every few seconds otherwise.
        if healthy != was_healthy or time.monotonic() - last_status >= _STATUS_EVERY_S:
            notifier.status(_status_line(daemon) if healthy else f"unhealthy: {why}")
            last_status = time.monotonic()
        was_healthy = healthy
    notifier.stopping()
    daemon.stop()
    return 0
