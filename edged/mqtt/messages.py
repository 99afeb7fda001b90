"""Inbound payloads (contract v1): bytes -> JSON object -> `Vitals`, `Query` or `Cancel`.

Everything here is a pure function that either returns a typed, range-checked object or raises
`ProtocolError` with the exact wire error; nothing else escapes, whatever the bytes. The checks
are written by hand over plain dicts because the daemon validates thousands of vitals summaries
a second on one small core.

Rules this module adds where the contract is silent (each is documented at its check):
- `null` for an optional field means "not given";
- integer fields (`max_tokens`, `steps`, `spo2_scale`) accept integer-valued numbers (`256.0`);
  a fraction is `invalid_schema`; `spo2_scale` other than 1 or 2 is `invalid_schema` (an enum);
- a bare-number vital is its mean; min <= mean <= max must hold, else `out_of_range` on the
  vital (`field` = `heart_rate`);
- `ts` must lie between 2000-01-01 and a day after the daemon's clock (`out_of_range`); an RFC
  3339 `ts` needs its offset (`Z` or `+hh:mm`), may use a space for `T`, and may be a leap second;
- `deadline_s` is at most `MAX_DEADLINE_S` (a day), `out_of_range` beyond;
- array items are named `events[3]` in `field` (history turns as API.md v1.1 names them:
  `history.3.text`);
- strings holding unpaired surrogates (a JSON `"\\ud800"` escape) are `invalid_schema`: they
  cannot be encoded again;
- a leading UTF-8 byte order mark is ignored (RFC 8259 section 8.1 allows this);
- JSON nested deeper than `MAX_JSON_DEPTH` is `invalid_json`.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import fields
from datetime import datetime, timezone
from itertools import accumulate
from typing import Any, NoReturn

from edged.domain import (
    QUERY_ID_PATTERN,
    Cancel,
    Priority,
    Query,
    Turn,
    TurnRole,
    Vitals,
    VitalStat,
)
from edged.mqtt.errors import ErrorCode, ProtocolError, json_type, show_value
from edged.mqtt.topics import MAX_TOPIC_CHARS

DEFAULT_MAX_BYTES = 16 * 1024
"""Contract v1: the default size limit per message."""
MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays/objects accepted; far beyond any v1 message, far below the stack."""

PRIORITIES = tuple(Priority)
TURN_ROLES = tuple(TurnRole)
MAX_HISTORY_TURNS = 16
"""Contract v1.1: earlier turns a query may carry."""
MAX_TURN_CHARS = 4000
"""Contract v1.1: the longest earlier turn."""
MAX_DEADLINE_S = 86400.0
"""A query deadline longer than a day is a client bug, not a wish: out_of_range."""

VITAL_RANGES: Mapping[str, tuple[float, float]] = {
    # Contract v1, "Plausible ranges" (inclusive): beyond them a reading is a sensor or unit
    # error, not a patient.
    "heart_rate": (20, 300),
    "spo2": (50, 100),
    "resp_rate": (2, 80),
    "temp_c": (25, 45),
    "systolic_bp": (40, 300),
    "diastolic_bp": (20, 200),
    "hrv_rmssd_ms": (0, 500),
    "steps": (0, 100000),
}
"""Every vital that is a number or a {mean, min, max} object, with its plausible range."""
INTEGER_VITALS = frozenset({"steps"})
WINDOW_S_RANGE = (1, 3600)
ACTIVITIES = ("rest", "walk", "run", "sleep", "unknown")
CONSCIOUSNESS_LEVELS = ("alert", "new_confusion", "voice", "pain", "unresponsive")
"""ACVPU, with `new_confusion` for C (RCP NEWS2 2017)."""
SPO2_SCALES = (1, 2)
"""NEWS2 SpO2 scale 1 (default) or 2 (hypercapnic respiratory failure, RCP NEWS2 2017)."""
EVENT_PATTERN = r"^[a-z0-9_]{1,64}$"
MAX_EVENTS = 16
MIN_TS = 946684800.0
"""2000-01-01T00:00:00Z: anything earlier is an unset clock or a wrong unit."""
MAX_TS_AHEAD_S = 86400.0
"""How far past the daemon's clock a `ts` may lie (gateway clocks drift; days do not)."""

_ID_RE = re.compile(QUERY_ID_PATTERN)
_EVENT_RE = re.compile(EVENT_PATTERN)
_RFC3339_RE = re.compile(
    # RFC 3339 section 5.6; section 5.6's note allows a space for the T.
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?"
    r"(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))"
)
# Strings are removed before brackets are counted; the closing quote is optional so that an
# unterminated string costs one pass, never one pass per quote.
_JSON_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"?', re.DOTALL)
_NOT_BRACKET_RE = re.compile(r"[^\[\]{}]+")
_BRACKET_DEPTH = {"[": 1, "{": 1, "]": -1, "}": -1}
_INF = math.inf


def _raise(code: ErrorCode, message: str, field: str | None = None) -> NoReturn:
    raise ProtocolError(code, message, field)


def _schema(message: str, field: str | None) -> NoReturn:
    raise ProtocolError(ErrorCode.INVALID_SCHEMA, message, field)


def _wrong_type(field: str, expected: str, value: Any) -> NoReturn:
    _schema(f"{field} must be {expected}, got {json_type(value)}", field)


def _outside(field: str, value: Any, lo: float, hi: float) -> NoReturn:
    raise ProtocolError(
        ErrorCode.OUT_OF_RANGE, f"{field} = {show_value(value)} is outside {lo}..{hi}", field
    )


def _not_one_of(field: str, value: Any, allowed: tuple[Any, ...]) -> NoReturn:
    _schema(f"{field} = {show_value(value)} is not one of {', '.join(map(str, allowed))}", field)


# -- did you mean ----------------------------------------------------------------------------

QUERY_FIELDS = (
    "id", "text", "history", "max_tokens", "priority", "deadline_s", "stream",
    "include_vitals", "reply_to",
)  # fmt: skip
"""The query's fields (API.md, Query; `history` v1.1)."""
TURN_FIELDS = ("role", "text")
# What other APIs call the fields edged names otherwise: a client written for a chat API sends
# `prompt`, `question` or `content` where edged reads `text`, and a wearable SDK `timestamp`.
_SYNONYMS: Mapping[str, str] = {
    "prompt": "text", "question": "text", "message": "text", "content": "text",
    "query": "text", "input": "text", "msg": "text",
    "query_id": "id", "request_id": "id", "qid": "id", "uuid": "id",
    "timestamp": "ts", "time": "ts", "t": "ts",
    "hr": "heart_rate", "heartrate": "heart_rate", "pulse": "heart_rate", "bpm": "heart_rate",
    "rr": "resp_rate", "respiratory_rate": "resp_rate", "respiration_rate": "resp_rate",
    "oxygen_saturation": "spo2", "sao2": "spo2", "o2": "spo2",
    "temperature": "temp_c", "temp": "temp_c", "body_temperature": "temp_c",
    "systolic": "systolic_bp", "sbp": "systolic_bp",
    "diastolic": "diastolic_bp", "dbp": "diastolic_bp",
    "hrv": "hrv_rmssd_ms", "step_count": "steps",
}  # fmt: skip
MAX_HINT_KEYS = 64
"""Keys looked at for a hint: a hostile message with thousands costs no more than a normal one."""


def near_misses(obj: Mapping[str, Any], known: tuple[str, ...]) -> dict[str, str]:
    """Unknown keys of `obj` that look like one of `known`: {sent: meant}. A synonym from
    another API (`prompt` for `text`) or a misspelling (`heartrate`, `max_token`)."""
    found: dict[str, str] = {}
    for key in list(obj)[:MAX_HINT_KEYS]:
        if type(key) is not str or key in known or len(key) > 64:
            continue
        folded = key.lower().replace("-", "_")
        meant = _SYNONYMS.get(folded) if folded not in known else folded
        if meant is None:
            close = difflib.get_close_matches(folded, known, n=1, cutoff=0.8)
            meant = close[0] if close else None
        if meant in known:
            found[key] = meant
    return found


def _hint(obj: Mapping[str, Any], wanted: str, known: tuple[str, ...]) -> str:
    """ "; did you mean ..." for a missing `wanted` field, or nothing."""
    sent = [key for key, meant in near_misses(obj, known).items() if meant == wanted]
    return f"; got {show_value(sent[0])}: did you mean {wanted!r}?" if sent else ""


def _required(obj: Mapping[str, Any], field: str, known: tuple[str, ...], path: str) -> NoReturn:
    _schema(f"{path} is required{_hint(obj, field, known)}", path)


# -- bytes -> dict ---------------------------------------------------------------------------


def _reject_constant(name: str) -> NoReturn:
    _raise(ErrorCode.INVALID_JSON, f"payload is not valid JSON: {name} is not a JSON number")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if value == _INF or value == -_INF:
        _raise(
            ErrorCode.INVALID_JSON,
            f"payload is not valid JSON: the number {show_value(literal)} overflows a double",
        )
    return value


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def _json_depth(text: str) -> int:
    """Deepest array/object nesting of `text`; exact for valid JSON."""
    brackets = _NOT_BRACKET_RE.sub("", _JSON_STRING_RE.sub("", text))
    return max(accumulate(map(_BRACKET_DEPTH.__getitem__, brackets)), default=0)


def decode_payload(
    payload: bytes, max_bytes: int = DEFAULT_MAX_BYTES, max_depth: int = MAX_JSON_DEPTH
) -> dict[str, Any]:
    """The JSON object in `payload`.

    Raises ProtocolError: `too_large` past `max_bytes` (checked before anything is decoded);
    `invalid_json` for bad UTF-8 (naming the byte offset), bad JSON, NaN/Infinity, numbers that
    overflow a double, integers past Python's digit limit, nesting deeper than `max_depth`;
    `invalid_schema` when the top level is not an object. Duplicate keys: the last one wins.
    """
    size = len(payload)
    if size > max_bytes:
        _raise(ErrorCode.TOO_LARGE, f"payload is {size} bytes; the limit is {max_bytes}")
    if size == 0:
        _raise(ErrorCode.INVALID_JSON, "payload is empty")
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        # `from None` here and below: the decoder's exceptions hold the payload (`.doc`,
        # `.object`), which must not ride along into a logged traceback.
        raise ProtocolError(
            ErrorCode.INVALID_JSON,
            f"payload is not valid UTF-8: {exc.reason} at byte offset {exc.start}",
        ) from None
    if text[0] == "\ufeff":
        text = text[1:]
    if text.count("[") + text.count("{") > max_depth and _json_depth(text) > max_depth:
        _raise(ErrorCode.INVALID_JSON, f"payload nests deeper than {max_depth} levels")
    try:
        obj = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError(ErrorCode.INVALID_JSON, f"payload is not valid JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError(ErrorCode.INVALID_JSON, "payload is nested too deeply") from None
    except ValueError as exc:
        # int() past sys.get_int_max_str_digits(); its own message names interpreter internals.
        detail = "an integer has too many digits" if "digits" in str(exc) else "unreadable"
        raise ProtocolError(
            ErrorCode.INVALID_JSON, f"payload is not valid JSON: {detail}"
        ) from None
    if not isinstance(obj, dict):
        _schema(f"payload must be a JSON object, got {json_type(obj)}", None)
    return obj


# -- field checks ----------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    """int or float, never bool (JSON `true` is not 1)."""
    kind = type(value)
    if kind is int or kind is float:
        return True
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown_number(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def _encodable(field: str, value: str) -> None:
    """Reject unpaired surrogates (JSON `\\ud800` escapes): nothing downstream can encode them."""
    if value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ProtocolError(
            ErrorCode.INVALID_SCHEMA,
            f"{field} has an unpaired surrogate at character {exc.start}",
            field,
        ) from None


def _bool(obj: Mapping[str, Any], field: str, default: bool | None) -> bool | None:
    value = obj.get(field)
    if value is None:
        return default
    if value is True or value is False:
        return value
    _wrong_type(field, "a boolean", value)


def _enum(obj: Mapping[str, Any], field: str, allowed: tuple[str, ...]) -> str | None:
    value = obj.get(field)
    if value is None:
        return None
    if type(value) is not str:
        _wrong_type(field, "a string", value)
    if value not in allowed:
        _not_one_of(field, value, allowed)
    return value


def _whole(field: str, value: Any) -> int:
    """An integer-valued JSON number as int (`256.0` is accepted: JSON has one number type)."""
    if type(value) is int:
        return value
    if not _is_number(value):
        _wrong_type(field, "an integer", value)
    if isinstance(value, int):
        return int(value)
    if not value.is_integer():
        _schema(f"{field} = {show_value(value)} must be a whole number", field)
    return int(value)


def _number_in(field: str, value: Any, lo: float, hi: float) -> float:
    if not _is_number(value):
        _wrong_type(field, "a number", value)
    # Compare before float(): an int with hundreds of digits would overflow float().
    if not lo <= value <= hi:
        _outside(field, value, lo, hi)
    return float(value)


def _query_id(obj: Mapping[str, Any]) -> str:
    value = obj.get("id")
    if value is None:
        _required(obj, "id", QUERY_FIELDS, "id")
    if type(value) is not str:
        _wrong_type("id", "a string", value)
    if _ID_RE.fullmatch(value) is None:
        _schema(f"id = {show_value(value)} does not match {QUERY_ID_PATTERN}", "id")
    return value


def _require_object(obj: Any) -> None:
    if not isinstance(obj, dict):
        _schema(f"payload must be a JSON object, got {json_type(obj)}", None)


# -- query -----------------------------------------------------------------------------------


def parse_query(
    obj: dict[str, Any],
    *,
    max_tokens_cap: int = 512,
    default_max_tokens: int = 256,
    max_text_chars: int = 4000,
    max_deadline_s: float = MAX_DEADLINE_S,
) -> Query:
    """A validated query.

    Raises ProtocolError (`invalid_schema` or `out_of_range`) naming the first bad field; the
    error carries the query id whenever the id itself was valid. `max_tokens` above the cap is
    `out_of_range`, never clamped; `deadline_s` must be in (0, `max_deadline_s`].
    """
    _require_object(obj)
    query_id = _query_id(obj)
    try:
        return _query_fields(
            obj, query_id, max_tokens_cap, default_max_tokens, max_text_chars, max_deadline_s
        )
    except ProtocolError as exc:
        raise exc.with_id(query_id) from None


def _query_fields(
    obj: dict[str, Any],
    query_id: str,
    max_tokens_cap: int,
    default_max_tokens: int,
    max_text_chars: int,
    max_deadline_s: float,
) -> Query:
    # Checked in the order of API.md's field list, so the first bad field is the one named.
    text = _query_text(obj, max_text_chars)
    history = _history(obj)
    max_tokens = _max_tokens(obj, max_tokens_cap, default_max_tokens)
    priority = Priority(_enum(obj, "priority", PRIORITIES) or Priority.NORMAL)
    deadline_s = _deadline(obj, max_deadline_s)
    reply_to = _reply_to(obj)
    return Query(
        id=query_id,
        text=text,
        max_tokens=max_tokens,
        stream=bool(_bool(obj, "stream", False)),
        priority=priority,
        deadline_s=deadline_s,
        include_vitals=bool(_bool(obj, "include_vitals", True)),
        reply_to=reply_to,
        history=history,
    )


def _query_text(obj: Mapping[str, Any], max_chars: int) -> str:
    if obj.get("text") is None:
        _required(obj, "text", QUERY_FIELDS, "text")
    return _words("text", obj.get("text"), max_chars)


def _words(field: str, text: Any, max_chars: int) -> str:
    # Messages about a query's words give their length only: they are the patient's own.
    if text is None:
        _schema(f"{field} is required", field)
    if type(text) is not str:
        _wrong_type(field, "a string", text)
    if not text:
        _schema(f"{field} is empty; it must be 1..{max_chars} characters", field)
    if len(text) > max_chars:
        _schema(f"{field} is {len(text)} characters; the limit is {max_chars}", field)
    _encodable(field, text)
    return text


def _history(obj: Mapping[str, Any]) -> tuple[Turn, ...]:
    value = obj.get("history")
    if value is None:
        return ()
    if type(value) is not list:
        _wrong_type("history", "an array of turns", value)
    if len(value) > MAX_HISTORY_TURNS:
        _schema(f"history has {len(value)} turns; the limit is {MAX_HISTORY_TURNS}", "history")
    return tuple(_turn(index, turn) for index, turn in enumerate(value))


def _turn(index: int, turn: Any) -> Turn:
    # API.md v1.1 names a turn's fields with dots (`history.3.text`), unlike `events[3]`.
    path = f"history.{index}"
    if type(turn) is not dict:
        _wrong_type(path, "an object with role and text", turn)
    role = turn.get("role")
    if role is None:
        _required(turn, "role", TURN_FIELDS, f"{path}.role")
    if type(role) is not str:
        _wrong_type(f"{path}.role", "a string", role)
    if role not in TURN_ROLES:
        _not_one_of(f"{path}.role", role, TURN_ROLES)
    if turn.get("text") is None:
        _required(turn, "text", TURN_FIELDS, f"{path}.text")
    return Turn(TurnRole(role), _words(f"{path}.text", turn.get("text"), MAX_TURN_CHARS))


def _max_tokens(obj: Mapping[str, Any], cap: int, default: int) -> int:
    value = obj.get("max_tokens")
    if value is None:
        return min(default, cap)
    max_tokens = _whole("max_tokens", value)
    if not 1 <= max_tokens <= cap:
        _outside("max_tokens", max_tokens, 1, cap)
    return max_tokens


def _deadline(obj: Mapping[str, Any], max_deadline_s: float) -> float | None:
    value = obj.get("deadline_s")
    if value is None:
        return None
    if not _is_number(value):
        _wrong_type("deadline_s", "a number", value)
    if not 0 < value <= max_deadline_s:
        raise ProtocolError(
            ErrorCode.OUT_OF_RANGE,
            f"deadline_s = {show_value(value)} must be > 0 and <= {max_deadline_s:g}",
            "deadline_s",
        )
    return float(value)


def _reply_to(obj: Mapping[str, Any]) -> str | None:
    value = obj.get("reply_to")
    if value is None:
        return None
    if type(value) is not str:
        _wrong_type("reply_to", "a string", value)
    if not value:
        _schema("reply_to is empty; leave it out to reply on the default topic", "reply_to")
    if len(value) > MAX_TOPIC_CHARS:
        _schema(f"reply_to is {len(value)} characters; the limit is {MAX_TOPIC_CHARS}", "reply_to")
    _encodable("reply_to", value)
    return value


# -- cancel ----------------------------------------------------------------------------------


def parse_cancel(obj: dict[str, Any]) -> Cancel:
    _require_object(obj)
    return Cancel(_query_id(obj))


# -- vitals ----------------------------------------------------------------------------------


def parse_vitals(obj: dict[str, Any], *, now: float | None = None) -> Vitals:
    """A validated vitals summary; `now` (UNIX seconds, default: the clock) bounds `ts`.

    Raises ProtocolError. `out_of_range`: a vital outside `VITAL_RANGES` (field `spo2.min`, or
    `heart_rate` for a bare number), `window_s` outside 1..3600, `ts` before 2000 or more than a
    day after `now`, and a vital whose values are out of order (min <= mean <= max must hold;
    field: the vital). `invalid_schema`: wrong types, unknown enum values, a vital object with
    none of mean/min/max, bad event names, more than 16 events, an unreadable RFC 3339 `ts`.
    Booleans are never numbers. Unknown fields are ignored, but a summary with unknown fields
    must hold at least one of `READING_FIELDS`; a missing `ts` or reading names the
    near-miss keys sent (`timestamp`, `heartrate`: "did you mean").
    """
    _require_object(obj)
    get = obj.get
    if get("ts") is None:
        _required(obj, "ts", VITALS_FIELDS, "ts")
    ts = _timestamp(get("ts"), time.time() if now is None else now)
    if not any(get(name) is not None for name in READING_FIELDS) and not obj.keys() <= _KNOWN:
        _no_reading(obj)

    window_s = get("window_s")
    if window_s is not None:
        window_s = _number_in("window_s", window_s, *WINDOW_S_RANGE)

    heart_rate, spo2, resp_rate, temp_c, systolic_bp, diastolic_bp, hrv_rmssd_ms, steps = (
        None if (value := get(spec[0])) is None else _vital_stat(spec, value)
        for spec in _VITAL_SPECS
    )

    spo2_scale = get("spo2_scale")
    if spo2_scale is not None:
        spo2_scale = _whole("spo2_scale", spo2_scale)
        if spo2_scale not in SPO2_SCALES:
            _not_one_of("spo2_scale", spo2_scale, SPO2_SCALES)

    raw_events = get("events")
    return Vitals(
        ts=ts,
        window_s=window_s,
        heart_rate=heart_rate,
        spo2=spo2,
        resp_rate=resp_rate,
        temp_c=temp_c,
        systolic_bp=systolic_bp,
        diastolic_bp=diastolic_bp,
        hrv_rmssd_ms=hrv_rmssd_ms,
        steps=steps,
        activity=_enum(obj, "activity", ACTIVITIES),
        on_oxygen=_bool(obj, "on_oxygen", None),
        spo2_scale=spo2_scale,
        consciousness=_enum(obj, "consciousness", CONSCIOUSNESS_LEVELS),
        events=() if raw_events is None else _events(raw_events),
    )


READING_FIELDS = (*VITAL_RANGES, "activity", "on_oxygen", "consciousness", "events")
"""A summary with unknown fields must carry at least one of these: unknown fields and no reading
is what a gateway sends when every name is misspelt (`hr`, `SpO2`), and ignoring them all would
look like success. `ts` alone stays valid (API.md: every vital is optional)."""
VITALS_FIELDS = ("ts", "window_s", *READING_FIELDS, "spo2_scale")
_KNOWN = frozenset(VITALS_FIELDS)


def _no_reading(obj: Mapping[str, Any]) -> NoReturn:
    misses = near_misses(obj, VITALS_FIELDS)
    hint = "; ".join(f"got {show_value(k)}: did you mean {v!r}?" for k, v in misses.items())
    _schema(
        "the summary has no reading: none of "
        + ", ".join(READING_FIELDS)
        + " is given"
        + (f"; {hint}" if hint else ""),
        None,
    )


_VitalSpec = tuple[str, float, float, bool, str, str, str]
_VITAL_SPECS: tuple[_VitalSpec, ...] = tuple(
    (name, lo, hi, name in INTEGER_VITALS, f"{name}.mean", f"{name}.min", f"{name}.max")
    for name, (lo, hi) in VITAL_RANGES.items()
)
# parse_vitals unpacks the specs positionally, in the order of the Vitals fields.
assert [spec[0] for spec in _VITAL_SPECS] == [f.name for f in fields(Vitals)][2:10]


def _stat_value(path: str, value: Any, lo: float, hi: float, whole: bool) -> float:
    if whole:
        _whole(path, value)
    return _number_in(path, value, lo, hi)


def _vital_stat(spec: _VitalSpec, value: Any) -> VitalStat:
    name, lo, hi, whole, mean_path, min_path, max_path = spec
    if type(value) is not dict:
        if not _is_number(value):
            _wrong_type(name, "a number or an object with mean, min or max", value)
        return VitalStat(_stat_value(name, value, lo, hi, whole))
    mean = value.get("mean")
    low = value.get("min")
    high = value.get("max")
    if mean is None and low is None and high is None:
        _schema(f"{name} must have at least one of mean, min, max", name)
    if mean is not None:
        mean = _stat_value(mean_path, mean, lo, hi, whole)
    if low is not None:
        low = _stat_value(min_path, low, lo, hi, whole)
    if high is not None:
        high = _stat_value(max_path, high, lo, hi, whole)
    if mean is not None:
        if low is not None and low > mean:
            _out_of_order(name, "min", low, "mean", mean)
        if high is not None and mean > high:
            _out_of_order(name, "mean", mean, "max", high)
    elif low is not None and high is not None and low > high:
        _out_of_order(name, "min", low, "max", high)
    return VitalStat(mean, low, high)


def _out_of_order(name: str, key_a: str, a: float, key_b: str, b: float) -> NoReturn:
    raise ProtocolError(
        ErrorCode.OUT_OF_RANGE,
        f"{name}.{key_a} = {_shown_number(a)} is above {name}.{key_b} = {_shown_number(b)}; "
        "min <= mean <= max must hold",
        name,
    )


def _timestamp(value: Any, now: float, field: str = "ts") -> float:
    # `field`: FHIR vitals (edged.mqtt.fhir) check their effective times with the same rules.
    if value is None:
        _schema(f"{field} is required", field)
    if type(value) is str:
        seconds = _rfc3339_seconds(value, field)
    elif _is_number(value):
        seconds = value
    else:
        _wrong_type(field, "a number (UNIX seconds) or an RFC 3339 string", value)
    latest = now + MAX_TS_AHEAD_S
    if not MIN_TS <= seconds <= latest:
        hint = " (milliseconds?)" if _is_number(value) and seconds > 1e11 else ""
        raise ProtocolError(
            ErrorCode.OUT_OF_RANGE,
            f"{field} = {show_value(value)} is outside {MIN_TS:.0f}..{latest:.0f} "
            f"(2000-01-01 to a day from now){hint}",
            field,
        )
    return float(seconds)


def _rfc3339_seconds(value: str, field: str = "ts") -> float:
    match = _RFC3339_RE.fullmatch(value)
    if match is None:
        _schema(
            f"{field} = {show_value(value)} is not UNIX seconds or an RFC 3339 date-time", field
        )
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction, sign, off_h, off_m = match.groups()[6:]
    try:
        if second > 60:
            raise ValueError("second must be in 0..60")
        # datetime has no leap second: 23:59:60 is read as 23:59:59 plus one second.
        moment = datetime(year, month, day, hour, minute, min(second, 59), tzinfo=timezone.utc)
        if sign is not None and (int(off_h) > 23 or int(off_m) > 59):
            raise ValueError("offset must be at most 23:59")
    except ValueError as exc:
        raise ProtocolError(
            ErrorCode.INVALID_SCHEMA,
            f"{field} = {show_value(value)} is not a valid RFC 3339 date-time: {exc}",
            field,
        ) from None
    seconds = moment.timestamp() + (second == 60) + (float(fraction) if fraction else 0.0)
    if sign is not None:
        offset = int(off_h) * 3600 + int(off_m) * 60
        seconds -= offset if sign == "+" else -offset
    return seconds


def _events(value: Any) -> tuple[str, ...]:
    if type(value) is not list:
        _wrong_type("events", "an array of strings", value)
    if len(value) > MAX_EVENTS:
        _schema(f"events has {len(value)} items; the limit is {MAX_EVENTS}", "events")
    for index, event in enumerate(value):
        if type(event) is not str:
            _wrong_type(f"events[{index}]", "a string", event)
        if _EVENT_RE.fullmatch(event) is None:
            _schema(
                f"events[{index}] = {show_value(event)} does not match {EVENT_PATTERN}",
                f"events[{index}]",
            )
    return tuple(value)
