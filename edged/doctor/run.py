"""Every doctor check, in the order an owner reads them: the config, the board, the service's
broker and state directory, then the model."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edged.config.models import EdgedConfig, ModelConfig
from edged.doctor.checks import (
    Check,
    broker_check,
    config_check,
    cores_check,
    cpu_check,
    decode_check,
    int4_kernels_check,
    memory_check,
    model_check,
    model_memory_check,
    parse_cpuinfo,
    state_dir_check,
    thermal_check,
    throttle_check,
)
from edged.doctor.probes import (
    measure_decode,
    probe_broker,
    probe_state_dir,
    read_cpuinfo,
    verify_model,
)
from edged.engine import EngineOptions
from edged.governor.memory_check import ModelDoesNotFit, check_model_fits
from edged.governor.policy import preferred_cores
from edged.governor.sensors import (
    Readings,
    read_all,
    read_core_capacities,
    read_cpu_quota,
    read_zones,
)

DECODE_TOKENS = 16
"""Enough decode steps for a steady rate, few enough for a Pi 4 to finish in seconds."""
BROKER_TIMEOUT_S = 5.0
"""The doctor waits at most this long for the broker, even if mqtt.connect_timeout_s is longer:
it reports, it does not retry."""


@dataclass(frozen=True)
class DoctorOptions:
    config: EdgedConfig | None
    """The resolved config; None when none was given or it did not load."""
    config_source: str | None
    """The config file named (None: no config at all)."""
    config_problems: tuple[str, ...] = ()
    """`config check`'s lines: why it did not load, or what it found wrong."""
    model_dir: Path | None = None
    """--model: this model directory instead of the config's model.path."""
    root: Path = Path("/")
    """Where /proc and /sys are read (tests: a fake tree)."""
    measure_speed: bool = True
    decode_tokens: int = DECODE_TOKENS


def run_checks(options: DoctorOptions) -> list[Check]:
    config = options.config
    readings = read_all(options.root)
    model = _model_config(options)
    node_id = config.node_id if config is not None else None
    return [
        config_check(options.config_source, options.config_problems, node_id),
        *_board_checks(options.root, readings, model.threads if model is not None else None),
        *_service_checks(options),
        *_model_checks(model, readings, options),
    ]


def _model_config(options: DoctorOptions) -> ModelConfig | None:
    base = options.config.model if options.config is not None else None
    if options.model_dir is None:
        return base
    if base is None:
        return ModelConfig(path=options.model_dir)  # the defaults `edged run` would use
    return base.model_copy(update={"path": options.model_dir})


def _board_checks(root: Path, readings: Readings, threads: int | None) -> list[Check]:
    text = read_cpuinfo(root)
    info = parse_cpuinfo(text) if text is not None else None
    return [
        cpu_check(info),
        int4_kernels_check(info),
        cores_check(readings.cpus, read_cpu_quota(root), threads),
        memory_check(readings),
        thermal_check(read_zones(root), readings.temp_zone),
        throttle_check(readings.throttle),
    ]


def _service_checks(options: DoctorOptions) -> list[Check]:
    config = options.config
    if config is None:
        why = "the config did not load" if options.config_source else "no config"
        return [Check("broker", "skip", why), Check("state_dir", "skip", why)]
    # Never the daemon's client id: the broker would disconnect a running daemon for it.
    client_id = f"edged-doctor-{config.node_id}-{os.getpid()}"
    timeout_s = min(config.mqtt.connect_timeout_s, BROKER_TIMEOUT_S)
    return [
        broker_check(probe_broker(config.mqtt, client_id, timeout_s)),
        state_dir_check(probe_state_dir(config.delivery.state_dir)),
    ]


def _model_checks(
    model: ModelConfig | None, readings: Readings, options: DoctorOptions
) -> list[Check]:
    if model is None:
        return [Check("model", "skip", "no model: give --model DIR, or a config with model.path")]
    if not model.enabled:
        return [Check("model", "skip", "model.enabled = false: queries get triage-only answers")]
    description, error = verify_model(model.path)
    checks = [model_check(str(model.path), description, error)]
    if error is not None:
        return checks
    fit_error = None
    need = None
    try:
        need = check_model_fits(model.path, model.context_length, readings)
    except ModelDoesNotFit as exc:
        fit_error = str(exc)
    checks.append(model_memory_check(need, readings.mem_headroom_mb, fit_error))
    if fit_error is not None:
        return [*checks, decode_check(None, None, "the model does not fit: not loaded")]
    if not options.measure_speed:
        return [*checks, decode_check(None, None, "not measured (--no-speed)")]
    result, run_error = measure_decode(
        model.path, _engine_options(model, options.root), options.decode_tokens
    )
    return [*checks, decode_check(result, run_error, None)]


def _engine_options(model: ModelConfig, root: Path) -> EngineOptions:
    """The daemon's engine settings (edged.engine.backends.onnxruntime_cpu), without the
    prepacked cache (the doctor writes nothing) or speculation (a plain decode rate)."""
    return EngineOptions(
        threads=model.threads,
        context_length=model.context_length,
        verify_hashes=False,  # model_check has just verified every file
        spin=model.spin_threads,
        preferred_cores=preferred_cores(model.prefer_cores, read_core_capacities(root)),
        speculation=None,
        prepacked_cache=None,
    )
