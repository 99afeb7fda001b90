"""Configuration: one pydantic model per section, loaded from YAML."""

from edged.config.loader import ConfigError, check_config, load_config
from edged.config.models import EdgedConfig

__all__ = ["ConfigError", "EdgedConfig", "check_config", "load_config"]
