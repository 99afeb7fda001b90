"""A queued query as bytes, for the answered store's record of queries not answered yet.

The broker is not the only keeper of an accepted query. mosquitto acknowledges a publish at
once but writes its state to disk only every `autosave_interval` (at best every ~2 s; 30 min by
default): a broker that crashes forgets the queries of those last seconds, and if the daemon,
which had them, crashes too before answering, nobody answers them (found by tools/soak.py's
hour: a broker SIGKILL and a daemon SIGKILL 5 s apart lost one query). So the delivery owner
keeps every queued query in the store until its final reply replaces it, and a start resumes
the ones left (edged.service.delivery).

The record holds what generation needs: the validated query (its text and history are PHI, on
the node's own state dir only until answered, like the stored replies) and where the replies go.
"""

from __future__ import annotations

import json
from typing import Any

from edged.domain import Priority, Query, Turn, TurnRole
from edged.mqtt.routing import ReplyRoute
from edged.service.outcomes import QueryWork

_VERSION = 1


def encode_work(work: QueryWork) -> bytes:
    q = work.query
    record: dict[str, Any] = {
        "v": _VERSION,
        "id": q.id,
        "text": q.text,
        "max_tokens": q.max_tokens,
        "stream": q.stream,
        "priority": q.priority.value,
        "deadline_s": q.deadline_s,
        "include_vitals": q.include_vitals,
        "reply_to": q.reply_to,
        "history": [[turn.role.value, turn.text] for turn in q.history],
        "route_topic": work.route.topic,
        "route_correlation": (
            work.route.correlation.hex() if work.route.correlation is not None else None
        ),
    }
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()


def decode_work(record: bytes) -> QueryWork:
    """Raises ValueError naming what is wrong with a record this version cannot read."""
    try:
        r = json.loads(record)
        if r.get("v") != _VERSION:
            raise ValueError(f"record version {r.get('v')!r}, this daemon reads {_VERSION}")
        correlation = r["route_correlation"]
        query = Query(
            id=str(r["id"]),
            text=str(r["text"]),
            max_tokens=int(r["max_tokens"]),
            stream=bool(r["stream"]),
            priority=Priority(r["priority"]),
            deadline_s=float(r["deadline_s"]) if r["deadline_s"] is not None else None,
            include_vitals=bool(r["include_vitals"]),
            reply_to=r["reply_to"],
            history=tuple(Turn(TurnRole(role), str(text)) for role, text in r["history"]),
        )
        route = ReplyRoute(
            str(r["route_topic"]), bytes.fromhex(correlation) if correlation is not None else None
        )
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable record ({type(exc).__name__}: {exc})") from exc
    return QueryWork(query, route)
