"""Inbound payload validation (API v1): bytes in, typed objects or the exact wire error out."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edged.domain import Cancel, Query, Vitals, VitalStat
from edged.mqtt.errors import ErrorCode, ProtocolError, error_payload
from edged.mqtt.messages import (
    DEFAULT_MAX_BYTES,
    MAX_JSON_DEPTH,
    VITAL_RANGES,
    decode_payload,
    parse_cancel,
    parse_query,
    parse_vitals,
)

NOW = 1764064800.0
"""2025-11-25T10:00:00Z, the `ts` of the API.md example."""

API_VITALS = {
    "ts": 1764064800,
    "window_s": 60,
    "heart_rate": {"mean": 88, "min": 72, "max": 104},
    "spo2": {"mean": 95, "min": 93},
    "resp_rate": 18,
    "temp_c": 37.9,
    "systolic_bp": 118,
    "diastolic_bp": 76,
    "hrv_rmssd_ms": 35,
    "steps": 12,
    "activity": "rest",
    "on_oxygen": False,
    "spo2_scale": 1,
    "consciousness": "alert",
    "events": ["fall", "irregular_rhythm"],
}
API_QUERY = {
    "id": "q-123",
    "text": "I feel dizzy when I stand up. Should I worry?",
    "max_tokens": 256,
    "stream": False,
    "priority": "normal",
    "deadline_s": 120,
    "include_vitals": True,
    "reply_to": "optional/topic/for/mqtt-3.1.1/clients",
}
CODES = {code.value for code in ErrorCode}
PAYLOAD_KEYS = {"id", "code", "message", "field", "retry_after_ms"}


def _error(call: Any, *args: Any, **kwargs: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        call(*args, **kwargs)
    return info.value


def _assert_wire_error(err: ProtocolError) -> None:
    payload = err.payload()
    assert set(payload) == PAYLOAD_KEYS
    assert payload["code"] in CODES
    assert isinstance(payload["message"], str) and payload["message"]
    json.dumps(payload, allow_nan=False)


def _vitals(**fields: Any) -> Vitals:
    return parse_vitals({"ts": NOW, **fields}, now=NOW)


def _query(**fields: Any) -> Query:
    return parse_query({"id": "q1", "text": "hello", **fields})


# -- errors ----------------------------------------------------------------------------------


def test_error_payload_always_has_all_five_keys() -> None:
    assert error_payload(ErrorCode.BUSY, "queue full", retry_after_ms=500) == {
        "id": None,
        "code": "busy",
        "message": "queue full",
        "field": None,
        "retry_after_ms": 500,
    }
    err = ProtocolError("out_of_range", "spo2.min = 130 is outside 50..100", "spo2.min")
    assert err.payload() == {
        "id": None,
        "code": "out_of_range",
        "message": "spo2.min = 130 is outside 50..100",
        "field": "spo2.min",
        "retry_after_ms": None,
    }
    assert str(err) == "spo2.min = 130 is outside 50..100"


def test_with_id_copies_the_error_with_the_query_id() -> None:
    err = ProtocolError(ErrorCode.BUSY, "queue full", retry_after_ms=250)
    tagged = err.with_id("q-1")
    assert tagged.payload() == {**err.payload(), "id": "q-1"}
    assert err.id is None


def test_protocol_error_survives_pickling() -> None:
    import pickle

    err = ProtocolError(ErrorCode.OUT_OF_RANGE, "x = 1 is outside 2..3", "x", "q1")
    assert pickle.loads(pickle.dumps(err)).payload() == err.payload()


# -- decode_payload --------------------------------------------------------------------------


def test_decode_returns_the_object() -> None:
    assert decode_payload(json.dumps(API_VITALS).encode()) == API_VITALS


def test_decode_ignores_a_utf8_byte_order_mark() -> None:
    assert decode_payload(b'\xef\xbb\xbf{"a": 1}') == {"a": 1}


def test_decode_duplicate_keys_last_wins() -> None:
    assert decode_payload(b'{"a": 1, "a": 2}') == {"a": 2}


def test_decode_keeps_large_but_finite_numbers() -> None:
    assert decode_payload(b'{"a": 1e308, "b": -1e308, "c": 5e-324}')["a"] == 1e308


def test_decode_size_limit_is_inclusive() -> None:
    filler = b'{"a": "' + b"x" * (DEFAULT_MAX_BYTES - 10) + b'"}'
    assert len(filler) == DEFAULT_MAX_BYTES - 1
    assert decode_payload(filler + b" ")["a"]
    err = _error(decode_payload, filler + b"  ")
    assert err.code is ErrorCode.TOO_LARGE
    assert err.message == f"payload is {DEFAULT_MAX_BYTES + 1} bytes; the limit is 16384"


def test_ten_megabytes_rejected_by_size_without_parsing() -> None:
    huge = b"[" * 10 * 1024 * 1024  # would be invalid_json if it were parsed
    start = time.perf_counter()
    err = _error(decode_payload, huge)
    assert time.perf_counter() - start < 0.05
    assert err.code is ErrorCode.TOO_LARGE
    assert err.message == "payload is 10485760 bytes; the limit is 16384"
    assert err.field is None and err.id is None


def test_custom_size_limit() -> None:
    assert _error(decode_payload, b'{"a": 12345}', max_bytes=8).code is ErrorCode.TOO_LARGE


@pytest.mark.parametrize(
    "payload, needle",
    [
        (b"", "empty"),
        (b"\xff\xfe", "byte offset 0"),
        (b'{"a": "\xff"}', "byte offset 7"),
        (b'{"a": "\xc0\xaf"}', "byte offset 7"),  # overlong encoding of "/"
        (b'{"a": "\xed\xa0\x80"}', "byte offset 7"),  # an encoded surrogate
        (b'{"a": "\xe2\x82"}', "byte offset 7"),  # truncated sequence
        (b'{"ts": 1764064800, "spo2": ', "not valid JSON"),
        (b'{"ts": 1', "not valid JSON"),
        (b"{'ts': 1}", "not valid JSON"),
        (b'{"a": 1} x', "not valid JSON"),
        (b'{"a": 1,}', "not valid JSON"),
        (b"   ", "not valid JSON"),
        (b"\xef\xbb\xbf", "not valid JSON"),
        (b'{"a": NaN}', "NaN"),
        (b'{"a": Infinity}', "Infinity"),
        (b'{"a": -Infinity}', "Infinity"),
        (b'{"a": 1e999}', "overflows"),
        (b'{"a": -1e999}', "overflows"),
        (b'{"a": ' + b"9" * 400 + b".0}", "overflows"),
        (b'{"a": ' + b"9" * 5000 + b"}", "too many digits"),
        (b'{"a": ' + b"[" * 8000 + b"]" * 8000 + b"}", "deeper than 64"),
        (b"[" * 8190 + b"]" * 8190, "deeper than 64"),
    ],
)
def test_decode_rejects_bad_json(payload: bytes, needle: str) -> None:
    assert len(payload) <= DEFAULT_MAX_BYTES
    err = _error(decode_payload, payload)
    assert err.code is ErrorCode.INVALID_JSON
    assert needle in err.message
    assert err.field is None and err.id is None
    _assert_wire_error(err)


def test_decode_errors_do_not_chain_the_decoders_exception() -> None:
    # JSONDecodeError.doc / UnicodeDecodeError.object hold the whole payload (maybe PHI).
    for payload in (b'{"text": "chest pain" x}', b'{"text": "chest pain \xff"}'):
        err = _error(decode_payload, payload)
        assert err.__cause__ is None and err.__suppress_context__


def test_decode_rejects_100000_deep_nesting_with_a_raised_size_limit() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    err = _error(decode_payload, deep, max_bytes=1_000_000)
    assert err.code is ErrorCode.INVALID_JSON


def test_decode_turns_recursion_error_into_invalid_json() -> None:
    # With the depth check disabled, the JSON scanner itself hits the recursion limit.
    deep = b"[" * 100_000 + b"]" * 100_000
    err = _error(decode_payload, deep, max_bytes=1_000_000, max_depth=10**9)
    assert err.code is ErrorCode.INVALID_JSON
    assert "nested too deeply" in err.message


def test_decode_depth_limit_boundary() -> None:
    def nested(depth: int) -> bytes:
        return b'{"a": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"

    assert decode_payload(nested(MAX_JSON_DEPTH))
    assert _error(decode_payload, nested(MAX_JSON_DEPTH + 1)).code is ErrorCode.INVALID_JSON


def test_decode_brackets_inside_strings_do_not_count_as_nesting() -> None:
    payload = json.dumps({"text": "[{" * 3000 + '\\"[' * 100}).encode()
    assert decode_payload(payload)["text"].startswith("[{[{")


def test_decode_unterminated_string_with_many_quotes_is_fast() -> None:
    payload = b"[" * 100 + b'"' + b'\\"' * 8000
    start = time.perf_counter()
    assert _error(decode_payload, payload).code is ErrorCode.INVALID_JSON
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize(
    "payload, kind",
    [
        (b"[1, 2]", "array"),
        (b'"x"', "string"),
        (b"3", "number"),
        (b"null", "null"),
        (b"true", "boolean"),
    ],
)
def test_decode_top_level_must_be_an_object(payload: bytes, kind: str) -> None:
    err = _error(decode_payload, payload)
    assert err.code is ErrorCode.INVALID_SCHEMA
    assert err.message == f"payload must be a JSON object, got {kind}"
    assert err.field is None


# -- query -----------------------------------------------------------------------------------


def test_api_example_query() -> None:
    assert parse_query(decode_payload(json.dumps(API_QUERY).encode())) == Query(
        id="q-123",
        text="I feel dizzy when I stand up. Should I worry?",
        max_tokens=256,
        stream=False,
        priority="normal",
        deadline_s=120.0,
        include_vitals=True,
        reply_to="optional/topic/for/mqtt-3.1.1/clients",
    )


def test_query_defaults() -> None:
    assert parse_query({"id": "q1", "text": "hi"}) == Query(
        id="q1",
        text="hi",
        max_tokens=256,
        stream=False,
        priority="normal",
        deadline_s=None,
        include_vitals=True,
        reply_to=None,
    )


def test_query_null_optional_fields_mean_not_given() -> None:
    nulls = dict.fromkeys(
        ["max_tokens", "stream", "priority", "deadline_s", "include_vitals", "reply_to", "history"]
    )
    assert _query(**nulls) == _query()


def test_default_max_tokens_never_exceeds_the_cap() -> None:
    assert parse_query({"id": "q", "text": "t"}, max_tokens_cap=128).max_tokens == 128
    assert parse_query({"id": "q", "text": "t"}, default_max_tokens=64).max_tokens == 64


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"max_tokens": 1}, ("max_tokens", 1)),
        ({"max_tokens": 512}, ("max_tokens", 512)),
        ({"max_tokens": 256.0}, ("max_tokens", 256)),
        ({"priority": "urgent"}, ("priority", "urgent")),
        ({"stream": True}, ("stream", True)),
        ({"include_vitals": False}, ("include_vitals", False)),
        ({"deadline_s": 0.001}, ("deadline_s", 0.001)),
        ({"deadline_s": 2.5}, ("deadline_s", 2.5)),
        ({"deadline_s": 86400}, ("deadline_s", 86400.0)),
        ({"text": "x" * 4000}, ("text", "x" * 4000)),
        ({"text": "é" * 4000}, ("text", "é" * 4000)),
        ({"reply_to": "r" * 1024}, ("reply_to", "r" * 1024)),
        ({"id": "A.b_c:d-9"}, ("id", "A.b_c:d-9")),
        ({"id": "i" * 64}, ("id", "i" * 64)),
        ({"unknown": {"nested": [1, 2]}}, ("text", "hello")),
    ],
)
def test_query_accepts(fields: dict[str, Any], expected: tuple[str, Any]) -> None:
    name, value = expected
    assert getattr(_query(**fields), name) == value


@pytest.mark.parametrize(
    "fields, code, field, message",
    [
        ({"max_tokens": 0}, "out_of_range", "max_tokens", "max_tokens = 0 is outside 1..512"),
        ({"max_tokens": 513}, "out_of_range", "max_tokens", "max_tokens = 513 is outside 1..512"),
        ({"max_tokens": 9000}, "out_of_range", "max_tokens", "max_tokens = 9000 is outside 1..512"),
        ({"max_tokens": -5}, "out_of_range", "max_tokens", "max_tokens = -5 is outside 1..512"),
        (
            {"max_tokens": 1.5},
            "invalid_schema",
            "max_tokens",
            "max_tokens = 1.5 must be a whole number",
        ),
        (
            {"max_tokens": True},
            "invalid_schema",
            "max_tokens",
            "max_tokens must be an integer, got boolean",
        ),
        (
            {"max_tokens": "256"},
            "invalid_schema",
            "max_tokens",
            "max_tokens must be an integer, got string",
        ),
        (
            {"text": "x" * 4001},
            "invalid_schema",
            "text",
            "text is 4001 characters; the limit is 4000",
        ),
        ({"text": ""}, "invalid_schema", "text", "text is empty; it must be 1..4000 characters"),
        ({"text": None}, "invalid_schema", "text", "text is required"),
        ({"text": 42}, "invalid_schema", "text", "text must be a string, got number"),
        ({"text": ["a"]}, "invalid_schema", "text", "text must be a string, got array"),
        (
            {"text": "ok \ud800"},
            "invalid_schema",
            "text",
            "text has an unpaired surrogate at character 3",
        ),
        (
            {"priority": "asap"},
            "invalid_schema",
            "priority",
            "priority = 'asap' is not one of normal, urgent",
        ),
        (
            {"priority": "URGENT"},
            "invalid_schema",
            "priority",
            "priority = 'URGENT' is not one of normal, urgent",
        ),
        ({"priority": 1}, "invalid_schema", "priority", "priority must be a string, got number"),
        (
            {"deadline_s": "60"},
            "invalid_schema",
            "deadline_s",
            "deadline_s must be a number, got string",
        ),
        (
            {"deadline_s": True},
            "invalid_schema",
            "deadline_s",
            "deadline_s must be a number, got boolean",
        ),
        (
            {"deadline_s": 0},
            "out_of_range",
            "deadline_s",
            "deadline_s = 0 must be > 0 and <= 86400",
        ),
        (
            {"deadline_s": -1.5},
            "out_of_range",
            "deadline_s",
            "deadline_s = -1.5 must be > 0 and <= 86400",
        ),
        (
            {"deadline_s": 86400.5},
            "out_of_range",
            "deadline_s",
            "deadline_s = 86400.5 must be > 0 and <= 86400",
        ),
        ({"stream": "true"}, "invalid_schema", "stream", "stream must be a boolean, got string"),
        ({"stream": 1}, "invalid_schema", "stream", "stream must be a boolean, got number"),
        (
            {"include_vitals": 0},
            "invalid_schema",
            "include_vitals",
            "include_vitals must be a boolean, got number",
        ),
        (
            {"include_vitals": {}},
            "invalid_schema",
            "include_vitals",
            "include_vitals must be a boolean, got object",
        ),
        ({"reply_to": 5}, "invalid_schema", "reply_to", "reply_to must be a string, got number"),
        (
            {"reply_to": ""},
            "invalid_schema",
            "reply_to",
            "reply_to is empty; leave it out to reply on the default topic",
        ),
        (
            {"reply_to": "r" * 1025},
            "invalid_schema",
            "reply_to",
            "reply_to is 1025 characters; the limit is 1024",
        ),
        (
            {"reply_to": "a/\udc00"},
            "invalid_schema",
            "reply_to",
            "reply_to has an unpaired surrogate at character 2",
        ),
    ],
)
def test_query_rejects_and_carries_the_id(
    fields: dict[str, Any], code: str, field: str, message: str
) -> None:
    err = _error(parse_query, {"id": "q1", "text": "hello", **fields})
    assert err.payload() == {
        "id": "q1",
        "code": code,
        "message": message,
        "field": field,
        "retry_after_ms": None,
    }


@pytest.mark.parametrize(
    "obj, message",
    [
        ({"text": "hi"}, "id is required"),
        ({"id": None, "text": "hi"}, "id is required"),
        ({"id": 5, "text": "hi"}, "id must be a string, got number"),
        ({"id": True, "text": "hi"}, "id must be a string, got boolean"),
        ({"id": "", "text": "hi"}, "id = '' does not match ^[A-Za-z0-9._:-]{1,64}$"),
        ({"id": "a b", "text": "hi"}, "id = 'a b' does not match ^[A-Za-z0-9._:-]{1,64}$"),
        ({"id": "q1\n", "text": "hi"}, "id = 'q1\\n' does not match ^[A-Za-z0-9._:-]{1,64}$"),
        (
            {"id": "i" * 65},
            "id = 'iiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiii… does not match ^[A-Za-z0-9._:-]{1,64}$",
        ),
        ({"id": "q/1", "text": "x" * 9000}, "id = 'q/1' does not match ^[A-Za-z0-9._:-]{1,64}$"),
    ],
)
def test_query_with_a_bad_id_has_no_id_in_its_error(obj: dict[str, Any], message: str) -> None:
    err = _error(parse_query, obj)
    assert (err.code, err.field, err.id, err.message) == (
        ErrorCode.INVALID_SCHEMA,
        "id",
        None,
        message,
    )


def test_query_max_tokens_cap_is_configurable() -> None:
    assert parse_query({"id": "q", "text": "t", "max_tokens": 1024}, max_tokens_cap=1024)
    err = _error(parse_query, {"id": "q", "text": "t", "max_tokens": 129}, max_tokens_cap=128)
    assert err.message == "max_tokens = 129 is outside 1..128"


def test_query_text_limit_is_configurable() -> None:
    err = _error(parse_query, {"id": "q", "text": "x" * 101}, max_text_chars=100)
    assert err.message == "text is 101 characters; the limit is 100"


def test_query_errors_never_contain_the_patients_words() -> None:
    secret = "my HIV status is "
    for text in (secret * 300, secret + "\ud800"):
        err = _error(parse_query, {"id": "q1", "text": text})
        assert "HIV" not in json.dumps(err.payload())


def test_query_payload_not_an_object() -> None:
    err = _error(parse_query, ["id", "q1"])  # type: ignore[arg-type]
    assert (err.code, err.field) == (ErrorCode.INVALID_SCHEMA, None)


# -- cancel ----------------------------------------------------------------------------------


def test_cancel() -> None:
    assert parse_cancel(decode_payload(b'{"id": "q-123", "extra": 1}')) == Cancel("q-123")


@pytest.mark.parametrize("obj", [{}, {"id": 1}, {"id": "a b"}, {"id": ["q1"]}, {"id": ""}])
def test_cancel_rejects_bad_ids(obj: dict[str, Any]) -> None:
    err = _error(parse_cancel, obj)
    assert (err.code, err.field, err.id) == (ErrorCode.INVALID_SCHEMA, "id", None)


# -- vitals ----------------------------------------------------------------------------------


def test_api_example_vitals() -> None:
    vitals = parse_vitals(decode_payload(json.dumps(API_VITALS).encode()), now=NOW)
    assert vitals == Vitals(
        ts=1764064800.0,
        window_s=60.0,
        heart_rate=VitalStat(mean=88, min=72, max=104),
        spo2=VitalStat(mean=95, min=93),
        resp_rate=VitalStat(mean=18),
        temp_c=VitalStat(mean=37.9),
        systolic_bp=VitalStat(mean=118),
        diastolic_bp=VitalStat(mean=76),
        hrv_rmssd_ms=VitalStat(mean=35),
        steps=VitalStat(mean=12),
        activity="rest",
        on_oxygen=False,
        spo2_scale=1,
        consciousness="alert",
        events=("fall", "irregular_rhythm"),
    )
    assert isinstance(vitals.ts, float) and isinstance(vitals.heart_rate.mean, float)  # type: ignore[union-attr]


def test_vitals_only_ts_is_required() -> None:
    assert _vitals() == Vitals(ts=NOW)


def test_vitals_null_means_not_measured() -> None:
    nulls = {name: None for name in [*VITAL_RANGES, "activity", "on_oxygen", "events"]}
    assert _vitals(**nulls) == Vitals(ts=NOW)
    assert _vitals(spo2={"mean": None, "min": 93}).spo2 == VitalStat(min=93)


def test_vitals_unknown_fields_are_ignored() -> None:
    assert _vitals(ecg=[1, 2, 3], heart_rate={"mean": 80, "sd": "x"}).heart_rate == VitalStat(80)


_BOUNDARIES = [
    # (vital, inside, outside): both sides of each range end of API.md "Plausible ranges".
    ("heart_rate", 20, 19.9),
    ("heart_rate", 300, 300.1),
    ("spo2", 50, 49.9),
    ("spo2", 100, 100.1),
    ("resp_rate", 2, 1.9),
    ("resp_rate", 80, 80.1),
    ("temp_c", 25, 24.9),
    ("temp_c", 45, 45.1),
    ("systolic_bp", 40, 39.9),
    ("systolic_bp", 300, 300.1),
    ("diastolic_bp", 20, 19.9),
    ("diastolic_bp", 200, 200.1),
    ("hrv_rmssd_ms", 0, -0.1),
    ("hrv_rmssd_ms", 500, 500.1),
    ("steps", 0, -1),
    ("steps", 100000, 100001),
]


@pytest.mark.parametrize("name, inside, outside", _BOUNDARIES)
def test_vital_range_boundaries_bare_number(name: str, inside: float, outside: float) -> None:
    assert getattr(_vitals(**{name: inside}), name) == VitalStat(mean=inside)
    err = _error(_vitals, **{name: outside})
    lo, hi = VITAL_RANGES[name]
    assert err.payload() == {
        "id": None,
        "code": "out_of_range",
        "message": f"{name} = {outside} is outside {lo}..{hi}",
        "field": name,
        "retry_after_ms": None,
    }


@pytest.mark.parametrize("key", ["mean", "min", "max"])
@pytest.mark.parametrize("name, inside, outside", _BOUNDARIES)
def test_vital_range_boundaries_in_objects(
    name: str, inside: float, outside: float, key: str
) -> None:
    assert getattr(getattr(_vitals(**{name: {key: inside}}), name), key) == inside
    err = _error(_vitals, **{name: {key: outside}})
    lo, hi = VITAL_RANGES[name]
    assert (err.code, err.field) == (ErrorCode.OUT_OF_RANGE, f"{name}.{key}")
    assert err.message == f"{name}.{key} = {outside} is outside {lo}..{hi}"


def test_spo2_min_message_matches_the_contract_example() -> None:
    err = _error(_vitals, spo2={"mean": 95, "min": 130})
    assert err.payload() == {
        "id": None,
        "code": "out_of_range",
        "message": "spo2.min = 130 is outside 50..100",
        "field": "spo2.min",
        "retry_after_ms": None,
    }
    assert _error(_vitals, heart_rate=400).message == "heart_rate = 400 is outside 20..300"


@pytest.mark.parametrize(
    "stat, message",
    [
        ({"min": 90, "mean": 80}, "heart_rate.min = 90 is above heart_rate.mean = 80"),
        ({"mean": 110, "max": 104}, "heart_rate.mean = 110 is above heart_rate.max = 104"),
        ({"min": 105, "max": 104.5}, "heart_rate.min = 105 is above heart_rate.max = 104.5"),
        (
            {"min": 72, "mean": 120, "max": 104},
            "heart_rate.mean = 120 is above heart_rate.max = 104",
        ),
    ],
)
def test_vital_out_of_order_is_out_of_range_on_the_vital(
    stat: dict[str, float], message: str
) -> None:
    err = _error(_vitals, heart_rate=stat)
    assert (err.code, err.field) == (ErrorCode.OUT_OF_RANGE, "heart_rate")
    assert err.message.startswith(message)


def test_vital_equal_min_mean_max_is_fine() -> None:
    assert _vitals(heart_rate={"min": 80, "mean": 80, "max": 80}).heart_rate == VitalStat(
        80, 80, 80
    )


@pytest.mark.parametrize(
    "fields, field, message",
    [
        (
            {"heart_rate": True},
            "heart_rate",
            "heart_rate must be a number or an object with mean, min or max, got boolean",
        ),
        (
            {"heart_rate": "88"},
            "heart_rate",
            "heart_rate must be a number or an object with mean, min or max, got string",
        ),
        (
            {"heart_rate": [88]},
            "heart_rate",
            "heart_rate must be a number or an object with mean, min or max, got array",
        ),
        ({"heart_rate": {}}, "heart_rate", "heart_rate must have at least one of mean, min, max"),
        (
            {"heart_rate": {"avg": 80}},
            "heart_rate",
            "heart_rate must have at least one of mean, min, max",
        ),
        ({"spo2": {"min": False}}, "spo2.min", "spo2.min must be a number, got boolean"),
        ({"spo2": {"mean": "95"}}, "spo2.mean", "spo2.mean must be a number, got string"),
        ({"spo2": {"max": [99]}}, "spo2.max", "spo2.max must be a number, got array"),
        ({"steps": 12.5}, "steps", "steps = 12.5 must be a whole number"),
        ({"steps": {"max": 3.5}}, "steps.max", "steps.max = 3.5 must be a whole number"),
        (
            {"steps": True},
            "steps",
            "steps must be a number or an object with mean, min or max, got boolean",
        ),
        ({"window_s": True}, "window_s", "window_s must be a number, got boolean"),
        ({"window_s": "60"}, "window_s", "window_s must be a number, got string"),
        (
            {"activity": "jog"},
            "activity",
            "activity = 'jog' is not one of rest, walk, run, sleep, unknown",
        ),
        ({"activity": 1}, "activity", "activity must be a string, got number"),
        (
            {"consciousness": "confused"},
            "consciousness",
            "consciousness = 'confused' is not one of "
            "alert, new_confusion, voice, pain, unresponsive",
        ),
        (
            {"consciousness": ["alert"]},
            "consciousness",
            "consciousness must be a string, got array",
        ),
        ({"spo2_scale": 3}, "spo2_scale", "spo2_scale = 3 is not one of 1, 2"),
        ({"spo2_scale": 0}, "spo2_scale", "spo2_scale = 0 is not one of 1, 2"),
        ({"spo2_scale": 1.5}, "spo2_scale", "spo2_scale = 1.5 must be a whole number"),
        ({"spo2_scale": "1"}, "spo2_scale", "spo2_scale must be an integer, got string"),
        ({"spo2_scale": True}, "spo2_scale", "spo2_scale must be an integer, got boolean"),
        ({"on_oxygen": "false"}, "on_oxygen", "on_oxygen must be a boolean, got string"),
        ({"on_oxygen": 0}, "on_oxygen", "on_oxygen must be a boolean, got number"),
        ({"events": "fall"}, "events", "events must be an array of strings, got string"),
        ({"events": {"fall": True}}, "events", "events must be an array of strings, got object"),
        ({"events": ["e"] * 17}, "events", "events has 17 items; the limit is 16"),
        ({"events": ["fall", 3]}, "events[1]", "events[1] must be a string, got number"),
        ({"events": ["Fall"]}, "events[0]", "events[0] = 'Fall' does not match ^[a-z0-9_]{1,64}$"),
        ({"events": ["fall", ""]}, "events[1]", "events[1] = '' does not match ^[a-z0-9_]{1,64}$"),
        (
            {"events": ["no-dash"]},
            "events[0]",
            "events[0] = 'no-dash' does not match ^[a-z0-9_]{1,64}$",
        ),
        (
            {"events": ["fall\n"]},
            "events[0]",
            "events[0] = 'fall\\n' does not match ^[a-z0-9_]{1,64}$",
        ),
        (
            {"events": ["e" * 65]},
            "events[0]",
            "events[0] = 'eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee… does not match ^[a-z0-9_]{1,64}$",
        ),
    ],
)
def test_vitals_schema_errors(fields: dict[str, Any], field: str, message: str) -> None:
    err = _error(_vitals, **fields)
    assert err.payload() == {
        "id": None,
        "code": "invalid_schema",
        "message": message,
        "field": field,
        "retry_after_ms": None,
    }


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"window_s": 0.9}, "window_s"),
        ({"window_s": 3600.1}, "window_s"),
        ({"window_s": 0}, "window_s"),
        ({"heart_rate": 10**400}, "heart_rate"),
        ({"heart_rate": -(10**400)}, "heart_rate"),
    ],
)
def test_vitals_out_of_range(fields: dict[str, Any], field: str) -> None:
    err = _error(_vitals, **fields)
    assert (err.code, err.field) == (ErrorCode.OUT_OF_RANGE, field)
    assert len(err.message) < 120


@pytest.mark.parametrize(
    "fields, name, value",
    [
        ({"window_s": 1}, "window_s", 1.0),
        ({"window_s": 3600}, "window_s", 3600.0),
        ({"window_s": 30.5}, "window_s", 30.5),
        ({"steps": 12.0}, "steps", VitalStat(mean=12)),
        ({"steps": {"min": 0, "max": 40}}, "steps", VitalStat(min=0, max=40)),
        ({"spo2_scale": 2}, "spo2_scale", 2),
        ({"spo2_scale": 2.0}, "spo2_scale", 2),
        ({"on_oxygen": True}, "on_oxygen", True),
        ({"activity": "unknown"}, "activity", "unknown"),
        ({"consciousness": "new_confusion"}, "consciousness", "new_confusion"),
        ({"events": []}, "events", ()),
        ({"events": ["future_event_2031"]}, "events", ("future_event_2031",)),
        ({"events": ["e"] * 16}, "events", ("e",) * 16),
        ({"events": ["e" * 64]}, "events", ("e" * 64,)),
    ],
)
def test_vitals_accepts(fields: dict[str, Any], name: str, value: Any) -> None:
    assert getattr(_vitals(**fields), name) == value


@pytest.mark.parametrize("ts", [True, None, [NOW], {"s": NOW}])
def test_vitals_ts_required_and_typed(ts: Any) -> None:
    obj = {} if ts is None else {"ts": ts}
    err = _error(parse_vitals, obj, now=NOW)
    assert (err.code, err.field) == (ErrorCode.INVALID_SCHEMA, "ts")


@pytest.mark.parametrize(
    "ts, seconds",
    [
        (NOW, NOW),
        (1764064800, NOW),
        (1764064800.25, NOW + 0.25),
        (946684800, 946684800.0),
        (NOW + 86400, NOW + 86400),
        ("2025-11-25T10:00:00Z", NOW),
        ("2025-11-25t10:00:00z", NOW),
        ("2025-11-25 10:00:00Z", NOW),
        ("2025-11-25T10:00:00.250Z", NOW + 0.25),
        ("2025-11-25T11:00:00+01:00", NOW),
        ("2025-11-25T15:30:00+05:30", NOW),
        ("2025-11-25T05:00:00-05:00", NOW),
        ("2025-11-25T10:00:00-00:00", NOW),
        ("2016-12-31T23:59:60Z", 1483228800.0),  # a leap second
        ("2000-01-01T00:00:00Z", 946684800.0),
    ],
)
def test_vitals_ts_numbers_and_rfc3339(ts: Any, seconds: float) -> None:
    assert parse_vitals({"ts": ts}, now=NOW).ts == pytest.approx(seconds, abs=1e-6)


@pytest.mark.parametrize(
    "ts",
    [
        "yesterday",
        "2025-11-25",
        "2025-11-25T10:00:00",  # no offset: local time is ambiguous
        "2025-11-25T10:00Z",
        "2025-13-01T00:00:00Z",
        "2025-02-30T00:00:00Z",
        "2025-11-25T24:00:00Z",
        "2025-11-25T10:60:00Z",
        "2025-11-25T10:00:61Z",
        "2025-11-25T10:00:00+24:00",
        "2025-11-25T10:00:00+01:60",
        "0000-01-01T00:00:00Z",
        "２０２５-11-25T10:00:00Z",  # fullwidth digits
        "1764064800",
        "",
    ],
)
def test_vitals_ts_unreadable_strings_are_invalid_schema(ts: str) -> None:
    err = _error(parse_vitals, {"ts": ts}, now=NOW)
    assert (err.code, err.field) == (ErrorCode.INVALID_SCHEMA, "ts")


@pytest.mark.parametrize(
    "ts",
    [
        946684799.9,
        0,
        -1,
        NOW + 86400.1,
        NOW * 1000,
        10**400,
        "1999-12-31T23:59:59Z",
        "2025-11-26T10:00:01Z",
        "9999-12-31T23:59:59Z",
    ],
)
def test_vitals_absurd_ts_is_out_of_range(ts: Any) -> None:
    err = _error(parse_vitals, {"ts": ts}, now=NOW)
    assert (err.code, err.field) == (ErrorCode.OUT_OF_RANGE, "ts")


def test_vitals_ts_in_milliseconds_gets_a_hint() -> None:
    assert "milliseconds" in _error(parse_vitals, {"ts": NOW * 1000}, now=NOW).message


def test_vitals_ts_defaults_to_the_clock() -> None:
    assert parse_vitals({"ts": time.time()}).ts
    assert _error(parse_vitals, {"ts": time.time() + 2 * 86400}).code is ErrorCode.OUT_OF_RANGE


def test_vital_stat_helpers() -> None:
    full = VitalStat(mean=95, min=91, max=99)
    assert (full.worst_low, full.worst_high, full.central) == (91, 99, 95)
    assert (VitalStat(mean=95).worst_low, VitalStat(mean=95).worst_high) == (95, 95)
    assert VitalStat(min=90, max=100).central == 95
    assert VitalStat(min=90).worst_high == 90
    assert VitalStat(max=100).central == 100


# -- whole pipeline: anything in, only ProtocolError out --------------------------------------

_PARSERS: list[Callable[[Any], object]] = [
    lambda obj: parse_vitals(obj, now=NOW),
    parse_query,
    parse_cancel,
]

_EXTREMES = [10**400, -(10**400), 2**64, 1e308, -0.0, 5e-324, math.inf, math.nan, "\ud800"]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["rest", "alert", "fall", "2025-11-25T10:00:00Z", "q1", "urgent"])
    | st.sampled_from(_EXTREMES),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)
_VITALS_KEYS = [
    "window_s",
    *VITAL_RANGES,
    "activity",
    "on_oxygen",
    "spo2_scale",
    "consciousness",
    "events",
]
_QUERY_KEYS = [
    "max_tokens",
    "stream",
    "priority",
    "deadline_s",
    "include_vitals",
    "reply_to",
    "history",
]
_stat_values = st.fixed_dictionaries(
    {},
    optional={
        key: st.none()
        | st.floats()
        | st.integers()
        | st.sampled_from(_EXTREMES)
        | st.booleans()
        | st.text(max_size=3)
        for key in ("mean", "min", "max")
    },
)
_field_values = (
    json_values
    | st.sampled_from(_EXTREMES)
    | _stat_values
    | st.floats(-10, 2e5)
    | st.integers(-10, 2 * 10**5)
    | st.lists(st.sampled_from(["fall", "Fall", "", 1, "x" * 65]), max_size=20)
)
# A valid `ts` / `id` + `text` so that generation gets past the first check into every field.
vitals_objects = st.fixed_dictionaries(
    {"ts": st.just(NOW) | json_values | st.floats(9e8, 2e9)},
    optional={key: _field_values for key in _VITALS_KEYS},
)
query_objects = st.fixed_dictionaries(
    {"id": st.just("q1") | json_values, "text": st.just("hi") | json_values},
    optional={key: _field_values for key in _QUERY_KEYS},
)


def _run_everything(payload: bytes) -> None:
    try:
        obj = decode_payload(payload)
    except ProtocolError as err:
        _assert_wire_error(err)
        return
    _check_parsers(obj)


def _check_parsers(obj: Any) -> None:
    for parse in _PARSERS:
        try:
            parse(obj)
        except ProtocolError as err:
            _assert_wire_error(err)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_ever_raise_protocol_error(payload: bytes) -> None:
    _run_everything(payload)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_arbitrary_json_values_only_ever_raise_protocol_error(value: Any) -> None:
    _run_everything(json.dumps(value).encode())  # NaN/Infinity included: dumps allows them
    _check_parsers(value)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(vitals_objects, query_objects))
def test_objects_with_known_fields_only_ever_raise_protocol_error(obj: dict[str, Any]) -> None:
    _check_parsers(obj)
    _run_everything(json.dumps(obj).encode())


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_only_ever_raises_protocol_error(text: str) -> None:
    _run_everything(text.encode("utf-8", "surrogatepass"))


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_non_finite_vitals_never_pass(value: float) -> None:
    for name, (lo, hi) in VITAL_RANGES.items():
        try:
            stat = parse_vitals({"ts": NOW, name: value}, now=NOW).__getattribute__(name)
        except ProtocolError:
            continue
        assert math.isfinite(stat.mean) and lo <= stat.mean <= hi


# -- hygiene ---------------------------------------------------------------------------------


def test_nothing_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for payload in (json.dumps(API_VITALS).encode(), b"\xff", b'{"id": "q1", "text": 5}'):
        _run_everything(payload)
    parse_query(API_QUERY)
    assert not [r for r in caplog.records if r.name.startswith("edged.mqtt")]


def test_importing_the_pure_layer_does_not_import_the_transport() -> None:
    code = (
        "import sys, edged.mqtt.messages, edged.mqtt.topics, edged.mqtt.errors;"
        "assert not any(m.startswith('paho') for m in sys.modules), 'paho imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- did you mean (issue #14, the first hour) ------------------------------------------------


@pytest.mark.parametrize("sent", ["prompt", "question", "content", "Text", "txt"])
def test_a_query_with_a_near_miss_for_text_says_which_field_it_meant(sent: str) -> None:
    err = _error(parse_query, {"id": "q1", sent: "Should I worry?"})
    assert err.field == "text" and err.id == "q1"
    assert str(err) == f"text is required; got '{sent}': did you mean 'text'?"


def test_missing_fields_without_a_near_miss_keep_the_plain_message() -> None:
    assert str(_error(parse_query, {"id": "q1", "colour": "blue"})) == "text is required"
    assert str(_error(parse_query, {"text": "hi"})) == "id is required"


def test_a_query_id_and_a_turn_name_their_near_misses() -> None:
    err = _error(parse_query, {"query_id": "q1", "text": "hi"})
    assert (err.field, str(err)) == ("id", "id is required; got 'query_id': did you mean 'id'?")
    # A chat API's turn ({"role", "content"}) sent as history:
    turn = {"role": "user", "content": "I was dizzy yesterday."}
    err = _error(parse_query, {"id": "q1", "text": "hi", "history": [turn]})
    assert err.field == "history.0.text"
    assert str(err).endswith("got 'content': did you mean 'text'?")


def test_a_summary_whose_fields_are_all_unknown_is_an_error_naming_the_near_misses() -> None:
    err = _error(parse_vitals, {"ts": NOW, "hr": 80, "SpO2": 95, "colour": "red"}, now=NOW)
    assert err.code == ErrorCode.INVALID_SCHEMA and err.field is None
    message = str(err)
    assert message.startswith("the summary has no reading: none of heart_rate, spo2,")
    assert "got 'hr': did you mean 'heart_rate'?" in message
    assert "got 'SpO2': did you mean 'spo2'?" in message
    assert "colour" not in message


def test_ts_alone_and_unknown_fields_beside_a_reading_stay_valid() -> None:
    # API.md v1: every vital is optional and unknown fields are ignored; only a summary that
    # is nothing but unknown fields is refused.
    assert _vitals() == Vitals(ts=NOW)
    assert _vitals(heart_rate=70, hr=80).heart_rate == VitalStat(70)


def test_a_summary_without_ts_names_a_near_miss() -> None:
    err = _error(parse_vitals, {"timestamp": NOW, "heart_rate": 70}, now=NOW)
    assert (err.field, str(err)) == ("ts", "ts is required; got 'timestamp': did you mean 'ts'?")
