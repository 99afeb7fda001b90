"""What a reload (SIGHUP) changes: a pure comparison of the running config with the new one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edged.config.models import EdgedConfig

# Keys that only take effect on a restart: they shape connections, threads or files opened at
# start. Everything else (clinical thresholds, limits, prompts, streaming, governor, logging)
# is live.
RESTART_KEYS = (
    "node_id",
    "mqtt.",
    "model.type",
    "model.path",
    "model.threads",
    "model.context_length",
    "model.verify_hashes",
    "model.spin_threads",
    "model.prefer_cores",
    "model.enabled",
    "delivery.",
    "service.",
    "status.",
    "metrics.",
    "homeassistant.",
)


@dataclass(frozen=True)
class ReloadPlan:
    effective: EdgedConfig
    """The new config with every restart-only key kept at its running value."""
    live: list[str]
    """Changed keys applied now."""
    restart: list[str]
    """Changed keys that wait for a restart."""


def plan_reload(running: EdgedConfig, new: EdgedConfig) -> ReloadPlan:
    old_flat, new_flat = _flatten(running.model_dump()), _flatten(new.model_dump())
    changed = sorted(
        k for k in old_flat.keys() | new_flat.keys() if old_flat.get(k) != new_flat.get(k)
    )
    restart = [k for k in changed if k.startswith(RESTART_KEYS)]
    live = [k for k in changed if k not in restart]
    if not live:
        return ReloadPlan(running, live, restart)
    data = new.model_dump()
    for key in restart:
        _assign(data, key, old_flat.get(key))
    return ReloadPlan(EdgedConfig.model_validate(data), live, restart)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def _assign(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[leaf] = value
