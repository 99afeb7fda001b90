"""Configuration: one pydantic model per section, loaded from YAML."""

from edged.config.loader import ConfigError, load_config
from edged.config.models import EdgedConfig

__all__ = ["ConfigError", "EdgedConfig", "load_config"]
