"""Loading the inference backend at start, or deciding to run without one (`degraded`)."""

from __future__ import annotations

import logging

from edged.config.models import EdgedConfig
from edged.engine import InferenceBackend, ModelDirError, load_backend
from edged.governor.memory_check import ModelDoesNotFit, check_model_fits
from edged.governor.policy import preferred_cores
from edged.governor.sensors import read_all, read_core_capacities

log = logging.getLogger(__name__)


def load_model(config: EdgedConfig) -> InferenceBackend | None:
    """The backend, or None when the model is disabled or cannot be loaded: the daemon then
    still serves alerts and answers queries from triage alone (`degraded`)."""
    m = config.model
    if not m.enabled:
        log.warning("model disabled by config: queries get triage-only (degraded) answers")
        return None
    root = config.governor.sensor_root
    try:
        # Refuse, with the numbers, a model that cannot fit, rather than being OOM-killed
        # halfway through loading it.
        check_model_fits(m.path, m.context_length, read_all(root))
        capacities = read_core_capacities(root)
        preferred = preferred_cores(m.prefer_cores, capacities)
        if preferred:
            log.info(
                "cores in order of preference: %s (cpu_capacity %s)",
                list(preferred),
                [capacities.get(cpu) for cpu in preferred],
            )
        return load_backend(m, preferred, config.delivery.state_dir)
    except (ModelDirError, ModelDoesNotFit) as exc:
        log.error("model cannot be loaded, serving triage-only (degraded) answers: %s", exc)
        return None
