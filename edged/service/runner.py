"""`edged run`: start the daemon, stop it gracefully on SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from edged.config.models import EdgedConfig
from edged.service.daemon import Daemon

log = logging.getLogger(__name__)


def run_daemon(config: EdgedConfig) -> int:
    daemon = Daemon(config)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    daemon.start()
    while not stop.wait(1.0):
        pass
    daemon.stop()
    return 0
