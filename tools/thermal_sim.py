#!/usr/bin/env python3
"""A board's temperature under sustained generation, with and without the governor.

A first-order thermal model (Newton cooling towards ambient plus heating proportional to the
busy cores) writes the kernel's `thermal_zone0/temp` file in a fake sysfs tree; the real sensor
code reads it, the real governor policy decides, and the real engine generates, narrowed to
the cores and paced by the pauses the decision says. Time is accelerated: one real second is
`--accel` simulated seconds of heating. The fixed run keeps every core busy with no governor,
for the same duration. Prints JSON:

    {"profile": "pi5", "limit_c": 80.0, "governed": {"seconds_above_limit": ..., "tokens": ...,
     "max_temp_c": ...}, "fixed": {...}}

    python tools/thermal_sim.py --profile pi5 --model DIR --seconds 60

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edged.engine import Engine, EngineOptions, GenerationConfig  # noqa: E402
from edged.governor.policy import (  # noqa: E402
    PROFILE_BANDS,
    GovernorInput,
    GovernorPolicy,
    decide,
    pause_after_step,
)
from edged.governor.sensors import read_all  # noqa: E402

# Where the firmware starts throttling (Raspberry Pi documentation: 80 °C on a Pi 4 and 5).
THROTTLE_LIMIT_C = {"pi4": 80.0, "pi5": 80.0, "jetson-orin-nano": 99.0, "generic": 95.0}


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
    engine: Engine, profile: str, seconds: float, accel: float, governed: bool, cores: int
) -> dict[str, Any]:
    limit = THROTTLE_LIMIT_C[profile]
    # All cores busy settle 15 °C above the throttle limit; one core settles well below it.
    per_core = (limit + 15.0 - 30.0) / cores
    model = ThermalModel(ambient_c=30.0, per_core_c=per_core, tau_s=120.0, temp_c=45.0)
    root = Path(tempfile.mkdtemp(prefix="edged-thermal-"))
    (root / "sys/class/thermal/thermal_zone0").mkdir(parents=True)
    (root / "sys/class/thermal/thermal_zone0/type").write_text("cpu-thermal\n")
    _zone(root, model.temp_c)
    base = PROFILE_BANDS[profile]
    policy = GovernorPolicy.for_profile(profile, max_threads=cores)
    policy = GovernorPolicy(
        bands=type(base)(
            base.warm_c, base.hot_c, base.critical_c, base.hysteresis_c, base.dwell_s / accel
        ),
        max_threads=cores,
        settings=policy.settings,
    )
    engine.set_parallelism(cores)
    state = None
    decision = None
    tokens = 0
    above = 0.0
    max_temp = model.temp_c
    start = last = time.monotonic()
    ids = engine.render_chat([{"role": "user", "content": "Tell me about my heart."}])
    cfg = GenerationConfig(max_new_tokens=64, ignore_eos=True)

    # The daemon reads its sensors every governor.interval_s (2 s by default), not every step;
    # reading them every step would also make a fast model's governed run mostly file I/O.
    read_every = 2.0 / accel
    last_read = -read_every

    def tick(now: float, busy: bool) -> None:
        nonlocal last, above, max_temp, state, decision, last_read
        dt = (now - last) * accel
        last = now
        busy_cores = engine.parallelism if busy else 0.0
        temp = model.step(busy_cores, dt)
        max_temp = max(max_temp, temp)
        if temp > limit:
            above += dt
        if now - last_read < read_every:
            return
        last_read = now
        _zone(root, temp)
        if governed:
            readings = read_all(root)  # the real sensor code on the kernel's file format
            decision, state = decide(
                state, GovernorInput(temp_c=readings.temp_c), policy, now * accel
            )
            if engine.parallelism != decision.threads:
                engine.set_parallelism(decision.threads)

    while time.monotonic() - start < seconds:
        if governed and decision is not None and not decision.model_available:
            time.sleep(0.05)  # critical: the model is paused, the board cools
            tick(time.monotonic(), busy=False)
            continue

        step_started: float | None = None

        def step(n: int) -> None:
            nonlocal step_started
            now = time.monotonic()
            tick(now, busy=True)
            if governed and decision is not None and step_started is not None:
                pause = pause_after_step(now - step_started, decision.idle_fraction)
                if pause:
                    time.sleep(pause)  # real time: the board cools meanwhile
                    tick(time.monotonic(), busy=False)
            step_started = time.monotonic()

        result = engine.generate(
            ids,
            cfg,
            between_steps=step,
            stop_check=lambda: "time" if time.monotonic() - start >= seconds else None,
        )
        tokens += result.completion_tokens
        if governed and decision is not None and decision.model_available is False:
            continue
    engine.set_parallelism(cores)
    return {
        "seconds_above_limit": round(above, 1),
        "tokens": tokens,
        "max_temp_c": round(max_temp, 1),
        "simulated_s": round(seconds * accel),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="pi5", choices=sorted(THROTTLE_LIMIT_C))
    # The benchmark model (tools/bench_engine.py builds it) decodes at a realistic ~30 ms per
    # token here; the bundled toy model (~1 ms steps) works too, since the duty cycle is a
    # fraction of the step time, but its heat per token is not a real model's.
    bench = Path.home() / ".cache/edged/bench/qwen3-0.6b/gqa-int4-qwen3-0.6b-last-logits"
    toy = REPO / "tests/fixtures/tiny-qwen3-int4"
    ap.add_argument("--model", type=Path, default=bench if bench.is_dir() else toy)
    ap.add_argument("--seconds", type=float, default=30.0, help="real seconds per run")
    ap.add_argument("--accel", type=float, default=20.0, help="simulated seconds per second")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    # Spinning off, as the daemon runs by default (model.spin_threads): threads narrowed onto
    # fewer cores then take turns instead of spinning against each other.
    engine = Engine.load(args.model, EngineOptions(threads=0, context_length=512, spin=False))
    cores = len(engine.cores.cores)
    fixed = run(engine, args.profile, args.seconds, args.accel, governed=False, cores=cores)
    governed = run(engine, args.profile, args.seconds, args.accel, governed=True, cores=cores)
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
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
