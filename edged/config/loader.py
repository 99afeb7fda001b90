"""Read a YAML config file into `EdgedConfig`, turning every problem into one clear line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from edged.config.models import EdgedConfig


class ConfigError(Exception):
    """A config that cannot be used; str() is one line per problem, naming file and key."""


def _describe(error: dict[str, Any]) -> str:
    path = ".".join(str(p) for p in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{path}: unknown key"
    if error["type"] == "missing":
        return f"{path}: required key is missing"
    value = error.get("input")
    shown = repr(value) if not isinstance(value, dict) else "a mapping"
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{path} = {shown}: {error['msg']}"


def parse_config(data: Any, source: str = "<config>", base_dir: Path | None = None) -> EdgedConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        config = EdgedConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: {_describe(e)}" for e in exc.errors()]  # type: ignore[arg-type]
        raise ConfigError("\n".join(lines)) from None
    if base_dir is not None:
        config = _resolve_paths(config, base_dir)
    return config


def _resolve_paths(config: EdgedConfig, base_dir: Path) -> EdgedConfig:
    # Relative paths in a config file are relative to the file, not to the working directory
    # of whoever started the daemon (systemd starts it in /).
    model_path = config.model.path
    if not model_path.is_absolute():
        model_path = base_dir / model_path
    state_dir = config.delivery.state_dir
    if not state_dir.is_absolute():
        state_dir = base_dir / state_dir
    return config.model_copy(
        update={
            "model": config.model.model_copy(update={"path": model_path}),
            "delivery": config.delivery.model_copy(update={"state_dir": state_dir}),
        }
    )


def load_config(path: str | Path) -> EdgedConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data, str(path), base_dir=path.resolve().parent)
