"""The topic contract (v1): every topic edged subscribes or publishes to, and which are allowed.

    {prefix}/v1/{wearer}/vitals | query | cancel      inbound
    {prefix}/v1/{wearer}/advice | alert | error       outbound, per wearer
    {prefix}/v1/_node/{node}/status | error           outbound, per daemon

`_node` starts with `_`, which the wearer pattern forbids, so node topics never collide with a
wearer's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from edged.domain import WEARER_PATTERN, default_node_id, is_valid_wearer
from edged.mqtt.errors import ErrorCode, ProtocolError, show_value

MAX_TOPIC_CHARS = 1024
"""Longest reply topic accepted (MQTT allows 65535 bytes; no sane client needs more than this)."""

NODE_LEVEL = "_node"
InboundKind = Literal["vitals", "query", "cancel"]
INBOUND_KINDS: tuple[InboundKind, ...] = ("vitals", "query", "cancel")
_KIND_OF_LEVEL: dict[str, InboundKind] = {kind: kind for kind in INBOUND_KINDS}


@dataclass(frozen=True)
class Inbound:
    """Where an inbound message came from: the wearer and what kind of message it is."""

    wearer: str
    kind: InboundKind


@dataclass(frozen=True)
class Topics:
    """All topic names for one daemon; `parse` and `reply_allowed` guard the inbound side."""

    prefix: str = "edged"
    """First level(s) of every topic; may hold several levels (`hospital/ward3`)."""
    node: str = field(default_factory=default_node_id)
    """This daemon's id; by default the sanitised host name."""
    _base: str = field(init=False, repr=False, compare=False)
    _node_base: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        prefix = self.prefix
        if (
            not prefix
            or "" in prefix.split("/")
            or any(c in prefix for c in "+#\x00")
            or prefix.startswith("$")
        ):
            raise ValueError(
                f"prefix = {show_value(prefix)} must be one or more non-empty topic levels "
                "without wildcards (+ #), NUL or a leading $"
            )
        if not is_valid_wearer(self.node):
            raise ValueError(f"node = {show_value(self.node)} does not match {WEARER_PATTERN}")
        base = f"{prefix}/v1/"
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_node_base", f"{base}{NODE_LEVEL}")

    def subscriptions(self, share_group: str | None = None) -> list[tuple[str, int]]:
        """(topic filter, QoS) pairs the daemon subscribes to. In a share group, queries come
        on a connection of their own (`shared_queries`) and the node statuses are read to
        know the group's live members."""
        if share_group is None:
            return [(f"{self._base}+/{kind}", 1) for kind in INBOUND_KINDS]
        return [
            (f"{self._base}+/vitals", 1),
            (f"{self._base}+/cancel", 1),
            (f"{self._node_base}/+/status", 1),
            # The owners' alerts, seen by their backups (service/group.py, AlertBackup); QoS 0:
            # one missed is at worst a duplicate with the same alert_id.
            (f"{self._base}+/alert", 0),
        ]

    def shared_queries(self, share_group: str) -> list[tuple[str, int]]:
        """The share group's query subscription (API.md v1.1, share groups)."""
        return [(f"$share/{share_group}/{self._base}+/query", 1)]

    def is_alert(self, topic: str) -> bool:
        return (
            topic.startswith(self._base)
            and topic.endswith("/alert")
            and topic.count("/") == (self._base.count("/") + 1)
        )

    def status_node(self, topic: str) -> str | None:
        """The node whose status `topic` is, or None when it is not a node status topic."""
        prefix = self._node_base + "/"
        if not topic.startswith(prefix) or not topic.endswith("/status"):
            return None
        node = topic[len(prefix) : -len("/status")]
        return node if is_valid_wearer(node) else None

    def parse(self, topic: str) -> Inbound:
        """The wearer and kind of an inbound topic.

        Raises ProtocolError: `invalid_wearer` when the wearer level breaks `WEARER_PATTERN`,
        `invalid_schema` when the topic is not one of the three inbound topics at all.
        """
        base = self._base
        if topic.startswith(base):
            levels = topic[len(base) :].split("/")
            kind = _KIND_OF_LEVEL.get(levels[-1])
            if len(levels) == 2 and kind is not None:
                wearer = levels[0]
                if not is_valid_wearer(wearer):
                    raise ProtocolError(
                        ErrorCode.INVALID_WEARER,
                        f"wearer {show_value(wearer)} does not match {WEARER_PATTERN}",
                    )
                return Inbound(wearer, kind)
        raise ProtocolError(
            ErrorCode.INVALID_SCHEMA,
            f"topic {show_value(topic)} is not {base}<wearer>/vitals, /query or /cancel",
        )

    def advice(self, wearer: str) -> str:
        """Default reply topic of a query (`wearer` is trusted: it came from `parse`)."""
        return f"{self._base}{wearer}/advice"

    def error(self, wearer: str) -> str:
        return f"{self._base}{wearer}/error"

    def alert(self, wearer: str) -> str:
        return f"{self._base}{wearer}/alert"

    def status(self) -> str:
        """Retained node status; also the Last Will topic."""
        return f"{self._node_base}/{self.node}/status"

    def node_error(self) -> str:
        """Errors that cannot be tied to a wearer (e.g. `invalid_wearer`)."""
        return f"{self._node_base}/{self.node}/error"

    @staticmethod
    def stream(reply_topic: str) -> str:
        """Where streamed chunks of a reply go."""
        return reply_topic + "/stream"

    def reply_allowed(self, wearer: str, topic: str, allow_foreign: bool) -> bool:
        """Whether a query's Response Topic or `reply_to` may be published to.

        Allowed: a topic strictly below `{prefix}/v1/{wearer}/` (not that level itself), or any
        topic when `allow_foreign` is set. Never allowed, whatever the flag: wildcards (+ #),
        NUL, empty levels (a leading, trailing or double `/`), `$` topics, more than
        `MAX_TOPIC_CHARS` characters, text that is not encodable as UTF-8, anything under
        `{prefix}/v1/_node`, and any topic edged itself subscribes to (`{prefix}/v1/+/query`
        and the like), which would feed replies back in as requests.
        """
        if not isinstance(topic, str) or not 0 < len(topic) <= MAX_TOPIC_CHARS:
            return False
        if "+" in topic or "#" in topic or "\x00" in topic or topic.startswith("$"):
            return False
        if "//" in topic or topic.startswith("/") or topic.endswith("/"):
            return False
        if not topic.isascii():
            try:
                topic.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate from a JSON \ud800 escape
                return False
        base = self._base
        node_base = self._node_base
        if topic == node_base or topic.startswith(node_base + "/"):
            return False
        if topic.startswith(base):
            levels = topic[len(base) :].split("/")
            if len(levels) == 2 and levels[1] in _KIND_OF_LEVEL:
                return False
        return allow_foreign or topic.startswith(f"{base}{wearer}/")
