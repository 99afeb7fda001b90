"""Shared fixtures: a real mosquitto broker per test, on a free localhost port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edged.service.broker import BrokerError, PrivateBroker, find_mosquitto


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
