"""The evaluation report as a few readable lines."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None:
        return "–"
    if pct:
        return f"{100 * value:.1f} %"
    return f"{value:g}" if isinstance(value, float) else str(value)


def render(report: dict[str, Any]) -> str:
    m, p, q, a, d = (
        report["model"],
        report["perplexity"],
        report["mcq"],
        report["agreement"],
        report["dialogue"],
    )
    lines = [
        f"model        {m['name']} ({m['quant']}) in {m['dir']}",
        f"perplexity   {_fmt(p['value'])} over {p['tokens']} tokens of {p['texts']} texts",
        f"MCQ          accuracy {_fmt(q['accuracy'], True)} "
        f"(length-normalised {_fmt(q['accuracy_norm'], True)}) on {q['items']} items",
    ]
    if report["reference"] is not None:
        lines.append(
            f"vs reference top-1 agreement {_fmt(a['top1'], True)}, mean KL {_fmt(a['mean_kl'])}"
            f" nats over {a['positions']} positions ({report['reference']})"
        )
    if d["generated"]:
        lines += [
            f"answers      {d['generated']} generated: cite the abnormal values "
            f"{_fmt(d['cites_abnormal'], True)}; state the NEWS2 score "
            f"{_fmt(d['news2_right'], True)}; escalation when due "
            f"{_fmt(d['escalation_when_due'], True)} of {d['due']}, when not due "
            f"{_fmt(d['escalation_when_not_due'], True)}",
            f"guard        contradictions {_fmt(d['contradiction_rate'], True)} of answers due "
            f"an escalation; after the guard {_fmt(d['contradiction_after_guard'], True)}",
        ]
    lines.append(f"time         {report['seconds']} s")
    return "\n".join(lines)
