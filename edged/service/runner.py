"""`edged run`: start the daemon under systemd's eye, stop it gracefully on SIGTERM/SIGINT.

READY=1 goes out only once the model is loaded and the broker has acknowledged the
subscriptions (or after service.ready_timeout_s without a broker); WATCHDOG=1
only while `Daemon.healthy()` holds, so a wedged inference thread or a dead MQTT loop gets the
service restarted by systemd; STOPPING=1 on SIGTERM, before the graceful drain; RELOADING=1
then READY=1 around a SIGHUP reload.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

from edged.config.loader import ConfigError
from edged.config.models import EdgedConfig
from edged.service.daemon import Daemon
from edged.service.notify import Notifier

log = logging.getLogger(__name__)
_STATUS_EVERY_S = 5.0


def _status_line(daemon: Daemon) -> str:
    return daemon.metrics().status_line()


def _reload(daemon: Daemon, load: Callable[[], EdgedConfig], notifier: Notifier) -> None:
    notifier.send("RELOADING=1")
    try:
        new = load()
    except ConfigError as exc:
        first = str(exc).splitlines()[0]
        log.error("reload failed, still running on the previous configuration: %s", exc)
        daemon.publish_node_error(
            f"configuration reload failed; still running on the previous configuration: {first}"
        )
    else:
        live, restart = daemon.apply_config(new)
        log.info(
            "reloaded: %d key(s) applied%s", len(live), f" ({', '.join(live)})" if live else ""
        )
        if restart:
            log.warning(
                "reload: %s changed but take(s) effect only after a restart", ", ".join(restart)
            )
    notifier.send("READY=1", f"STATUS={_status_line(daemon)}")


def run_daemon(
    config: EdgedConfig,
    notifier: Notifier | None = None,
    load: Callable[[], EdgedConfig] | None = None,
) -> int:
    """Run until SIGTERM/SIGINT. SIGHUP re-reads the config with `load` and applies what can
    change live; an invalid file leaves the running configuration in place."""
    notifier = notifier or Notifier()
    stop = threading.Event()
    reload = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        reload.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    notifier.status("loading model")
    daemon = Daemon(config)
    daemon.start()
    notifier.status("connecting to broker")
    wait_ready = config.service.ready_timeout_s
    started = time.monotonic()
    while not stop.is_set() and not daemon.wait_ready(0.2):
        if wait_ready and time.monotonic() - started >= wait_ready:
            break
    if not stop.is_set():
        notifier.ready(_status_line(daemon))
    ping_every = notifier.watchdog_interval_s or _STATUS_EVERY_S
    last_status = 0.0
    was_healthy = True
    while not stop.wait(min(ping_every, 1.0)):
        if reload.is_set():
            reload.clear()
            if load is None:
                log.warning("SIGHUP: no configuration source to reload from")
            else:
                _reload(daemon, load, notifier)
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
