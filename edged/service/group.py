"""A share group (`mqtt.share_group`): several nodes on one broker serving as one.

Queries are spread by the broker (an MQTT 5 shared subscription, on a connection of the node's
own, see `query_link`); vitals reach every node, and each wearer's alerts are published by one
live member only, chosen by rendezvous (highest-random-weight) hashing of the wearer id over the
members. Membership is read from the retained node statuses: a member is live while its status
says `online` or `degraded`, names this group and is fresh. When a member leaves (its Last Will,
a graceful stop, or a status gone stale) only its own wearers move, each to the member that
scores highest among those left; the others keep their owner (Thaler and Ravishankar, "Using
name-based mappings to increase hit rates", IEEE/ACM ToN 1998).

The membership is owned by the main connection's network thread: statuses and vitals both
arrive there, so it needs no lock.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from edged.config.models import EdgedConfig
from edged.domain import NodeState
from edged.mqtt.topics import Topics
from edged.mqtt.transport import InboundMessage, MqttTransport
from edged.service.outcomes import Publish

log = logging.getLogger(__name__)

LIVE_STATES = (NodeState.ONLINE.value, NodeState.DEGRADED.value)
"""A degraded member still answers (triage alone) and still raises alerts."""
ALERT_SLACK_S = 2.0
"""A backup waits one status period and this much for a sign of life from the owner (its copy
of the alert, or any status) before publishing the alert itself: slack for a loaded board."""
STALE_PERIODS = 2.0
"""A member whose last status is older than this many status periods (plus a second of
slack) has left: it stopped without its Last Will reaching us. Its age runs on this node's
monotonic clock from the status' arrival, so that a wall clock set forward does not make every
other member stale at once, nor one set back keep a silent member live for as long. Only a
retained copy (sent at subscribe time, maybe long after it was published) is aged by its `ts`,
against this node's wall clock, once."""


def _age(status: MemberStatus, retained_at: float | None) -> float:
    """How old a status is as it arrives: 0 as published; a retained copy by its `ts` (none
    from the future: the sender's clock may be ahead)."""
    if retained_at is None or status.ts is None:
        return 0.0
    return max(retained_at - status.ts, 0.0)


def rendezvous_rank(wearer: str, nodes: Iterable[str]) -> list[str]:
    """`nodes` by their hash of (node, wearer), highest first: the first owns the wearer, the
    second is its backup. Every member computes the same order from the same set of nodes."""
    scored = (
        (hashlib.blake2b(f"{node}\x00{wearer}".encode(), digest_size=8).digest(), node)
        for node in nodes
    )
    return [node for _, node in sorted(scored, reverse=True)]


def rendezvous_owner(wearer: str, nodes: Iterable[str]) -> str | None:
    ranked = rendezvous_rank(wearer, nodes)
    return ranked[0] if ranked else None


@dataclass(frozen=True)
class MemberStatus:
    group: str | None
    state: str
    ts: float | None
    """The status' own time (UNIX seconds): how fresh it is."""


def read_status(payload: bytes) -> MemberStatus | None:
    """A node status (API.md) as far as membership needs it; None for an unreadable one, or
    an empty retained message (a status deleted at the broker)."""
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict) or not isinstance(body.get("state"), str):
        return None
    group, ts = body.get("group"), body.get("ts")
    return MemberStatus(
        group if isinstance(group, str) else None,
        body["state"],
        float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) else None,
    )


class GroupMembership:
    """This node's view of its group, from the node statuses it has read."""

    def __init__(self, group: str, me: str, status_interval_s: float) -> None:
        self.group = group
        self.me = me
        self.stale_after_s = STALE_PERIODS * status_interval_s + 1.0
        self._members: dict[str, tuple[MemberStatus, float]] = {}
        """Per member, its last status and the monotonic time that status goes stale."""
        self.backup = AlertBackup(status_interval_s + ALERT_SLACK_S)

    def observe(
        self, node: str, payload: bytes, now: float, retained_at: float | None = None
    ) -> list[Publish]:
        """Record `node`'s status (`now`: time.monotonic(); `retained_at`: time.time() when
        this is a retained copy, None for a status as it is published); the alerts this node
        held as its backup and no longer needs to publish, when the status shows the owner
        alive."""
        status = read_status(payload)
        entry = self._members.pop(node, None) if status is None else self._members.get(node)
        before = entry[0] if entry else None
        if status is not None:
            fresh_until = now + self.stale_after_s - _age(status, retained_at)
            self._members[node] = (status, fresh_until)
        if node != self.me and self._member(before) != self._member(status):
            # One line per change, for the operator (and for tests to wait on).
            joined = "joined" if self._member(status) else "left"
            log.info("share group %s: %s %s", self.group, node, joined)
        if status is None:
            return []
        # A retained copy (resent as this node subscribes again, after a reconnect) may be from
        # before the alerts were held: only a status as it is published is a sign of life.
        alive = status.state in LIVE_STATES and retained_at is None
        return self.backup.alive(node, now) if alive else []

    def _member(self, status: MemberStatus | None) -> bool:
        return status is not None and status.group == self.group and status.state in LIVE_STATES

    def live(self, now: float) -> list[str]:
        """The live members at `now` (time.monotonic()), this node always among them (it is
        running this code)."""
        nodes = [self.me]
        # A copy: the metrics snapshot reads this from another thread (dict() is atomic).
        for node, (status, fresh_until) in dict(self._members).items():
            if node == self.me or status.group != self.group or status.state not in LIVE_STATES:
                continue
            if now > fresh_until:
                continue
            nodes.append(node)
        return nodes

    def role(self, wearer: str, now: float) -> tuple[str, str]:
        """(`owner`, this node): it publishes `wearer`'s alerts; (`backup`, the owner): it
        publishes them only if the owner shows no sign of life (it may have died without its
        Last Will reaching the broker yet); (`none`, the owner). `now`: time.monotonic()."""
        ranked = rendezvous_rank(wearer, self.live(now))
        if ranked[0] == self.me:
            return "owner", self.me
        return ("backup" if ranked[1:2] == [self.me] else "none"), ranked[0]


@dataclass(frozen=True)
class HeldAlert:
    deadline: float
    alert: Publish
    owner: str
    since: float


class AlertBackup:
    """Alerts this node holds as a wearer's backup, by alert_id, until the owner shows it is
    alive: its copy of the alert (the same summary gives the same alert_id), or a status
    received after the alert was held (an owner that stays silent on purpose, because the
    wearer is in its alert cooldown, still publishes its status every period). With no sign
    within `grace_s` the owner is presumed dead and the backup publishes. A duplicate (the
    owner was only slow) carries the same alert_id, and consumers drop it; a lost alert
    cannot be dropped back in.

    Like the membership that holds it, used on the main connection's network thread only.
    """

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self._held: dict[str, HeldAlert] = {}
        self._seen: dict[str, float] = {}
        """Alert ids seen before this node held them (the owner was faster), until when."""

    def hold(self, alert_id: str, alert: Publish, owner: str, now: float) -> bool:
        """Hold `alert`; False when the owner's copy was already seen (nothing to hold)."""
        if self._seen.pop(alert_id, None) is not None:
            return False
        self._held.setdefault(alert_id, HeldAlert(now + self.grace_s, alert, owner, now))
        return True

    def alive(self, owner: str, now: float) -> list[Publish]:
        """`owner` published a status: the alerts held for it before now, released."""
        done = [k for k, h in self._held.items() if h.owner == owner and h.since < now]
        return [self._held.pop(k).alert for k in done]

    def seen(self, alert_id: str, now: float) -> Publish | None:
        """The owner's copy arrived: the held alert, to acknowledge its summary, or None (then
        remembered for a while, in case this node's own copy of the summary comes later)."""
        held = self._held.pop(alert_id, None)
        if held is None:
            self._seen[alert_id] = now + 10 * self.grace_s
            if len(self._seen) > 1000:  # bounded: the expired go first
                for key in [k for k, until in self._seen.items() if until <= now]:
                    del self._seen[key]
        return held.alert if held else None

    def due(self, now: float) -> list[Publish]:
        """Held alerts whose owner showed no sign of life in time: to publish now."""
        late = [k for k, h in self._held.items() if h.deadline <= now]
        return [self._held.pop(k).alert for k in late]


def query_link(
    config: EdgedConfig, topics: Topics, on_message: Callable[[InboundMessage], None]
) -> MqttTransport | None:
    """The share group's query connection, or None outside a group.

    Queries are held unacknowledged until answered (API.md, Delivery), so on the main
    connection they would fill its window of unacknowledged QoS 1 messages and stop the vitals
    and cancels behind them (measured: docs/scale-out-mosquitto.md, Q5). On a connection of
    their own, a Receive Maximum of one running query plus the queue keeps the rest at a broker
    that honours it instead of a `busy` reply (mosquitto 2.0.11 sends past it once the client
    acknowledges). Its session persists like the main one: mosquitto keeps
    giving a dead member its share of the queries until that client id comes back
    (docs/scale-out.md).
    """
    group = config.mqtt.share_group
    if group is None:
        return None
    return MqttTransport(
        config.mqtt,
        f"{config.client_id}-queries",
        topics.shared_queries(group),
        will=None,
        on_message=on_message,
        receive_maximum=config.limits.queue_size + 1,
    )
