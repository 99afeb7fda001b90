"""Outbound payloads of API.md v1, built from plain data and serialised once.

"Every field shown is always present; a value that is unknown is null, never omitted": the
builders take every field as an argument, so a missing one is a type error here, not a
surprise for a gateway in the field.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from edged.clinical.advice import GuardedAdvice
from edged.clinical.alerts import alert_message
from edged.clinical.triage import Triage


def encode(payload: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON; `allow_nan=False` because a NaN would be invalid JSON on the wire."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode(
        "utf-8"
    )


def triage_json(triage: Triage) -> dict[str, Any]:
    n = triage.news2
    return {
        "news2": n.score,
        "risk": n.risk,
        "red_flags": list(triage.flag_names),
        "missing": list(n.missing),
    }


def advice_payload(
    *,
    query_id: str,
    wearer: str,
    node: str,
    advice: GuardedAdvice,
    finish_reason: str,
    model_name: str | None,
    model_quant: str | None,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    history_turns: int | None,
    queued_ms: float | None,
    first_token_ms: float | None,
    total_ms: float | None,
    threads: int | None,
    governor_state: str | None,
) -> dict[str, Any]:
    return {
        "id": query_id,
        "wearer": wearer,
        "node": node,
        "text": advice.text,
        "escalation": advice.escalation,
        "triage": triage_json(advice.triage),
        "finish_reason": finish_reason,
        "model": {"name": model_name, "quant": model_quant},
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            # v1.1: earlier turns the prompt held; null, like the token counts, when no
            # model ran (degraded), since then no turn was read at all.
            "history_turns": history_turns,
        },
        "timing_ms": {
            "queued": _ms(queued_ms),
            "first_token": _ms(first_token_ms),
            "total": _ms(total_ms),
        },
        "governor": {"threads": threads, "state": governor_state},
        "disclaimer": advice.disclaimer,
        "guard": guard_json(advice),
    }


def guard_json(advice: GuardedAdvice) -> dict[str, Any]:
    """What the guard did to the model's text (v1.1 addition; clients that do not know it
    ignore it): `contradiction` when the text reassured a wearer due an escalation, which was
    then put first, with the `phrases` that were matched."""
    found = advice.contradiction
    return {"contradiction": found is not None, "phrases": list(found.phrases) if found else []}


def status_payload(
    *,
    state: str,
    group: str | None,
    version: str,
    model: str | None,
    threads: int | None,
    governor: str | None,
    temp_c: float | None,
    mem_available_mb: int | None,
    queue: int,
    decode_tps: float | None,
    uptime_s: float,
    ts: float,
) -> dict[str, Any]:
    return {
        "state": state,
        "version": version,
        "model": model,
        "threads": threads,
        "governor": governor,
        "temp_c": temp_c,
        "mem_available_mb": mem_available_mb,
        "queue": queue,
        "decode_tps": round(decode_tps, 2) if decode_tps is not None else None,
        "uptime_s": int(uptime_s),
        "ts": int(ts),
        "group": group,
    }


def alert_id(wearer: str, summary: bytes) -> str:
    """API.md v1.1: derived from the wearer and the triggering summary's bytes, so every node
    of a share group, and this node after a crash and redelivery, gives one alert one id, and
    consumers drop the ids they have seen."""
    return hashlib.sha256(wearer.encode() + b"\x00" + summary).hexdigest()[:32]


def alert_payload(
    wearer: str, ts: float, triage: Triage, *, alert_id: str, node: str
) -> dict[str, Any]:
    """API.md, Alert. `ts` is the summary's own time: when the condition was measured. `node`
    (a v1.1 addition) names the node that raised it."""
    n = triage.news2
    return {
        "alert_id": alert_id,
        "node": node,
        "wearer": wearer,
        "ts": int(ts),
        "severity": triage.severity,
        "news2": {
            "score": n.score,
            "risk": n.risk,
            "missing": list(n.missing),
            "components": dict(n.components),
        },
        "red_flags": list(triage.flag_names),
        "message": alert_message(triage),
    }


def chunk_payload(query_id: str, seq: int, delta: str) -> dict[str, Any]:
    return {"id": query_id, "seq": seq, "delta": delta}


def _ms(value: float | None) -> int | None:
    return None if value is None else int(round(value))
