"""The model path's clinical edges: the grounded prompt going in, the guard coming out.

Going in, a question is preceded by a compact summary of the wearer's recent vitals and the
deterministic triage, within a token budget, through the model's own chat template. Coming out,
whatever the model wrote, the advice carries the triage and — at medium or high risk or with a
red flag — the deterministic escalation sentence; without a model, the triage alone answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from edged.clinical.contradiction import Contradiction, find_contradiction
from edged.clinical.news2 import risk_rank
from edged.clinical.triage import Triage
from edged.config.models import ClinicalConfig
from edged.domain import Risk, Vitals, VitalStat

# (field, label, unit, which end of the range matters most) in the order a clinician reads them.
_VITALS = (
    ("spo2", "SpO2", " %", "low"),
    ("resp_rate", "respiration", " /min", "both"),
    ("heart_rate", "heart rate", " /min", "both"),
    ("systolic_bp", "systolic BP", " mmHg", "both"),
    ("temp_c", "temperature", " °C", "both"),
    ("diastolic_bp", "diastolic BP", " mmHg", "both"),
    ("hrv_rmssd_ms", "HRV (RMSSD)", " ms", "both"),
    ("steps", "steps", "", "both"),
)


def _describe(stats: list[VitalStat], end: str, unit: str) -> str:
    latest = stats[-1].central
    low = min(s.worst_low for s in stats)
    high = max(s.worst_high for s in stats)
    if low == high:
        return f"{latest:g}{unit}"
    if end == "low":
        return f"{latest:g}{unit} now, lowest {low:g}{unit}"
    return f"{latest:g}{unit} now, range {low:g}–{high:g}{unit}"


def vital_lines(window: Sequence[Vitals]) -> list[tuple[str, str, str]]:
    """(field, label, description) of each vital in the window, in the block's order: what the
    prompt's vitals block says about it ("94 % now, lowest 89 %")."""
    out = []
    for field, label, unit, end in _VITALS:
        stats = [s for v in window if (s := getattr(v, field)) is not None]
        if stats:
            out.append((field, label, _describe(stats, end, unit)))
    return out


def triage_line(triage: Triage) -> str:
    n = triage.news2
    if n.score is None:
        text = "Early-warning score: not available (no NEWS2 parameter measured)"
    else:
        text = f"Early-warning score: NEWS2 {n.score}, {n.risk} risk"
        if n.missing:
            text += f" (partial: {', '.join(n.missing)} not measured)"
    if triage.red_flags:
        text += ". Red flags: " + "; ".join(f.detail for f in triage.red_flags)
    return text + "."


def vitals_context(
    window: Sequence[Vitals],
    triage: Triage,
    window_s: float,
    count_tokens: Callable[[str], int],
    budget: int,
) -> str:
    """The vitals block of a prompt. The triage line always stays; vitals lines are dropped
    from the least important end until the block fits `budget` tokens."""
    header = (
        f"The wearer's readings over the last {window_s / 60:.0f} min ({len(window)} summaries):"
    )
    lines = [f"- {label}: {text}" for _, label, text in vital_lines(window)]
    if window and window[-1].activity:
        lines.append(f"- activity: {window[-1].activity}")
    if not window:
        header, lines = "No recent readings from the wearer's devices.", []
    tail = triage_line(triage)
    while True:
        block = "\n".join([header, *lines, tail])
        if not lines or count_tokens(block) <= budget:
            return block
        lines.pop()


def user_message(question: str, context: str | None) -> str:
    if context is None:
        return question
    return f"{context}\n\nQuestion: {question}"


def grounded_question(
    question: str,
    window: Sequence[Vitals],
    triage: Triage,
    cfg: ClinicalConfig,
    count_tokens: Callable[[str], int],
) -> str:
    """The user turn of a question grounded in the wearer's vitals, as the daemon asks it (and
    `edged ask --vitals`, so both send the model the same prompt)."""
    return user_message(question, vitals_block(window, triage, cfg, count_tokens))


def vitals_block(
    window: Sequence[Vitals],
    triage: Triage,
    cfg: ClinicalConfig,
    count_tokens: Callable[[str], int],
) -> str:
    """The vitals block the daemon puts before a question, within the configured budget."""
    return vitals_context(window, triage, cfg.window_s, count_tokens, cfg.vitals_prompt_tokens)


@dataclass(frozen=True)
class GuardedAdvice:
    """What the wearer is told: the model's text (or the triage's, without a model) with the
    deterministic parts the guard adds whatever the model wrote."""

    text: str
    escalation: str | None
    triage: Triage
    disclaimer: str
    contradiction: Contradiction | None = None
    """Set when the model's text reassured a wearer whom the triage says to escalate; the
    text then starts with the escalation sentence."""


def guard(triage: Triage, text: str, cfg: ClinicalConfig) -> GuardedAdvice:
    """The advice for `text`: the triage always, the escalation sentence when risk or red
    flags call for it, the configured disclaimer. When the escalation is due and the text
    reassures (or understates the risk), the escalation is put first and the advice marked."""
    due = escalation(triage, cfg)
    text, found = guard_text(text, due, triage.news2.risk)
    return GuardedAdvice(text, due, triage, cfg.disclaimer, found)


def guard_text(text: str, due: str | None, risk: str | None) -> tuple[str, Contradiction | None]:
    """The guard's reading of the model's text: when an escalation is `due` and the text
    reassures or understates `risk`, the escalation goes first. (`edged model eval` applies
    it to generated answers, so its counts are the daemon's.)"""
    found = find_contradiction(text, risk) if due is not None else None
    if found is not None and due is not None:
        text = f"{due} {text}"
    return text, found


def escalation(triage: Triage, cfg: ClinicalConfig) -> str | None:
    """The deterministic sentence for the triage's severity, when risk is medium or high or a
    red flag is present (API.md: non-null whenever risk is medium or high)."""
    severity = triage.severity
    if severity is None:
        return None
    if risk_rank(triage.news2.risk) >= Risk.MEDIUM.rank or triage.red_flags:
        return cfg.escalation[severity]  # type: ignore[index]
    return None


def degraded_text(triage: Triage) -> str:
    """The answer when the model cannot run: the triage, plainly."""
    if triage.readings == 0:
        return (
            "The assistant cannot answer right now and no recent readings are available. "
            "If you feel unwell, contact your care team."
        )
    return "The assistant cannot answer right now. From your recent readings: " + triage_line(
        triage
    )
