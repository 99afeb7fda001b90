"""Home Assistant MQTT discovery: the retained configs that make a node and its wearers appear
as devices in Home Assistant (opt-in, `homeassistant.enabled`).

Pure builders: each returns `(topic, config)` pairs; the service layer publishes them. Every
entity reads a topic edged already publishes (the node status, a wearer's alerts), so enabling
discovery changes nothing on the `{prefix}` topics (API.md, Additions in v1.1).

Key names are those of HA's MQTT sensor schema (homeassistant/components/mqtt/sensor.py and
schemas.py: MQTT_RO_SCHEMA, MQTT_ENTITY_COMMON_SCHEMA, the device and origin schemas); HA
rejects a discovery config with a key it does not know, so tests hold every config to that list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, get_args

from edged.domain import GovernorState, NodeState, Severity
from edged.mqtt.topics import Topics

Discovery = tuple[str, dict[str, Any]]
"""A discovery topic and the config published there, retained."""

ORIGIN_NAME = "edged"
# A node that is degraded still answers (with triage alone): it is available.
_AVAILABLE_STATES = (NodeState.ONLINE.value, NodeState.DEGRADED.value)
_AVAILABILITY_TEMPLATE = (
    "{{ 'online' if value_json.state in " + repr(_AVAILABLE_STATES) + " else 'offline' }}"
)
# HA's MQTT entities read a template that renders "None" (a JSON null) as "unknown".
_ALERT_ATTRIBUTES = (
    "{{ {'news2': value_json.news2.score, 'risk': value_json.news2.risk, "
    "'missing': value_json.news2.missing, 'red_flags': value_json.red_flags, "
    "'message': value_json.message, 'alert_id': value_json.alert_id, "
    "'ts': value_json.ts} | tojson }}"
)
PUBLISHED_STATES = tuple(s.value for s in NodeState if s is not NodeState.STARTING)
"""The states a status payload carries (API.md); `starting` is internal."""
_NOT_IN_OBJECT_ID = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class NodeSensor:
    object_id: str
    name: str
    field: str
    """The status payload's field this sensor shows."""
    extra: tuple[tuple[str, Any], ...] = ()


NODE_SENSORS = (
    # `state` has no availability: it is the one that should read "offline".
    NodeSensor(
        "state",
        "State",
        "state",
        (("device_class", "enum"), ("options", list(PUBLISHED_STATES))),
    ),
    NodeSensor(
        "governor",
        "Governor",
        "governor",
        (
            ("device_class", "enum"),
            ("options", [g.value for g in GovernorState]),
            ("entity_category", "diagnostic"),
        ),
    ),
    NodeSensor(
        "temperature",
        "CPU temperature",
        "temp_c",
        (
            ("device_class", "temperature"),
            ("unit_of_measurement", "°C"),
            ("state_class", "measurement"),
            ("entity_category", "diagnostic"),
        ),
    ),
    NodeSensor(
        "queue",
        "Queued queries",
        "queue",
        (("state_class", "measurement"), ("icon", "mdi:tray-full")),
    ),
    NodeSensor(
        "decode_rate",
        "Decode rate",
        "decode_tps",
        (
            ("unit_of_measurement", "tok/s"),
            ("state_class", "measurement"),
            ("suggested_display_precision", 1),
            ("entity_category", "diagnostic"),
            ("icon", "mdi:speedometer"),
        ),
    ),
)


def object_id(text: str) -> str:
    """`text` as a discovery topic level and id part: HA allows [A-Za-z0-9_-] there."""
    return _NOT_IN_OBJECT_ID.sub("_", text)


@dataclass(frozen=True)
class DiscoveryConfigs:
    """The configs of one node under one discovery prefix."""

    topics: Topics
    node_id: str
    topic_prefix: str
    discovery_prefix: str
    version: str
    model: str | None

    def node(self) -> list[Discovery]:
        return [self._node_sensor(sensor) for sensor in NODE_SENSORS]

    def _node_sensor(self, sensor: NodeSensor) -> Discovery:
        status = self.topics.status()
        config: dict[str, Any] = {
            "name": sensor.name,
            "unique_id": f"edged_{self.node_id}_{sensor.object_id}",
            "state_topic": status,
            "value_template": "{{ value_json." + sensor.field + " }}",
            "qos": 1,
            "device": self._node_device(),
            "origin": self._origin(),
            **dict(sensor.extra),
        }
        if sensor.object_id != "state":
            config["availability"] = [{"topic": status, "value_template": _AVAILABILITY_TEMPLATE}]
        return self._topic(self.node_id, sensor.object_id), config

    def wearer(self, wearer: str) -> Discovery:
        """The wearer's alert sensor: its state is the last alert's severity. Keyed by the topic
        prefix, not by this node, so every node of a deployment publishes the same config and
        Home Assistant sees one entity per wearer, whichever node raised the alert."""
        deployment = object_id(self.topic_prefix)
        alerts = self.topics.alert(wearer)
        config: dict[str, Any] = {
            "name": "Alert",
            "unique_id": f"edged_{deployment}_{wearer}_alert",
            "state_topic": alerts,
            "value_template": "{{ value_json.severity }}",
            "json_attributes_topic": alerts,
            "json_attributes_template": _ALERT_ATTRIBUTES,
            "device_class": "enum",
            "options": list(get_args(Severity)),
            "qos": 1,
            "icon": "mdi:heart-pulse",
            "device": {
                "identifiers": [f"edged_{deployment}_wearer_{wearer}"],
                "name": f"Wearer {wearer}",
                "manufacturer": ORIGIN_NAME,
                "model": "wearer",
            },
            "origin": self._origin(),
        }
        return self._topic(deployment, f"{wearer}_alert"), config

    def _topic(self, node: str, obj: str) -> str:
        return f"{self.discovery_prefix}/sensor/{node}/{obj}/config"

    def _node_device(self) -> dict[str, Any]:
        device: dict[str, Any] = {
            "identifiers": [f"edged_{self.node_id}"],
            "name": f"edged {self.node_id}",
            "manufacturer": ORIGIN_NAME,
            "sw_version": self.version,
        }
        if self.model is not None:
            device["model"] = self.model
        return device

    def _origin(self) -> dict[str, Any]:
        return {"name": ORIGIN_NAME, "sw_version": self.version}
