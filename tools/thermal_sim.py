#!/usr/bin/env python3
"""A board's temperature under sustained generation, with and without the governor.

A first-order thermal model (Newton cooling towards ambient plus heating proportional to the
busy cores) writes the kernel's `thermal_zone0/temp` file in a fake sysfs tree; the daemon's
own `GovernorService` reads it with the real sensor code and decides with the real policy, and
the real engine generates, narrowed to the cores and paced by the pauses the decision says.
Time is accelerated: one real second is `--accel` simulated seconds, and the governor runs on
the simulated clock (its dwell and sensor period are the daemon's, in simulated seconds). The
fixed run keeps every core busy with no governor, for the same duration. Prints a table (one
row per run: seconds above the limit, max temperature, tokens) and the share of tokens the
governed run kept; `--json` prints JSON instead, `--json PATH` writes it to PATH as well:

    {"profile": "pi5", "limit_c": 80.0, "governed": {"seconds_above_limit": ..., "tokens": ...,
     "max_temp_c": ...}, "fixed": {...}}

    python tools/thermal_sim.py --profile pi5 --model DIR --seconds 60
    python tools/thermal_sim.py --seconds 5 --json        # JSON on stdout, for scripts

While it runs, a progress line per second goes to stderr (`--progress-every`, 0 for none).

Model parameters per profile (no fan, a plastic case): the steady-state temperature rises by
`per_core_c` for every busy core, from `ambient_c`, with time constant `tau_s`. They are chosen
so that all of this machine's cores exceed the throttle limit and one does not; they are an
illustration of the control loop, not a measurement of a real board.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edged.config.models import GovernorConfig
from edged.domain import BoardProfile
from edged.engine import Engine, EngineOptions, GenerationConfig
from edged.governor.policy import GovernorDecision, pause_after_step
from edged.governor.service import GovernorService
from edged.models import TINY_QWEN3_INT4

# Where the firmware starts throttling (Raspberry Pi documentation: 80 °C on a Pi 4 and 5).
THROTTLE_LIMIT_C = {
    BoardProfile.PI4: 80.0,
    BoardProfile.PI5: 80.0,
    BoardProfile.JETSON_ORIN_NANO: 99.0,
    BoardProfile.GENERIC: 95.0,
}


@dataclass
class ThermalModel:
    ambient_c: float
    per_core_c: float
    tau_s: float
    temp_c: float

    def step(self, busy_cores: float, dt_s: float) -> float:
        target = self.ambient_c + self.per_core_c * busy_cores
        self.temp_c += (target - self.temp_c) * min(1.0, dt_s / self.tau_s)
        return self.temp_c


def _zone(root: Path, temp_c: float) -> None:
    (root / "sys/class/thermal/thermal_zone0/temp").write_text(f"{int(temp_c * 1000)}\n")


def run(
    engine: Engine,
    profile: BoardProfile,
    seconds: float,
    accel: float,
    governed: bool,
    cores: int,
    progress: Callable[[str], None] | None = None,
    progress_every_s: float = 1.0,
) -> dict[str, Any]:
    limit = THROTTLE_LIMIT_C[profile]
    # All cores busy settle 15 °C above the throttle limit; one core settles well below it.
    per_core = (limit + 15.0 - 30.0) / cores
    model = ThermalModel(ambient_c=30.0, per_core_c=per_core, tau_s=120.0, temp_c=45.0)
    root = Path(tempfile.mkdtemp(prefix="edged-thermal-"))
    (root / "sys/class/thermal/thermal_zone0").mkdir(parents=True)
    (root / "sys/class/thermal/thermal_zone0/type").write_text("cpu-thermal\n")
    _zone(root, model.temp_c)
    # The daemon's defaults (sensors every 2 s, its dwell and hysteresis), on this board tree.
    config = GovernorConfig(enabled=governed, profile=profile, sensor_root=root)
    start = time.monotonic()

    def sim_now(now: float) -> float:
        return (now - start) * accel

    governor = GovernorService(config, max_threads=cores, now=0.0)
    engine.set_parallelism(cores)
    state = {"last": start, "above": 0.0, "max": model.temp_c, "next_read": 0.0, "steps": 0}
    decision: GovernorDecision = governor.decision
    name = "governed" if governed else "fixed"
    next_report = start

    def tick(now: float, busy: bool) -> None:
        nonlocal decision, next_report
        dt = (now - state["last"]) * accel
        state["last"] = now
        temp = model.step(engine.parallelism if busy else 0.0, dt)
        state["max"] = max(state["max"], temp)
        state["steps"] += busy
        if temp > limit:
            state["above"] += dt
        if progress is not None and now >= next_report:
            next_report = now + progress_every_s
            progress(
                f"thermal_sim: {name} {now - start:.0f}/{seconds:g} s, {temp:.1f} °C, "
                f"{engine.parallelism} threads, {state['steps']} tokens, "
                f"{state['above']:.0f} s above {limit:g} °C"
            )
        if sim_now(now) < state["next_read"]:
            return
        state["next_read"] = sim_now(now) + config.interval_s
        _zone(root, temp)
        if governed:
            decision = governor.tick(sim_now(now))
            if engine.parallelism != decision.threads:
                engine.set_parallelism(decision.threads)

    tokens = _generate_for(engine, seconds, start, governed, lambda: decision, tick)
    engine.set_parallelism(cores)
    return {
        "seconds_above_limit": round(state["above"], 1),
        "tokens": tokens,
        "max_temp_c": round(state["max"], 1),
        "simulated_s": round(seconds * accel),
    }


def _generate_for(
    engine: Engine,
    seconds: float,
    start: float,
    governed: bool,
    decision: Callable[[], GovernorDecision],
    tick: Callable[[float, bool], None],
) -> int:
    """Generate back to back until `seconds` have passed, as the daemon's worker would under
    each decision: paused while critical, a rest after each step in proportion to it."""
    ids = engine.render_chat([{"role": "user", "content": "Tell me about my heart."}])
    cfg = GenerationConfig(max_new_tokens=64, ignore_eos=True)
    tokens = 0
    while time.monotonic() - start < seconds:
        if governed and not decision().model_available:
            time.sleep(0.05)  # critical: the model is paused, the board cools
            tick(time.monotonic(), False)
            continue
        step_started: float | None = None

        def step(n: int) -> None:
            nonlocal step_started
            now = time.monotonic()
            tick(now, True)
            if governed and step_started is not None:
                pause = pause_after_step(now - step_started, decision().idle_fraction)
                if pause:
                    time.sleep(pause)  # real time: the board cools meanwhile
                    tick(time.monotonic(), False)
            step_started = time.monotonic()

        result = engine.generate(
            ids,
            cfg,
            between_steps=step,
            stop_check=lambda: "time" if time.monotonic() - start >= seconds else None,
        )
        tokens += result.completion_tokens
    return tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--profile", type=BoardProfile, default=BoardProfile.PI5, choices=list(THROTTLE_LIMIT_C)
    )
    # The benchmark model (tools/bench_engine.py builds it) decodes at a realistic ~30 ms per
    # token here; the bundled toy model (~1 ms steps) works too, since the duty cycle is a
    # fraction of the step time, but its heat per token is not a real model's.
    bench = Path.home() / ".cache/edged/bench/qwen3-0.6b/gqa-int4-qwen3-0.6b-last-logits"
    toy = TINY_QWEN3_INT4
    ap.add_argument("--model", type=Path, default=bench if bench.is_dir() else toy)
    ap.add_argument("--seconds", type=float, default=30.0, help="real seconds per run")
    ap.add_argument("--accel", type=float, default=20.0, help="simulated seconds per second")
    ap.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        metavar="PATH",
        help="print JSON instead of the table; with PATH, write it there and print the table",
    )
    ap.add_argument(
        "--progress-every",
        type=float,
        default=1.0,
        help="a progress line on stderr this often, in real seconds (0: none)",
    )
    args = ap.parse_args(argv)
    # Spinning off, as the daemon runs by default (model.spin_threads): threads narrowed onto
    # fewer cores then take turns instead of spinning against each other.
    engine = Engine.load(args.model, EngineOptions(threads=0, context_length=512, spin=False))
    cores = len(engine.cores.cores)
    say = _stderr if args.progress_every > 0 else None
    runs = {}
    for name in ("fixed", "governed"):
        runs[name] = run(
            engine,
            args.profile,
            args.seconds,
            args.accel,
            governed=name == "governed",
            cores=cores,
            progress=say,
            progress_every_s=args.progress_every,
        )
    fixed, governed = runs["fixed"], runs["governed"]
    report = {
        "profile": args.profile,
        "limit_c": THROTTLE_LIMIT_C[args.profile],
        "model": engine.manifest.name,
        "cores": cores,
        "accel": args.accel,
        "governed": governed,
        "fixed": fixed,
        "tokens_kept": round(governed["tokens"] / max(1, fixed["tokens"]), 3),
    }
    if args.json == "-":
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
        if args.json is not None:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def format_table(report: dict[str, Any]) -> str:
    """The report for a person: one row per run, then how much the governor kept."""
    limit = report["limit_c"]
    fixed = report["fixed"]
    lines = [
        f"profile {report['profile']}, throttle limit {limit:g} °C, model {report['model']}, "
        f"{report['cores']} cores, {fixed['simulated_s']} simulated s per run "
        f"({report['accel']:g}x real time)",
        "",
        f"{'run':<36}{f's above {limit:g} °C':>16}{'max °C':>9}{'tokens':>10}",
    ]
    rows = (("fixed: every core, no governor", fixed), ("governed", report["governed"]))
    for label, r in rows:
        lines.append(
            f"{label:<36}{r['seconds_above_limit']:>16.1f}{r['max_temp_c']:>9.1f}{r['tokens']:>10,}"
        )
    lines += ["", f"the governed run kept {report['tokens_kept']:.0%} of the fixed run's tokens"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
