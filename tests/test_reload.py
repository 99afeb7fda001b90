"""What a SIGHUP applies at once and what waits for a restart: a pure comparison of configs."""

from __future__ import annotations

from typing import Any

import pytest

from edged.config.loader import parse_config
from edged.config.models import EdgedConfig
from edged.service.reload import plan_reload

pytestmark = pytest.mark.arm64


def _config(**sections: dict[str, Any]) -> EdgedConfig:
    data: dict[str, Any] = {"node_id": "n1", "model": {"path": "/m"}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return parse_config(data)


def test_nothing_changed_applies_nothing() -> None:
    plan = plan_reload(_config(), _config())
    assert (plan.live, plan.restart) == ([], [])


def test_live_keys_apply_and_restart_keys_keep_their_running_values() -> None:
    running = _config()
    new = _config(
        clinical={"alert_cooldown_s": 60},
        model={"system_prompt": "Be brief.", "threads": 2},
        mqtt={"port": 8883},
    )
    plan = plan_reload(running, new)
    assert plan.live == ["clinical.alert_cooldown_s", "model.system_prompt"]
    assert plan.restart == ["model.threads", "mqtt.port"]
    assert plan.effective.clinical.alert_cooldown_s == 60
    assert plan.effective.model.system_prompt == "Be brief."
    assert plan.effective.model.threads == running.model.threads
    assert plan.effective.mqtt.port == 1883


def test_only_restart_keys_changed_keeps_the_running_config() -> None:
    running = _config()
    plan = plan_reload(running, _config(delivery={"state_dir": "/elsewhere"}))
    assert plan.live == [] and plan.restart == ["delivery.state_dir"]
    assert plan.effective is running


def test_governor_keys_are_live() -> None:
    plan = plan_reload(_config(), _config(governor={"pause_ms": 5.0, "profile": "pi5"}))
    assert plan.live == ["governor.pause_ms", "governor.profile"] and plan.restart == []
