"""Where a query's replies go (API.md, Replies). Pure functions over the topic contract.

A reply goes to the query's MQTT 5 Response Topic (Correlation Data echoed), else to its
validated `reply_to`, else to `{prefix}/v1/{wearer}/advice`; a reply topic outside
`{prefix}/v1/{wearer}/` is refused unless `mqtt.allow_foreign_reply_topics` is set
(`Topics.reply_allowed` has the rules). Errors about a query that could not be validated go
where its replies would go when that is known and allowed, else to the wearer's error topic.
"""

from __future__ import annotations

from dataclasses import dataclass

from edged.mqtt.errors import ErrorCode, ProtocolError
from edged.mqtt.topics import Topics

_SHOWN_TOPIC_CHARS = 80


@dataclass(frozen=True)
class ReplyRoute:
    topic: str
    correlation: bytes | None


def reply_route(
    topics: Topics,
    wearer: str,
    response_topic: str | None,
    reply_to: str | None,
    correlation: bytes | None,
    allow_foreign: bool,
) -> ReplyRoute:
    """The route of a validated query's replies (`reply_to` is `Query.reply_to`).

    Raises ProtocolError(forbidden_reply_topic), whose `field` is `reply_to` when the payload
    named the topic and None when the MQTT 5 Response Topic did."""
    requested = response_topic if response_topic is not None else reply_to
    if requested is None:
        return ReplyRoute(topics.advice(wearer), correlation)
    if not topics.reply_allowed(wearer, requested, allow_foreign):
        shown = requested
        if len(shown) > _SHOWN_TOPIC_CHARS:
            shown = shown[: _SHOWN_TOPIC_CHARS - 3] + "..."
        raise ProtocolError(
            ErrorCode.FORBIDDEN_REPLY_TOPIC,
            f"reply topic {shown!r} is outside {topics.prefix}/v1/{wearer}/",
            field="reply_to" if response_topic is None else None,
        )
    return ReplyRoute(requested, correlation)


def error_route(
    topics: Topics,
    wearer: str,
    response_topic: str | None,
    raw_reply_to: object,
    correlation: bytes | None,
    allow_foreign: bool,
) -> ReplyRoute:
    """Where an error about a query that failed validation goes: its reply route (the
    Response Topic, a `reply_to` string as sent, or the advice topic) when that is allowed,
    else the wearer's error topic. `raw_reply_to` is whatever the payload held."""
    reply_to = raw_reply_to if isinstance(raw_reply_to, str) else None
    try:
        return reply_route(topics, wearer, response_topic, reply_to, correlation, allow_foreign)
    except ProtocolError:
        return ReplyRoute(topics.error(wearer), correlation)


def unreadable_route(
    topics: Topics,
    wearer: str,
    response_topic: str | None,
    correlation: bytes | None,
    allow_foreign: bool,
) -> ReplyRoute:
    """Where an error about a query that is not JSON (or too large) goes: nothing in it can
    be read, so only an allowed MQTT 5 Response Topic, else the wearer's error topic."""
    if response_topic is None:
        return ReplyRoute(topics.error(wearer), correlation)
    return error_route(topics, wearer, response_topic, None, correlation, allow_foreign)
