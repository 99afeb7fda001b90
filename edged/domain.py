"""The plain types every layer shares: ids and their patterns, the parsed inbound messages
(`Vitals`, `Query`, `Cancel`) and the closed vocabularies (risk, priority, finish reason,
governor state, board profile, red-flag names, node state).

This module imports nothing from edged, so `clinical/`, `config/`, `governor/`, `mqtt/`,
`engine/` and `service/` can all depend on it without depending on each other. Each name is
defined here once; the wire contract (API.md) is where the spellings come from.
"""

from __future__ import annotations

import hashlib
import re
import socket
import sys
import unicodedata
from dataclasses import dataclass
from enum import Enum
from typing import Literal

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # Python 3.10 (JetPack 6's Ubuntu 22.04): the same behaviour, by hand

    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str(self.value)

        def __format__(self, spec: str) -> str:
            return format(str(self.value), spec)


# -- ids -------------------------------------------------------------------------------------

WEARER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
"""One topic level naming a wearer (patient/device); also the pattern of node ids (API.md)."""
QUERY_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"
"""A query id, unique per wearer (API.md)."""

_WEARER_RE = re.compile(WEARER_PATTERN)
_QUERY_ID_RE = re.compile(QUERY_ID_PATTERN)
_NOT_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


def is_valid_wearer(value: str) -> bool:
    # fullmatch: `$` alone would also accept a trailing newline.
    return _WEARER_RE.fullmatch(value) is not None


def is_valid_query_id(value: object) -> bool:
    return isinstance(value, str) and _QUERY_ID_RE.fullmatch(value) is not None


def sanitize_node_id(name: str) -> str:
    """A host name turned into a valid node id: `ward3.pi.local` -> `ward3-pi-local`.

    Accents are dropped (`bücher` -> `bucher`), every run of other characters becomes one `-`,
    and the result is cut to 64 characters. A name with nothing usable left becomes
    `node-<8 hex digits of its sha256>`, so two such hosts still get different ids.
    """
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    node = _NOT_ID_CHARS.sub("-", ascii_name).strip("-_")[:64].rstrip("-_")
    if not node:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        node = f"node-{digest}"
    return node


def default_node_id() -> str:
    return sanitize_node_id(socket.gethostname())


# -- vocabularies ----------------------------------------------------------------------------


class Risk(StrEnum):
    """NEWS2 clinical risk (RCP NEWS2 2017, chart 3), lowest first; API.md spells them so."""

    LOW = "low"
    LOW_MEDIUM = "low_medium"
    """A single parameter scoring 3 (a "red score")."""
    MEDIUM = "medium"
    HIGH = "high"

    @property
    def rank(self) -> int:
        return _RISK_RANKS[self]


_RISK_RANKS = {risk: rank for rank, risk in enumerate(Risk)}

Severity = Literal["low_medium", "medium", "high"]
"""The risks that raise an alert, and the severities a red flag can have."""
SEVERITIES: tuple[Severity, ...] = ("low_medium", "medium", "high")


class Priority(StrEnum):
    """A query's priority (API.md); the scheduler serves urgent ones first."""

    NORMAL = "normal"
    URGENT = "urgent"


class FinishReason(StrEnum):
    """Why an answer ended (API.md `finish_reason`)."""

    STOP = "stop"
    """End of sequence or a stop string."""
    LENGTH = "length"
    """max_tokens, the governor's cap or the context."""
    CANCELLED = "cancelled"
    DEADLINE = "deadline"
    DEGRADED = "degraded"
    """The model was not run (disabled, failed to load, or paused by the governor)."""
    SHUTDOWN = "shutdown"
    """Internal: the daemon is stopping; the query is left for redelivery, never answered so."""


class GovernorState(StrEnum):
    """The governor's thermal states, coolest first."""

    NOMINAL = "nominal"
    WARM = "warm"
    HOT = "hot"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return _GOVERNOR_RANKS[self]


_GOVERNOR_RANKS = {state: rank for rank, state in enumerate(GovernorState)}


class BoardProfile(StrEnum):
    """Boards with their own defaults (thermal bands; fleet profiles are keyed by these)."""

    PI4 = "pi4"
    PI5 = "pi5"
    JETSON_ORIN_NANO = "jetson-orin-nano"
    GENERIC = "generic"


class RedFlagName(StrEnum):
    """Wearable red flags beyond NEWS2 (docs/clinical.md cites the source of each)."""

    SPO2_LOW = "spo2_low"
    FALL = "fall"
    BRADYCARDIA = "bradycardia"
    RESTING_TACHYCARDIA = "resting_tachycardia"
    IRREGULAR_RHYTHM = "irregular_rhythm"
    FEVER = "fever"
    RESTING_HR_RISING = "resting_hr_rising"


class TurnRole(StrEnum):
    """Who spoke an earlier turn of a conversation (API.md v1.1 `history`)."""

    USER = "user"
    ASSISTANT = "assistant"


class NodeState(StrEnum):
    """The node status `state` (API.md)."""

    STARTING = "starting"
    ONLINE = "online"
    DEGRADED = "degraded"
    DRAINING = "draining"
    OFFLINE = "offline"


# -- inbound messages ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VitalStat:
    """One vital over the window: any of mean, min, max (at least one); a bare number is a mean."""

    mean: float | None = None
    min: float | None = None
    max: float | None = None

    @property
    def worst_low(self) -> float:
        """The lowest value present (min, else mean, else max): what low-side rules score."""
        for value in (self.min, self.mean, self.max):
            if value is not None:
                return value
        raise ValueError("VitalStat has no value")

    @property
    def worst_high(self) -> float:
        """The highest value present (max, else mean, else min): what high-side rules score."""
        for value in (self.max, self.mean, self.min):
            if value is not None:
                return value
        raise ValueError("VitalStat has no value")

    @property
    def central(self) -> float:
        """The mean, else the midpoint of min and max, else the only value present."""
        if self.mean is not None:
            return self.mean
        if self.min is not None and self.max is not None:
            return (self.min + self.max) / 2
        return self.worst_low


@dataclass(frozen=True, slots=True)
class Vitals:
    """One vitals summary from a wearer's gateway; every vital optional except `ts`."""

    ts: float
    """When the gateway took the summary, UNIX seconds (an RFC 3339 `ts` is converted)."""
    window_s: float | None = None
    heart_rate: VitalStat | None = None
    spo2: VitalStat | None = None
    resp_rate: VitalStat | None = None
    temp_c: VitalStat | None = None
    systolic_bp: VitalStat | None = None
    diastolic_bp: VitalStat | None = None
    hrv_rmssd_ms: VitalStat | None = None
    steps: VitalStat | None = None
    """Step count; its values are whole numbers."""
    activity: str | None = None
    on_oxygen: bool | None = None
    spo2_scale: int | None = None
    consciousness: str | None = None
    events: tuple[str, ...] = ()
    """Event names as sent (unknown ones kept, for forward compatibility), in order."""


@dataclass(frozen=True, slots=True)
class Query:
    id: str
    """Client-chosen, unique per wearer."""
    text: str
    """The wearer's words: PHI, never logged or echoed in errors."""
    max_tokens: int
    stream: bool
    priority: Priority
    deadline_s: float | None
    """Seconds from receipt; None: no deadline."""
    include_vitals: bool
    reply_to: str | None
    """The payload's reply topic (for MQTT 3.1.1 clients), as sent; `mqtt.routing` decides
    where replies actually go (an MQTT 5 Response Topic takes precedence)."""
    history: tuple[Turn, ...] = ()
    """Earlier turns of the conversation, oldest first (API.md v1.1): PHI like `text`, and
    never kept once the query is answered."""


@dataclass(frozen=True, slots=True)
class Turn:
    """One earlier turn of a conversation, as the client sent it."""

    role: TurnRole
    text: str
    """The words of the wearer or of an earlier answer: PHI, never logged or echoed."""


@dataclass(frozen=True, slots=True)
class Cancel:
    id: str
    """The query to cancel; unknown or finished ids are ignored."""
