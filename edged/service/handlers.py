"""Inbound messages to outcomes: broker -> validate -> (score | hand to delivery).

Each handler takes one message and the state it reads (the config snapshot, the vitals
windows) and *returns* what should happen — publish this, acknowledge that, accept this query
— without touching the transport; the Dispatcher carries the outcomes out. Vitals are scored
here, on the network thread, the moment they arrive: the alert path never waits for the model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from edged.clinical.alerts import AlertGate
from edged.clinical.state import VitalsState
from edged.clinical.triage import assess
from edged.config.models import EdgedConfig
from edged.mqtt.errors import ProtocolError
from edged.mqtt.fhir import parse_fhir_vitals
from edged.mqtt.messages import decode_payload, parse_cancel, parse_query, parse_vitals
from edged.mqtt.payloads import alert_id, alert_payload, encode
from edged.mqtt.routing import error_route, reply_route, unreadable_route
from edged.mqtt.topics import Topics
from edged.mqtt.transport import AckToken, InboundMessage
from edged.service.group import GroupMembership
from edged.service.outcomes import (
    Accept,
    Ack,
    AlertSeen,
    CancelQuery,
    Count,
    HoldAlert,
    Outcome,
    Publish,
    WearerSeen,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InboundContext:
    """What the handlers read besides the message (built once per config snapshot)."""

    topics: Topics
    config: EdgedConfig
    """The snapshot current when the message arrived."""
    vitals: VitalsState
    alerts: AlertGate
    membership: GroupMembership | None = None
    """The share group's members (mqtt.share_group), None outside a group."""


# Outcomes that carry no data are shared, not built per message (the vitals path is hot).
_VITALS, _QUERIES = Count("vitals"), Count("queries")


def error_reply(
    topic: str, error: ProtocolError, correlation: bytes | None, ack: AckToken
) -> list[Outcome]:
    """An error reply, and the message it answers acknowledged once the broker has it."""
    log.info("error %s on %s (field %s)", error.code.value, topic, error.field)
    payload = encode(error.payload())
    count = Count("errors", label=error.code.value)
    return [Publish(topic, payload, correlation=correlation, ack_after=(ack,)), count]


def handle(
    msg: InboundMessage, ctx: InboundContext, wall_time: float, monotonic: float
) -> list[Outcome]:
    """The outcomes of one message received at `wall_time` (time.time(): what a summary's `ts`
    is checked against) and `monotonic` (time.monotonic(): deadlines, the vitals window and the
    alert cooldown count from there, so setting the wall clock cannot move them)."""
    if ctx.membership is not None:
        group_outcomes = handle_group(msg, ctx, ctx.membership, wall_time, monotonic)
        if group_outcomes is not None:
            return group_outcomes
    try:
        inbound = ctx.topics.parse(msg.topic)
    except ProtocolError as err:
        return error_reply(ctx.topics.node_error(), err, msg.correlation_data, msg.ack)
    if inbound.kind == "vitals":
        return handle_vitals(inbound.wearer, msg, ctx, wall_time, monotonic)
    if inbound.kind == "cancel":
        return handle_cancel(inbound.wearer, msg, ctx)
    return handle_query(inbound.wearer, msg, ctx, monotonic)


def handle_vitals(
    wearer: str,
    msg: InboundMessage,
    ctx: InboundContext,
    now: float,
    monotonic: float,
) -> list[Outcome]:
    """`now`: the wall clock, which summaries' `ts` are measured on; `monotonic`: the clock the
    vitals window and the alert cooldown run on (time.monotonic()). On the wall clock, setting
    it back would silence a wearer's alerts and keep stale readings in the window until it
    caught up, and setting it forward would empty the window."""
    try:
        limit = ctx.config.limits.max_message_bytes
        obj = decode_payload(msg.payload, limit)
        # Contract v1.1: a FHIR resource (Observation or Bundle) is told apart by resourceType.
        parse = parse_fhir_vitals if "resourceType" in obj else parse_vitals
        vitals = parse(obj, now=now)
    except ProtocolError as err:
        return error_reply(ctx.topics.error(wearer), err, msg.correlation_data, msg.ack)
    summary = ctx.vitals.add(wearer, vitals, monotonic)
    triage = assess(summary, ctx.config.clinical.red_flags)
    seen = [WearerSeen(wearer)] if ctx.config.homeassistant.enabled else []
    if not ctx.alerts.check(wearer, triage, monotonic):
        return [_VITALS, *seen, Ack(msg.ack)]
    role, owner = ctx.membership.role(wearer, monotonic) if ctx.membership else ("owner", "")
    if role == "none":
        # Another member raises it; this one keeps the same alert memory (cooldown) so that
        # if the wearer moves here it goes on where the owner left off.
        return [_VITALS, *seen, Ack(msg.ack)]
    # Acknowledged only once the alert is safe at the broker: a crash in between means the
    # summary is redelivered and the alert raised again (same alert_id), never lost.
    body = alert_payload(
        wearer,
        vitals.ts,
        triage,
        alert_id=alert_id(wearer, msg.payload),
        node=ctx.topics.node,
    )
    publish = Publish(ctx.topics.alert(wearer), encode(body), ack_after=(msg.ack,))
    if role == "backup":
        return [_VITALS, *seen, HoldAlert(body["alert_id"], publish, owner)]
    log.info("alert for %s: severity %s", wearer, triage.severity)
    return [_VITALS, Count("alerts", label=triage.severity), *seen, publish]


def handle_group(
    msg: InboundMessage,
    ctx: InboundContext,
    membership: GroupMembership,
    wall_time: float,
    monotonic: float,
) -> list[Outcome] | None:
    """A share group's own traffic: a member's status, or an alert (seen by its backup); None
    for any other message."""
    node = ctx.topics.status_node(msg.topic)
    if node is not None:
        # The owner is alive: what this node held as its backup is the owner's to raise (or
        # to withhold, in its cooldown); the summaries behind them are acknowledged.
        retained_at = wall_time if msg.retain else None
        released = membership.observe(node, msg.payload, monotonic, retained_at)
        return [Ack(msg.ack), *(Ack(t) for alert in released for t in alert.ack_after)]
    if ctx.topics.is_alert(msg.topic):
        try:
            seen = json.loads(msg.payload).get("alert_id")
        except (ValueError, AttributeError, UnicodeDecodeError):
            seen = None
        return [AlertSeen(seen)] if isinstance(seen, str) else []
    return None


def handle_cancel(wearer: str, msg: InboundMessage, ctx: InboundContext) -> list[Outcome]:
    try:
        limit = ctx.config.limits.max_message_bytes
        cancel = parse_cancel(decode_payload(msg.payload, limit))
    except ProtocolError as err:
        return error_reply(ctx.topics.error(wearer), err, msg.correlation_data, msg.ack)
    # The delivery owner cancels (a queued query's final reply is a stored error) and then
    # acknowledges the cancel; an unknown, running or finished id needs no reply (API.md).
    return [CancelQuery(wearer, cancel.id, msg.ack)]


def handle_query(
    wearer: str, msg: InboundMessage, ctx: InboundContext, received_at: float
) -> list[Outcome]:
    limits = ctx.config.limits
    allow_foreign = ctx.config.mqtt.allow_foreign_reply_topics
    corr = msg.correlation_data
    try:
        obj = decode_payload(msg.payload, limits.max_message_bytes)
    except ProtocolError as err:
        route = unreadable_route(ctx.topics, wearer, msg.response_topic, corr, allow_foreign)
        return error_reply(route.topic, err, corr, msg.ack)
    try:
        query = parse_query(
            obj,
            max_tokens_cap=limits.max_tokens_cap,
            default_max_tokens=limits.default_max_tokens,
            max_text_chars=limits.max_query_chars,
        )
    except ProtocolError as err:
        raw_reply_to = obj.get("reply_to")
        route = error_route(
            ctx.topics, wearer, msg.response_topic, raw_reply_to, corr, allow_foreign
        )
        return error_reply(route.topic, err, corr, msg.ack)
    # Routing after validation: the reply goes where the validated query says.
    try:
        route = reply_route(
            ctx.topics, wearer, msg.response_topic, query.reply_to, corr, allow_foreign
        )
    except ProtocolError as err:
        return error_reply(ctx.topics.error(wearer), err.with_id(query.id), corr, msg.ack)
    return [_QUERIES, Accept(wearer, query, route, msg.ack, received_at)]
