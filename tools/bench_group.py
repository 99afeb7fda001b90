#!/usr/bin/env python3
"""Queries answered per minute by 1, 2 and 3 edged nodes in one share group (issue #15).

    python tools/bench_group.py                          # N = 1, 2, 3 for 60 s each
    python tools/bench_group.py --quick --json group.json    # 20 s each
    python tools/bench_group.py --nodes 4 --duration 120 --pause-ms 80

A private mosquitto and the daemons, in this process (`edged.service.daemon.Daemon`, as the
tests run them), all with `mqtt.share_group` set, on the bundled tiny model with one inference
thread and `governor.pause_ms` between decode steps: a query then costs about pause_ms x
max_tokens of wall clock and little CPU, so the run measures how the broker spreads the work,
not how 2 cores are shared by 3 nodes (the CPU column shows it: far below 100 %). The nodes join
one at a time, each before its phase, and stay: phase N runs on nodes 1..N.

Each phase first sends one untimed query per node (the broker's round robin gives every node
one, so each has answered before it is timed), then drives the group with
tools/gateway_sim.py's `run_simulation`: `--wearers` wearers sending vitals and queries at a
steady total rate of `--load` times what `--nodes` nodes could answer at best (1000 / (pause_ms
x max_tokens) queries per second each), so every phase is saturated. Throughput is the advice
the nodes published (their `Daemon.metrics()` counters) from `--settle` seconds into the load
(at most a quarter of it: the nodes are filling up before) to its end, per minute. Afterwards
the phase waits for every reply, so that lost (never answered) and duplicated (answered twice)
queries, and `busy` refusals (a node sent more queries than its queue holds), are counted from
what the gateway received. Latency is
publish to advice, including the time a query waited at the broker behind the backlog: with a
load above capacity it grows through the phase, the more so the fewer nodes.

Target (issue #15): at least 2.7x the one-node rate with 3 nodes. stdout gets the table and the
verdict, `--json FILE` the numbers, stderr the progress. Exit status 0 when every query was
answered exactly once and the target is met (or not measured: fewer than 3 nodes), else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gateway_sim  # a sibling script: its directory is on sys.path

from edged.config.loader import parse_config
from edged.config.models import EdgedConfig
from edged.models import TINY_QWEN3_INT4
from edged.service.broker import PrivateBroker
from edged.service.daemon import Daemon

GROUP = "bench"
TARGET_NODES = 3
TARGET_RATIO = 2.7
"""Issue #15: 3 nodes answer at least 2.7x the queries per minute of one."""
JOIN_TIMEOUT_S = 10.0


def _say(line: str) -> None:
    print(f"bench_group: {line}", file=sys.stderr, flush=True)


@dataclass
class Phase:
    nodes: int
    sent: int
    answered: int
    """Queries with a final reply (advice or error) by the end of the phase."""
    window_s: float
    """The measured stretch of the load: from `--settle` seconds in to its end."""
    window_advice: int
    """Advice the nodes published within the window (their metrics' counters)."""
    per_minute: float
    """window_advice per minute: the group's throughput."""
    answers_by_node: dict[str, int]
    latency_p50_s: float | None
    latency_p90_s: float | None
    lost: int
    """Queries with no reply within the phase's reply timeout."""
    duplicated: int
    """Queries answered more than once."""
    busy: int
    """Queries refused `busy` (a final reply, so answered once, but not served): a node was
    sent more queries than its queue holds."""
    errors: dict[str, int]
    """Other error replies by code: none expected."""
    alerts_by_node: dict[str, int]
    alert_wearers_split: int
    """Wearers whose alerts came from more than one node (one owner per wearer is the rule)."""
    cpu_pct: float
    """This process's CPU (every node, the gateway) over the phase, in % of one core."""
    ratio: float | None = None
    """per_minute over the one-node phase's."""
    sim: dict[str, Any] = field(default_factory=dict)
    """gateway_sim's whole report of the timed run."""

    @property
    def exactly_once(self) -> bool:
        """Every query got one final reply: advice, or the contract's `busy` backpressure."""
        return self.lost == 0 and self.duplicated == 0 and not self.errors


def node_config(port: int, name: str, state_dir: Path, args: argparse.Namespace) -> EdgedConfig:
    return parse_config(
        {
            "node_id": name,
            "mqtt": {"port": port, "share_group": GROUP, "connect_timeout_s": 5},
            "model": {"path": str(TINY_QWEN3_INT4), "context_length": 1024, "threads": 1},
            "limits": {"default_max_tokens": args.max_tokens},
            "governor": {"pause_ms": args.pause_ms},
            "status": {"interval_s": 1},
            "delivery": {"state_dir": str(state_dir / name)},
        }
    )


def node_capacity_per_s(args: argparse.Namespace) -> float:
    """The most queries per second one node can answer: one decode step per pause, at best."""
    return 1000.0 / (args.pause_ms * args.max_tokens)


def join(daemons: list[Daemon], config: EdgedConfig) -> None:
    """Start one more node and wait until every member counts every other as live: the
    query link is subscribed and the alerts' owners are settled before the load starts."""
    daemon = Daemon(config)
    daemons.append(daemon)
    daemon.start()
    if not daemon.wait_ready(JOIN_TIMEOUT_S):
        raise RuntimeError(f"{config.node_id} not subscribed within {JOIN_TIMEOUT_S:g} s")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while any(d.metrics().group_members != len(daemons) for d in daemons):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the group did not see {len(daemons)} members in time")
        time.sleep(0.05)


def advice_count(daemons: list[Daemon]) -> int:
    return sum(int(d.metrics().counters.advice) for d in daemons)


class Window:
    """Counts the advice the nodes publish between two moments of the load, on a thread of
    its own (run_simulation blocks): the first seconds, while the nodes fill up, are left out."""

    def __init__(self, daemons: list[Daemon], start_s: float, end_s: float) -> None:
        self.daemons = daemons
        self.start_s, self.end_s = start_s, end_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-window", daemon=True)
        self._t0 = 0.0

    def begin(self) -> None:
        # run_simulation starts sending 0.05 s after it is connected, a few ms from now.
        self._t0 = time.perf_counter() + 0.05
        self._thread.start()

    def _run(self) -> None:
        for at in (self.start_s, self.end_s):
            if self._stop.wait(max(0.0, self._t0 + at - time.perf_counter())):
                return
            self.samples.append((time.perf_counter(), advice_count(self.daemons)))

    def result(self) -> tuple[float, int]:
        """(seconds, advice) of the window; (0, 0) if the load ended before it did."""
        self._stop.set()
        self._thread.join(5.0)
        if len(self.samples) < 2:
            return 0.0, 0
        (t1, n1), (t2, n2) = self.samples
        return t2 - t1, n2 - n1


def run_phase(port: int, daemons: list[Daemon], args: argparse.Namespace) -> Phase:
    nodes = len(daemons)
    common: dict[str, Any] = {"max_tokens": args.max_tokens, "vitals_rate": 0.0}
    warm = gateway_sim.run_simulation(
        "127.0.0.1",
        port,
        wearers=nodes,
        query_rate=1.0,
        count=nodes,
        seed=args.seed + 100 + nodes,
        reply_timeout_s=30.0,
        **common,
    )
    if warm.missing:
        raise RuntimeError(f"{nodes} nodes: warm-up queries unanswered: {warm.missing}")
    rate = args.load * args.nodes * node_capacity_per_s(args)
    # Enough to drain the backlog at the best rate `nodes` can answer, and then some.
    drain_s = rate * args.duration / (nodes * node_capacity_per_s(args)) * 1.5 + 30.0
    _say(f"{nodes} node(s): {rate * 60:.0f} queries/min for {args.duration:g} s")

    def progress(line: str) -> None:
        _say(f"{nodes} node(s): {line.removeprefix('gateway_sim: ')}")

    window = Window(daemons, min(args.settle, args.duration / 4), args.duration)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    window.begin()
    r = gateway_sim.run_simulation(
        "127.0.0.1",
        port,
        wearers=args.wearers,
        vitals_rate=args.vitals_rate,
        query_rate=rate / args.wearers,
        duration_s=args.duration,
        deteriorating=args.deteriorating,
        max_tokens=args.max_tokens,
        reply_timeout_s=drain_s,
        seed=args.seed + nodes,
        progress=progress if args.progress_every > 0 else None,
        progress_every_s=args.progress_every,
    )
    cpu_pct = 100 * (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    return summarize(nodes, r, window.result(), cpu_pct)


def summarize(nodes: int, r: Any, window: tuple[float, int], cpu_pct: float) -> Phase:
    """A phase from gateway_sim's SimResult `r` and the (seconds, advice) of its window."""
    window_s, advice = window

    def seconds(key: str) -> float | None:
        ms = r.latency_ms.get(key)
        return None if ms is None else round(ms / 1000, 2)

    return Phase(
        nodes=nodes,
        sent=r.queries_sent,
        answered=r.answered,
        window_s=round(window_s, 2),
        window_advice=advice,
        per_minute=round(60 * advice / window_s, 1) if window_s > 0 else 0.0,
        answers_by_node=r.answers_by_node,
        latency_p50_s=seconds("p50"),
        latency_p90_s=seconds("p90"),
        lost=len(r.missing),
        duplicated=len(r.duplicates),
        busy=r.errors.get("busy", 0),
        errors={code: n for code, n in r.errors.items() if code != "busy"},
        alerts_by_node=r.alerts_by_node,
        alert_wearers_split=sum(1 for w in r.alerts_by_wearer.values() if len(w["nodes"]) > 1),
        cpu_pct=round(cpu_pct, 1),
        sim=r.to_json(),
    )


def verdict(phases: list[Phase]) -> dict[str, Any]:
    """Ratios against the one-node phase, exactly-once over every phase, and the target."""
    base = phases[0].per_minute if phases and phases[0].nodes == 1 else 0.0
    for p in phases:
        p.ratio = round(p.per_minute / base, 2) if base else None
    at_target = next((p for p in phases if p.nodes == TARGET_NODES), None)
    ratio = at_target.ratio if at_target is not None else None
    return {
        "exactly_once": all(p.exactly_once for p in phases),
        "target_ratio": TARGET_RATIO,
        "ratio_at_3_nodes": ratio,
        "target_met": None if ratio is None else ratio >= TARGET_RATIO,
    }


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(phases: list[Phase], outcome: dict[str, Any], args: argparse.Namespace) -> str:
    rate = args.load * args.nodes * node_capacity_per_s(args) * 60
    lines = [
        f"share group '{GROUP}' on mosquitto, tiny model, 1 thread, pause {args.pause_ms:g} ms x "
        f"{args.max_tokens} tokens; {args.wearers} wearers, {rate:.0f} queries/min offered for "
        f"{args.duration:g} s per phase",
        f"{'nodes':>5}{'sent':>6}{'answered/min':>14}{'x 1 node':>10}{'p50 s':>8}{'p90 s':>8}"
        f"{'lost':>6}{'dup':>5}{'busy':>6}{'errors':>8}{'CPU %':>7}  answers by node",
    ]
    for p in phases:
        ratio = "-" if p.ratio is None else f"{p.ratio:.2f}"
        by_node = ", ".join(f"{n} {c}" for n, c in p.answers_by_node.items())
        lines.append(
            f"{p.nodes:>5}{p.sent:>6}{p.per_minute:>14.1f}{ratio:>10}{_s(p.latency_p50_s):>8}"
            f"{_s(p.latency_p90_s):>8}{p.lost:>6}{p.duplicated:>5}{p.busy:>6}"
            f"{sum(p.errors.values()):>8}"
            f"{p.cpu_pct:>7.0f}  {by_node}"
        )
    for p in phases:
        if p.busy:
            lines.append(
                f"note: {p.nodes} nodes: {p.busy} of {p.sent} queries refused busy: a node was "
                "sent more queries than its queue holds (limits.queue_size + the running one)"
            )
        if p.alert_wearers_split:
            lines.append(
                f"note: {p.nodes} nodes: {p.alert_wearers_split} wearers alerted by more "
                "than one node"
            )
    once = (
        "every query answered exactly once"
        if outcome["exactly_once"]
        else ("NOT every query answered exactly once (see lost, dup, errors)")
    )
    lines.append(once)
    ratio = outcome["ratio_at_3_nodes"]
    if ratio is None:
        lines.append(f"target >= {TARGET_RATIO:g}x at {TARGET_NODES} nodes: not measured")
    else:
        met = "MET" if outcome["target_met"] else "NOT MET"
        lines.append(f"target >= {TARGET_RATIO:g}x at {TARGET_NODES} nodes: {met} ({ratio:.2f}x)")
    return "\n".join(lines)


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=3, help="phases with 1..NODES nodes")
    p.add_argument("--duration", type=float, default=None, help="seconds of load per phase")
    p.add_argument("--quick", action="store_true", help="20 s per phase (unless --duration)")
    p.add_argument(
        "--settle",
        type=float,
        default=5.0,
        help="seconds of load before the window opens (at most a quarter of the duration)",
    )
    p.add_argument("--pause-ms", type=float, default=40.0, help="governor.pause_ms of every node")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens per answer")
    p.add_argument("--load", type=float, default=1.3, help="offered load over NODES' best rate")
    p.add_argument("--wearers", type=int, default=30)
    p.add_argument("--deteriorating", type=int, default=3, help="wearers whose vitals alert")
    p.add_argument("--vitals-rate", type=float, default=1.0, help="per wearer, per second")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress-every", type=float, default=5.0, help="seconds between lines")
    p.add_argument("--json", type=Path, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.duration is None:
        args.duration = 20.0 if args.quick else 60.0
    if args.nodes < 1 or args.pause_ms <= 0 or args.load <= 0:
        raise SystemExit("bench_group: --nodes >= 1, --pause-ms > 0 and --load > 0, please")
    phases: list[Phase] = []
    daemons: list[Daemon] = []
    with PrivateBroker() as broker, tempfile.TemporaryDirectory() as state:
        try:
            for n in range(1, args.nodes + 1):
                _say(f"node-{n} joins the group")
                join(daemons, node_config(broker.port, f"node-{n}", Path(state), args))
                phases.append(run_phase(broker.port, daemons, args))
        finally:
            for daemon in reversed(daemons):
                daemon.stop()
    outcome = verdict(phases)
    print(format_table(phases, outcome, args))
    if args.json is not None:
        report = {
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "settings": {k: v for k, v in vars(args).items() if k != "json"}
            | {
                "offered_per_min": round(args.load * args.nodes * node_capacity_per_s(args) * 60, 1)
            },
            "phases": [asdict(p) for p in phases],
            **outcome,
        }
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0 if outcome["exactly_once"] and outcome["target_met"] is not False else 1


if __name__ == "__main__":
    sys.exit(main())
