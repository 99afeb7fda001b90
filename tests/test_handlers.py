"""Inbound handlers and reply routing as pure functions: a message in, outcomes out.

No broker, no threads: the handlers only decide (publish this, acknowledge that, accept this
query), so what the daemon does with each kind of message is checked by comparing values.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from edged.clinical.alerts import AlertGate
from edged.clinical.state import VitalsState
from edged.config.loader import parse_config
from edged.domain import Priority
from edged.mqtt.errors import ErrorCode, ProtocolError
from edged.mqtt.routing import ReplyRoute, error_route, reply_route, unreadable_route
from edged.mqtt.topics import Topics
from edged.mqtt.transport import AckToken, InboundMessage
from edged.service.handlers import InboundContext
from edged.service.handlers import handle as handle_at
from edged.service.outcomes import Accept, Ack, CancelQuery, Count, Publish

pytestmark = pytest.mark.arm64  # pure and fast: part of the ARM subset

TOPICS = Topics("edged", "node-1")
P = "edged/v1"
TOKEN = AckToken(mid=7, qos=1, connection=1)


def _ctx(**config: Any) -> InboundContext:
    cfg = parse_config({"node_id": "node-1", "model": {"path": "/nonexistent"}, **config})
    return InboundContext(TOPICS, cfg, VitalsState(1800, 100, 100, 3600), AlertGate(300, 100))


def handle(msg: InboundMessage, ctx: InboundContext) -> list[Any]:
    """The handler as the dispatcher calls it, received now (monotonic clock at 1000 s)."""
    return handle_at(msg, ctx, time.time(), 1000.0)


def _msg(
    topic: str,
    payload: bytes | dict[str, Any],
    response_topic: str | None = None,
    correlation: bytes | None = None,
) -> InboundMessage:
    data = json.dumps(payload).encode() if isinstance(payload, dict) else payload
    return InboundMessage(topic, data, 1, False, response_topic, correlation, TOKEN)


def _publishes(outcomes: list[Any]) -> list[Publish]:
    return [o for o in outcomes if isinstance(o, Publish)]


def _error_of(outcomes: list[Any]) -> tuple[str, dict[str, Any]]:
    (publish,) = _publishes(outcomes)
    assert publish.ack_after == (TOKEN,), "an error reply acknowledges the message it answers"
    return publish.topic, json.loads(publish.payload)


def test_a_valid_query_is_accepted_with_its_route_and_receipt_time() -> None:
    q = {"id": "q1", "text": "Am I ok?", "priority": "urgent", "deadline_s": 30}
    outcomes = handle(_msg(f"{P}/w1/query", q, f"{P}/w1/r", b"c"), _ctx())
    accept = outcomes[-1]
    assert isinstance(accept, Accept) and Count("queries") in outcomes
    assert accept.query.id == "q1" and accept.query.priority == Priority.URGENT
    assert accept.route == ReplyRoute(f"{P}/w1/r", b"c")
    assert accept.ack == TOKEN and accept.received_at == 1000.0


def test_the_validated_reply_to_is_the_route_used() -> None:
    q = {"id": "q2", "text": "hi", "reply_to": f"{P}/w1/inbox"}
    accept = handle(_msg(f"{P}/w1/query", q), _ctx())[-1]
    assert isinstance(accept, Accept) and accept.route.topic == accept.query.reply_to


def test_an_empty_reply_to_is_a_schema_error_on_the_error_topic() -> None:
    # Routing runs after validation: "" is an invalid field, not a forbidden topic.
    topic, body = _error_of(
        handle(_msg(f"{P}/w1/query", {"id": "q", "text": "x", "reply_to": ""}), _ctx())
    )
    assert topic == f"{P}/w1/error"
    assert (body["code"], body["field"], body["id"]) == ("invalid_schema", "reply_to", "q")


def test_a_bad_field_is_answered_where_the_reply_would_go() -> None:
    outcomes = handle(_msg(f"{P}/w1/query", {"id": "q", "text": "x", "max_tokens": 0}), _ctx())
    topic, body = _error_of(outcomes)
    assert topic == f"{P}/w1/advice" and body["code"] == "out_of_range" and body["id"] == "q"
    assert Count("errors", label="out_of_range") in outcomes
    assert not any(isinstance(o, Accept) for o in outcomes)


def test_unreadable_json_goes_to_the_error_topic_without_a_response_topic() -> None:
    topic, body = _error_of(handle(_msg(f"{P}/w1/query", b'{"id": '), _ctx()))
    assert topic == f"{P}/w1/error" and body["code"] == "invalid_json"
    topic, _ = _error_of(handle(_msg(f"{P}/w1/query", b"{", f"{P}/w1/mine"), _ctx()))
    assert topic == f"{P}/w1/mine"


def test_a_forbidden_reply_topic_is_refused_on_the_error_topic_with_the_id() -> None:
    q = {"id": "q9", "text": "x", "reply_to": f"{P}/w2/advice"}
    topic, body = _error_of(handle(_msg(f"{P}/w1/query", q), _ctx()))
    assert topic == f"{P}/w1/error"
    assert (body["code"], body["field"], body["id"]) == ("forbidden_reply_topic", "reply_to", "q9")
    allowed = handle(_msg(f"{P}/w1/query", q), _ctx(mqtt={"allow_foreign_reply_topics": True}))
    assert isinstance(allowed[-1], Accept)


def test_an_invalid_wearer_is_answered_on_the_node_error_topic() -> None:
    topic, body = _error_of(handle(_msg(f"{P}/bad wearer/query", {"id": "q"}), _ctx()))
    assert topic == f"{P}/_node/node-1/error" and body["code"] == "invalid_wearer"


def test_normal_vitals_are_counted_and_acknowledged_at_once() -> None:
    vitals = {"ts": time.time(), "heart_rate": 70, "spo2": 98, "resp_rate": 14}
    assert handle(_msg(f"{P}/w1/vitals", vitals), _ctx()) == [Count("vitals"), Ack(TOKEN)]


def test_alerting_vitals_are_acknowledged_only_with_their_alert() -> None:
    outcomes = handle(_msg(f"{P}/w1/vitals", {"ts": time.time(), "spo2": 84}), _ctx())
    assert not any(isinstance(o, Ack) for o in outcomes)
    (alert,) = _publishes(outcomes)
    assert alert.topic == f"{P}/w1/alert" and alert.ack_after == (TOKEN,)
    assert json.loads(alert.payload)["severity"] == "high"
    assert Count("alerts", label="high") in outcomes


def test_a_repeated_alert_within_the_cooldown_is_only_acknowledged() -> None:
    ctx = _ctx()
    vitals = {"ts": time.time(), "spo2": 84}
    handle(_msg(f"{P}/w1/vitals", vitals), ctx)
    assert handle(_msg(f"{P}/w1/vitals", vitals), ctx) == [Count("vitals"), Ack(TOKEN)]


def test_setting_the_wall_clock_back_does_not_silence_a_wearers_alerts() -> None:
    """The cooldown runs on the monotonic clock (found reading the code for issue #16's soak):
    after an alert, the wall clock jumps back two hours; an alert 301 s later still goes out."""
    ctx = _ctx(clinical={"alert_cooldown_s": 300})
    t0 = time.time()
    first = handle_at(_msg(f"{P}/w1/vitals", {"ts": t0, "spo2": 84}), ctx, t0, 1000.0)
    assert _publishes(first)
    back = t0 - 7200 + 301
    later = handle_at(_msg(f"{P}/w1/vitals", {"ts": back, "spo2": 84}), ctx, back, 1301.0)
    assert len(_publishes(later)) == 1


@pytest.mark.parametrize("jump_s", [3600.0, -3600.0], ids=["forward", "back"])
def test_the_vitals_window_ignores_the_wall_clock_being_set(jump_s: float) -> None:
    """The window runs on the monotonic clock (found by tools/soak.py's wall_clock_jump, #16):
    set forward an hour, the wall clock emptied the window; set back, it kept readings from
    outside it. 20 s apart on the monotonic clock, both summaries are in the window (1800 s)."""
    ctx = _ctx()
    t0 = time.time()
    handle_at(_msg(f"{P}/w1/vitals", {"ts": t0, "heart_rate": 60}), ctx, t0, 1000.0)
    jumped = t0 + jump_s + 20
    handle_at(_msg(f"{P}/w1/vitals", {"ts": jumped, "heart_rate": 70}), ctx, jumped, 1020.0)
    assert [v.heart_rate.mean for v in ctx.vitals.window("w1", 1020.0)] == [60, 70]
    # ...and 1801 s later on the monotonic clock the first has left it, whatever the wall says.
    assert [v.heart_rate.mean for v in ctx.vitals.window("w1", 2801.0)] == [70]


def test_bad_vitals_get_an_error_naming_the_field() -> None:
    outcomes = handle(_msg(f"{P}/w1/vitals", {"ts": time.time(), "spo2": 130}), _ctx())
    topic, body = _error_of(outcomes)
    assert topic == f"{P}/w1/error" and (body["code"], body["field"]) == ("out_of_range", "spo2")


def test_a_cancel_goes_to_the_delivery_owner_with_its_acknowledgement() -> None:
    outcomes = handle(_msg(f"{P}/w1/cancel", {"id": "q1"}), _ctx())
    assert outcomes == [CancelQuery("w1", "q1", TOKEN)]
    topic, body = _error_of(handle(_msg(f"{P}/w1/cancel", {"id": 5}), _ctx()))
    assert topic == f"{P}/w1/error" and body["field"] == "id"


def test_reply_route_prefers_the_response_topic_and_names_the_field_it_refuses() -> None:
    assert reply_route(TOPICS, "w1", None, None, None, False).topic == f"{P}/w1/advice"
    assert reply_route(TOPICS, "w1", f"{P}/w1/a", f"{P}/w1/b", b"k", False) == ReplyRoute(
        f"{P}/w1/a", b"k"
    )
    with pytest.raises(ProtocolError) as refused:
        reply_route(TOPICS, "w1", f"{P}/w2/x", None, None, False)
    assert refused.value.code == ErrorCode.FORBIDDEN_REPLY_TOPIC and refused.value.field is None
    with pytest.raises(ProtocolError) as refused:
        reply_route(TOPICS, "w1", None, "elsewhere/x", None, False)
    assert refused.value.field == "reply_to"


def test_error_routes_fall_back_to_the_error_topic() -> None:
    assert error_route(TOPICS, "w1", None, 42, None, False).topic == f"{P}/w1/advice"
    assert error_route(TOPICS, "w1", None, "other/x", None, False).topic == f"{P}/w1/error"
    assert unreadable_route(TOPICS, "w1", None, None, False).topic == f"{P}/w1/error"
    assert unreadable_route(TOPICS, "w1", "$SYS/x", None, False).topic == f"{P}/w1/error"
