"""Home Assistant MQTT discovery (`homeassistant.enabled`): the retained configs a real daemon
publishes on a real broker, held to HA's documented schema, with their templates rendered
against the payloads the daemon really sends."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

import jinja2
import pytest

from edged.config.loader import ConfigError, parse_config
from edged.service.broker import PrivateBroker
from edged.service.daemon import Daemon
from tests._mqtt import TestClient, daemon_config

P = "edged/v1"
HA = "homeassistant"

# HA's MQTT sensor discovery schema (home-assistant/core, components/mqtt: sensor.py
# _PLATFORM_SCHEMA_BASE on MQTT_RO_SCHEMA, schemas.py MQTT_ENTITY_COMMON_SCHEMA and
# MQTT_AVAILABILITY_SCHEMA, MQTT_ENTITY_DEVICE_INFO_SCHEMA, MQTT_ORIGIN_INFO_SCHEMA). HA refuses a
# discovery config with a key outside these, so nothing else may be sent.
SENSOR_KEYS = {
    # MQTT_RO_SCHEMA
    "state_topic", "value_template", "qos", "encoding",
    # sensor
    "device_class", "expire_after", "force_update", "last_reset_value_template", "name",
    "options", "suggested_display_precision", "state_class", "unit_of_measurement",
    # availability
    "availability", "availability_topic", "availability_template", "availability_mode",
    "payload_available", "payload_not_available",
    # entity common
    "device", "origin", "enabled_by_default", "entity_category", "entity_picture", "icon",
    "json_attributes_topic", "json_attributes_template", "default_entity_id", "unique_id",
}  # fmt: skip
AVAILABILITY_KEYS = {"topic", "value_template", "payload_available", "payload_not_available"}
DEVICE_KEYS = {
    "identifiers", "connections", "manufacturer", "model", "model_id", "name", "hw_version",
    "serial_number", "sw_version", "via_device", "suggested_area", "configuration_url",
}  # fmt: skip
ORIGIN_KEYS = {"name", "sw_version", "support_url"}
STATE_CLASSES = {"measurement", "measurement_angle", "total", "total_increasing"}
ENTITY_CATEGORIES = {"config", "diagnostic"}
# HA: "<discovery_prefix>/<component>/[<node_id>/]<object_id>/config", ids of [a-zA-Z0-9_-].
DISCOVERY_TOPIC = re.compile(r"^homeassistant/sensor/[A-Za-z0-9_-]+/[A-Za-z0-9_-]+/config$")

HIGH_RISK = {"heart_rate": 135, "spo2": 89, "resp_rate": 27, "temp_c": 39.4}


def check_ha_schema(topic: str, config: dict[str, Any]) -> None:
    """What HA's validation would reject, checked by hand (HA itself cannot run here)."""
    assert DISCOVERY_TOPIC.match(topic), topic
    assert set(config) <= SENSOR_KEYS, f"{topic}: unknown keys {set(config) - SENSOR_KEYS}"
    assert isinstance(config["state_topic"], str) and "+" not in config["state_topic"]
    assert config["unique_id"] and config["name"]
    device = config["device"]
    assert set(device) <= DEVICE_KEYS and device["identifiers"], topic
    assert set(config["origin"]) <= ORIGIN_KEYS and config["origin"]["name"]
    for item in config.get("availability", []):
        assert set(item) <= AVAILABILITY_KEYS and item["topic"], topic
    assert config.get("state_class", "measurement") in STATE_CLASSES
    assert config.get("entity_category", "diagnostic") in ENTITY_CATEGORIES
    if "options" in config:
        # HA: options only on enum sensors, and never with a unit or a state class.
        assert config["device_class"] == "enum" and config["options"]
        assert "state_class" not in config and "unit_of_measurement" not in config
    assert config.get("qos", 0) in (0, 1, 2)


def render(template: str, payload: bytes) -> str:
    """An HA value template as HA renders it for an MQTT message: `value` and `value_json`."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    text = payload.decode()
    return env.from_string(template).render(value=text, value_json=json.loads(text))


def retained_configs(port: int, expected: int, timeout: float = 10.0) -> dict[str, Any]:
    """The discovery configs retained at the broker, as HA receives them when it subscribes:
    fresh subscriptions until `expected` configs are there (or the time is up). Messages
    delivered live while a subscription is open are not counted: only the retained copy
    reaches a Home Assistant that starts later."""
    configs: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    while len(configs) < expected and time.monotonic() < deadline:
        client = TestClient(port, [f"{HA}/#"])
        try:
            configs = {r.topic: r.json() for r in client.drain(0.3) if r.retain and r.payload}
        finally:
            client.close()
    return configs


def node_topics(node: str) -> set[str]:
    objects = ("state", "governor", "temperature", "queue", "decode_rate")
    return {f"{HA}/sensor/{node}/{o}/config" for o in objects}


def wearer_topic(wearer: str) -> str:
    return f"{HA}/sensor/edged/{wearer}_alert/config"


def test_node_configs_are_published_retained_and_match_ha_schema(
    broker: PrivateBroker, start_daemon: Callable[..., Daemon]
) -> None:
    start_daemon(homeassistant={"enabled": True})
    configs = retained_configs(broker.port, 5)
    assert set(configs) == node_topics("test-node")
    for topic, config in configs.items():
        check_ha_schema(topic, config)
        assert config["device"]["identifiers"] == ["edged_test-node"]
        assert config["device"]["model"] == "tiny-qwen3-int4"
    assert len({c["unique_id"] for c in configs.values()}) == 5


def test_node_sensor_templates_read_the_real_status(
    broker: PrivateBroker, start_daemon: Callable[..., Daemon]
) -> None:
    watcher = TestClient(broker.port, [f"{P}/_node/+/status"])
    try:
        start_daemon(homeassistant={"enabled": True})
        status = watcher.wait_for(lambda r: b'"online"' in r.payload).payload
        configs = retained_configs(broker.port, 5)
    finally:
        watcher.close()
    body = json.loads(status)
    by_object = {t.split("/")[3]: c for t, c in configs.items()}
    assert render(by_object["state"]["value_template"], status) == "online"
    assert render(by_object["governor"]["value_template"], status) == body["governor"]
    assert render(by_object["queue"]["value_template"], status) == "0"
    # No thermal zone here and no answer yet: JSON null renders "None", which HA reads as
    # "unknown" (its MQTT PAYLOAD_NONE), not as a number it cannot parse.
    assert render(by_object["temperature"]["value_template"], status) == "None"
    assert render(by_object["decode_rate"]["value_template"], status) == "None"
    for obj in ("governor", "temperature", "queue", "decode_rate"):
        (availability,) = by_object[obj]["availability"]
        assert availability["topic"] == f"{P}/_node/test-node/status"
        assert render(availability["value_template"], status) == "online"
        # The Last Will carries `state` alone: the entities must go unavailable on it.
        assert render(availability["value_template"], b'{"state":"offline"}') == "offline"
        assert render(availability["value_template"], b'{"state":"draining"}') == "offline"
    assert "availability" not in by_object["state"]  # it is the one that shows "offline"


def test_a_wearer_seen_gets_an_alert_sensor_fed_by_its_alerts(
    broker: PrivateBroker, start_daemon: Callable[..., Daemon], gateway: TestClient
) -> None:
    start_daemon(homeassistant={"enabled": True})
    alerts = TestClient(broker.port, [f"{P}/+/alert"])
    try:
        gateway.publish(f"{P}/bed-12/vitals", {"ts": time.time(), **HIGH_RISK})
        alert = alerts.wait_for(lambda r: r.topic.endswith("/alert")).payload
    finally:
        alerts.close()
    configs = retained_configs(broker.port, 6)
    config = configs[wearer_topic("bed-12")]
    check_ha_schema(wearer_topic("bed-12"), config)
    assert config["state_topic"] == config["json_attributes_topic"] == f"{P}/bed-12/alert"
    body = json.loads(alert)
    assert render(config["value_template"], alert) == body["severity"] == "high"
    assert body["severity"] in config["options"]
    attributes = json.loads(render(config["json_attributes_template"], alert))
    assert attributes["news2"] == body["news2"]["score"]
    assert attributes["red_flags"] == body["red_flags"]
    assert attributes["alert_id"] == body["alert_id"]


def test_every_config_is_published_again_after_a_broker_restart(
    broker: PrivateBroker, start_daemon: Callable[..., Daemon], gateway: TestClient
) -> None:
    daemon = start_daemon(homeassistant={"enabled": True})
    gateway.publish(f"{P}/bed-7/vitals", {"ts": time.time(), "heart_rate": 72})
    expected = node_topics("test-node") | {wearer_topic("bed-7")}
    assert set(retained_configs(broker.port, 6)) == expected
    # Wipe them at the broker (an empty retained message deletes one), as a broker without
    # persistence would lose them, then restart it: the daemon must send them all again.
    for topic in expected:
        gateway.publish(topic, b"", retain=True)
    assert retained_configs(broker.port, 1, timeout=1.0) == {}
    broker.restart()
    assert set(retained_configs(broker.port, 6, timeout=20.0)) == expected
    assert daemon.metrics().ready


def test_discovery_is_off_by_default(
    broker: PrivateBroker, daemon: Daemon, gateway: TestClient
) -> None:
    gateway.publish(f"{P}/bed-1/vitals", {"ts": time.time(), **HIGH_RISK})
    gateway.wait_for(lambda r: r.topic.endswith("/alert") or r.topic.endswith("/error"))
    assert retained_configs(broker.port, 1, timeout=1.5) == {}


@pytest.mark.parametrize("prefix", ["", "home/+", "#", "/ha"])
def test_a_discovery_prefix_that_is_not_a_topic_is_a_config_error(prefix: str) -> None:
    config = daemon_config(1883, "/tmp/x", homeassistant={"discovery_prefix": prefix})
    with pytest.raises(ConfigError, match="homeassistant.discovery_prefix"):
        parse_config(config)
