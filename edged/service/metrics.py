"""What the daemon has done and how it is doing, as one immutable snapshot.

Each counting thread (network, delivery, worker) owns its own `Counters` and is its only writer,
so counting takes no lock on the vitals path; a snapshot adds them up. Everything else a
snapshot holds is read from its owner's published state (the governor's decision, the
backend's parallelism, the scheduler's estimates). The retained status topic,
systemd's STATUS line, the tests and the tools all read `Daemon.metrics()`, never the parts.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields

from edged import __version__
from edged.domain import GovernorState, NodeState
from edged.mqtt.payloads import encode, status_payload


@dataclass(frozen=True)
class CounterValues:
    received: int = 0
    """Inbound messages of any kind."""
    vitals: int = 0
    """Valid vitals summaries."""
    queries: int = 0
    """Valid queries (redeliveries included)."""
    answered: int = 0
    """Final replies published (advice or error) for accepted queries."""
    advice: int = 0
    """Final replies that are advice (`answered` less the errors)."""
    errors: int = 0
    """Error replies of any kind."""
    duplicates: int = 0
    """Redeliveries of queries running, queued or answered."""
    alerts: int = 0
    paused_s: float = 0.0
    """Time inference rested between decode steps (the governor's duty cycle)."""
    prompt_tokens: int = 0
    """Prompt tokens the model computed (those the prefix cache held are not counted)."""
    prompt_s: float = 0.0
    """Time spent computing them (prefill)."""
    predicted_tokens: int = 0
    """Tokens generated."""
    predicted_s: float = 0.0
    """Time spent generating them (decode)."""
    by_label: dict[str, dict[str, int]] = field(default_factory=dict)
    """Counts split by one label, for the counters in LABELS: {"errors": {"busy": 2}, ...}."""


LABELS = {"errors": "code", "alerts": "severity", "advice": "finish_reason"}
"""The counters split by a label, and the label's name. Never a wearer or query id: a label
per wearer would grow without bound and put patients' ids into a monitoring system."""

_FIELDS = tuple(f.name for f in fields(CounterValues) if f.name != "by_label")


class Counters:
    """The counts of one thread, written by that thread only (no lock); any thread may read
    them, at worst one count behind."""

    def __init__(self) -> None:
        self._values: dict[str, float] = dict.fromkeys(_FIELDS, 0)
        self._by_label: dict[str, dict[str, int]] = {name: {} for name in LABELS}

    def add(self, name: str, amount: float = 1, label: str | None = None) -> None:
        self._values[name] += amount
        if label is not None:
            split = self._by_label[name]
            split[label] = split.get(label, 0) + int(amount)

    def values(self) -> dict[str, float]:
        return dict(self._values)  # the keys never change, so copying is safe meanwhile

    def labelled(self) -> dict[str, dict[str, int]]:
        # dict() copies a dict in one step under the GIL, so a label added meanwhile by the
        # owner is either in the copy or not, never half there.
        return {name: dict(split) for name, split in self._by_label.items()}


def total(*owners: Counters) -> CounterValues:
    summed: dict[str, float] = dict.fromkeys(_FIELDS, 0)  # ints stay ints; the _s are floats
    by_label: dict[str, dict[str, int]] = {name: {} for name in LABELS}
    for owner in owners:
        for name, value in owner.values().items():
            summed[name] += value
        for name, split in owner.labelled().items():
            for label, count in split.items():
                by_label[name][label] = by_label[name].get(label, 0) + count
    return CounterValues(**summed, by_label=by_label)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Metrics:
    state: NodeState
    connected: bool
    """The broker accepted the connection."""
    ready: bool
    """Connected and subscribed: queries published now reach this node."""
    model: str | None
    quantization: str | None
    threads: int | None
    """Cores inference uses now; None without a model."""
    governor: GovernorState
    temp_c: float | None
    mem_available_mb: float | None
    queue: int
    """Queries waiting beyond the running one."""
    running: bool
    decode_tps: float | None
    """The scheduler's running estimate; None until a query was answered."""
    uptime_s: float
    answered_stored: int
    """Replies kept in the answered store for redeliveries (delivery.answered_ttl_s)."""
    model_load_s: float | None
    """How long loading the model took at start; None without a model."""
    group_members: int | None
    """Live members of this node's share group, itself included; None outside a group."""
    counters: CounterValues

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    def status_line(self) -> str:
        """systemd's STATUS= line: what `systemctl status` shows."""
        threads = f"{self.threads} threads" if self.threads is not None else "no model"
        link = "ready" if self.ready else "connected" if self.connected else "broker unreachable"
        return (
            f"{self.state}, governor {self.governor}, {threads}, queue {self.queue}, {link}, "
            f"{self.counters.answered} answered"
        )


def status_bytes(m: Metrics, group: str | None) -> bytes:
    """The retained status payload (API.md, Node status) of a snapshot; `group`: the node's
    share group (API.md v1.1)."""
    return encode(
        status_payload(
            state=m.state.value,
            group=group,
            version=__version__,
            model=m.model,
            threads=m.threads,
            governor=m.governor.value,
            temp_c=m.temp_c,
            mem_available_mb=None if m.mem_available_mb is None else int(m.mem_available_mb),
            queue=m.queue,
            decode_tps=m.decode_tps,
            uptime_s=m.uptime_s,
            ts=time.time(),
        )
    )
