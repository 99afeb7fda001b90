"""The messages the pipeline's stages pass on: what inbound handlers decide, and what the worker
hands to the delivery owner. Plain frozen values, so handlers can be tested by comparing them.
"""

from __future__ import annotations

from dataclasses import dataclass

from edged.domain import Query
from edged.mqtt.routing import ReplyRoute
from edged.mqtt.transport import AckToken
from edged.scheduler import Job

# -- what an inbound handler decides (carried out by the Dispatcher) ---------------------------


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    correlation: bytes | None = None
    ack_after: tuple[AckToken, ...] = ()
    """Inbound messages to acknowledge once the broker has acknowledged this one: a vitals
    summary is acknowledged only after its alert is safe at the broker."""


@dataclass(frozen=True)
class Ack:
    token: AckToken


@dataclass(frozen=True)
class Accept:
    """A valid query, for the delivery owner: deduplicate, admit, queue."""

    wearer: str
    query: Query
    route: ReplyRoute
    ack: AckToken
    received_at: float
    """time.monotonic() at receipt."""


@dataclass(frozen=True)
class CancelQuery:
    wearer: str
    query_id: str
    ack: AckToken


@dataclass(frozen=True)
class Count:
    """Bump a counter (a `CounterValues` field)."""

    counter: str
    amount: float = 1
    label: str | None = None
    """For a counter split by a label (metrics.LABELS): the error code, the alert's severity."""


@dataclass(frozen=True)
class WearerSeen:
    """A valid vitals summary came from this wearer (for Home Assistant discovery, when on)."""

    wearer: str


@dataclass(frozen=True)
class HoldAlert:
    """Share groups: this node is the wearer's backup; publish `alert` only if the owner's copy
    (the same alert_id) is not seen in time (service/group.py, AlertBackup)."""

    alert_id: str
    alert: Publish
    owner: str


@dataclass(frozen=True)
class AlertSeen:
    """Share groups: an alert was published (by its owner, or by this node)."""

    alert_id: str


Outcome = Publish | Ack | Accept | CancelQuery | Count | WearerSeen | HoldAlert | AlertSeen


# -- what the worker hands to the delivery owner -----------------------------------------------


@dataclass(frozen=True)
class QueryWork:
    """A job's payload: the parsed query and where its replies go."""

    query: Query
    route: ReplyRoute


@dataclass(frozen=True)
class FinalReply:
    """The job's final reply (advice or error). `store`: keep it for redeliveries (every final
    reply but `busy`, which a retry of the same id must be able to get past)."""

    job: Job
    payload: bytes
    error_code: str | None = None
    """The error's code (API.md, Errors) when the reply is an error; None for advice."""
    store: bool = True
    finish_reason: str | None = None
    """Advice only: why generation ended (API.md, Advice)."""


@dataclass(frozen=True)
class Abandoned:
    """The daemon stopped mid-generation: no reply, no acknowledgement, so the broker
    redelivers the query to the next start."""

    job: Job
