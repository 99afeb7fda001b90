"""Shared fixtures: a real mosquitto broker per test, on a free localhost port."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edged.config.loader import parse_config
from edged.service.broker import BrokerError, PrivateBroker, find_mosquitto
from edged.service.daemon import Daemon
from tests._mqtt import TestClient, daemon_config


def _have_mosquitto() -> bool:
    try:
        find_mosquitto()
        return True
    except BrokerError:
        return False


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    if not _have_mosquitto():
        pytest.fail(
            "mosquitto is not installed: apt-get install -y mosquitto mosquitto-clients "
            "(.ci/run does this)"
        )
    workdir = tmp_path / "broker"
    workdir.mkdir()
    with PrivateBroker(workdir=workdir) as running:
        yield running


@pytest.fixture
def start_daemon(broker: PrivateBroker, tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Starts in-process daemons on the test broker, with config sections overridden; stops
    them all at teardown."""
    started: list[Daemon] = []

    def start(**sections: Any) -> Daemon:
        daemon = Daemon(parse_config(daemon_config(broker.port, tmp_path / "state", **sections)))
        started.append(daemon)
        daemon.start()
        assert daemon.wait_ready(10), "the daemon never subscribed at the broker"
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def daemon(start_daemon: Callable[..., Daemon]) -> Daemon:
    return start_daemon()


@pytest.fixture
def gateway(broker: PrivateBroker) -> Iterator[TestClient]:
    """A gateway subscribed to every wearer's and every node's topics."""
    client = TestClient(broker.port, ["edged/v1/+/#", "edged/v1/_node/+/#"])
    yield client
    client.close()
