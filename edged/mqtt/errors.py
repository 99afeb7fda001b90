"""Wire errors of the MQTT contract (v1): the codes and the exact error payload.

Every problem with an inbound message becomes a `ProtocolError`; `payload()` is what goes back
on the wire, always with all five keys (`id`, `code`, `message`, `field`, `retry_after_ms`),
`null` when unknown, never omitted.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

_SHOWN_CHARS = 40
"""Values echoed in messages are cut to this many characters: never send a whole text back."""


class ErrorCode(str, Enum):
    INVALID_JSON = "invalid_json"
    """Not UTF-8, not JSON, a non-finite number, nested too deeply."""
    INVALID_SCHEMA = "invalid_schema"
    """A required field missing, a wrong type, a string breaking its pattern or length, an
    unknown enum value, a topic that is not one of ours."""
    OUT_OF_RANGE = "out_of_range"
    """A number outside its range."""
    TOO_LARGE = "too_large"
    INVALID_WEARER = "invalid_wearer"
    FORBIDDEN_REPLY_TOPIC = "forbidden_reply_topic"
    BUSY = "busy"
    """Queue full; `retry_after_ms` is set."""
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    INTERNAL = "internal"


def error_payload(
    code: ErrorCode | str,
    message: str,
    field: str | None = None,
    id: str | None = None,
    retry_after_ms: int | None = None,
) -> dict[str, Any]:
    """The wire error object; every key present, `None` (JSON null) when unknown."""
    return {
        "id": id,
        "code": ErrorCode(code).value,
        "message": message,
        "field": field,
        "retry_after_ms": retry_after_ms,
    }


class ProtocolError(Exception):
    """An inbound message the daemon refuses; `payload()` is the reply sent to the client."""

    def __init__(
        self,
        code: ErrorCode | str,
        message: str,
        field: str | None = None,
        id: str | None = None,
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.field = field
        """Dotted path of the offending field (`spo2.min`, `events[2]`); None: the message."""
        self.id = id
        """The query id when it was readable and valid, else None."""
        self.retry_after_ms = retry_after_ms

    def payload(self) -> dict[str, Any]:
        return error_payload(self.code, self.message, self.field, self.id, self.retry_after_ms)

    def with_id(self, id: str | None) -> ProtocolError:
        """A copy carrying the query id, so the client can correlate the error."""
        return ProtocolError(self.code, self.message, self.field, id, self.retry_after_ms)

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            ProtocolError,
            (self.code, self.message, self.field, self.id, self.retry_after_ms),
        )

    def __repr__(self) -> str:
        return (
            f"ProtocolError({self.code.value!r}, {self.message!r}, field={self.field!r}, "
            f"id={self.id!r}, retry_after_ms={self.retry_after_ms!r})"
        )


def show_value(value: Any) -> str:
    """`value` as it appears in an error message: repr, cut to about 40 characters."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        # Past sys.get_int_max_str_digits() an int cannot even be printed.
        digits = int(value.bit_length() * 0.30103) + 1
        return f"<integer of about {digits} digits>"
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        return f"<{json_type(value)}>"
    if len(text) > _SHOWN_CHARS:
        text = text[: _SHOWN_CHARS - 1] + "…"
    return text


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for 'must be a number, got string'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
