"""Vital-sign alerts: when to send one, and what it says (API.md, Alert).

Rate limiting is per wearer: the same or a lesser condition is repeated at most once per
cooldown, but a worse one — a higher severity, or a red flag not yet alerted within the
cooldown — goes out at once. The decision is a pure function of the previous memory and the
new triage.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from edged.clinical.news2 import risk_rank
from edged.clinical.triage import Triage


@dataclass(frozen=True)
class AlertMemory:
    """What this wearer was last alerted about, within the current cooldown period."""

    severity: str | None
    flags: frozenset[str]
    sent_at: float


def should_alert(prev: AlertMemory | None, triage: Triage, now: float, cooldown_s: float) -> bool:
    """Alert when nothing was sent within the cooldown, or the condition is worse than
    everything sent within it: a higher severity, or a red flag not yet alerted. Comparing with
    what was *sent* (not the last evaluation) keeps a flag that flickers in and out of the
    window from alerting on every other summary."""
    if not triage.alerting:
        return False
    if prev is None or now - prev.sent_at >= cooldown_s:
        return True
    if risk_rank(triage.severity) > risk_rank(prev.severity):
        return True
    return not set(triage.flag_names) <= prev.flags


def remember(
    prev: AlertMemory | None, triage: Triage, now: float, cooldown_s: float
) -> AlertMemory:
    """The memory after sending an alert for `triage`."""
    if prev is None or now - prev.sent_at >= cooldown_s:
        return AlertMemory(triage.severity, frozenset(triage.flag_names), now)
    worst = (
        triage.severity if risk_rank(triage.severity) > risk_rank(prev.severity) else prev.severity
    )
    return AlertMemory(worst, prev.flags | set(triage.flag_names), now)


class AlertGate:
    """The per-wearer alert memory, bounded like the vitals state (least recently seen out)."""

    def __init__(self, cooldown_s: float, max_wearers: int) -> None:
        self._memory: OrderedDict[str, AlertMemory] = OrderedDict()
        self._lock = threading.Lock()
        self.configure(cooldown_s, max_wearers)

    def configure(self, cooldown_s: float, max_wearers: int) -> None:
        """New limits (a reload); they apply from the next check on."""
        with self._lock:
            self.cooldown_s = cooldown_s
            self.max_wearers = max_wearers

    def check(self, wearer: str, triage: Triage, now: float) -> bool:
        """Whether to send an alert for this triage; records the decision."""
        with self._lock:
            prev = self._memory.get(wearer)
            if not should_alert(prev, triage, now, self.cooldown_s):
                return False
            self._memory.pop(wearer, None)
            self._memory[wearer] = remember(prev, triage, now, self.cooldown_s)
            while len(self._memory) > self.max_wearers:
                self._memory.popitem(last=False)
            return True


def alert_message(triage: Triage) -> str:
    n = triage.news2
    parts = []
    if n.score is not None:
        parts.append(f"NEWS2 {n.score} ({(n.risk or 'unknown').replace('_', '-')} risk)")
    for flag in triage.red_flags:
        parts.append(flag.detail)
    text = "; ".join(parts) + "."
    if n.missing:
        text += f" Partial score: {', '.join(n.missing)} not measured."
    return text[0].upper() + text[1:]
