"""Read a YAML config file into `EdgedConfig`, turning every problem into one clear line:
file, line (where the YAML has one), dotted key, what was given and what was expected, and a
did-you-mean for a misspelt key."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from edged.config.models import EdgedConfig


class ConfigError(Exception):
    """A config that cannot be used; str() is one line per problem, naming file and key."""


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """1-based line of every mapping key in the YAML, by its path."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = (*path, str(key.value))
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _fields_at(path: tuple[str, ...]) -> list[str]:
    """The keys the schema allows in the mapping at `path` (for did-you-mean)."""
    model: type[BaseModel] = EdgedConfig
    for part in path:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        candidates = [
            a
            for a in (annotation, *getattr(annotation, "__args__", ()))
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if not candidates:
            return []
        model = candidates[0]
    return list(model.model_fields)


def _describe(error: dict[str, Any]) -> str:
    loc = tuple(str(p) for p in error["loc"])
    path = ".".join(loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(loc[-1], _fields_at(loc[:-1]), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{path}: unknown key{hint}"
    if error["type"] == "missing":
        return f"{path}: required key is missing"
    value = error.get("input")
    if error["type"] == "value_error" and isinstance(value, dict):
        # A section's own check (e.g. the governor's bands): its message names the keys.
        return str(error["msg"]).removeprefix("Value error, ")
    shown = repr(value) if not isinstance(value, dict) else "a mapping"
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{path} = {shown}: {error['msg']}"


def _where(source: str, lines: dict[tuple[str, ...], int], loc: tuple[Any, ...]) -> str:
    path = tuple(str(p) for p in loc)
    while path and path not in lines:
        path = path[:-1]
    return f"{source}:{lines[path]}" if path else source


def parse_config(
    data: Any,
    source: str = "<config>",
    base_dir: Path | None = None,
    key_lines: dict[tuple[str, ...], int] | None = None,
) -> EdgedConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        config = EdgedConfig.model_validate(data)
    except ValidationError as exc:
        where = key_lines or {}
        lines = [
            f"{_where(source, where, e['loc'])}: {_describe(e)}"  # type: ignore[arg-type]
            for e in exc.errors()
        ]
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


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """A YAML file's top-level mapping and the line of every key, or one-line ConfigErrors."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(yaml_error(path, exc)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data, key_lines(text)


def load_config(path: str | Path) -> EdgedConfig:
    """A single config file, without fleet layers (see `edged.config.layers.resolve`)."""
    path = Path(path)
    data, lines = read_yaml(path)
    return parse_config(data, str(path), base_dir=path.resolve().parent, key_lines=lines)


def yaml_error(path: Path, exc: yaml.YAMLError) -> str:
    """One line: file, line and the parser's complaint."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{where}: not valid YAML: {problem}"


def check_config(
    config: EdgedConfig, source: str, key_lines: dict[tuple[str, ...], int] | None = None
) -> list[str]:
    """Problems a schema cannot see: files that must exist and be readable. With `key_lines`
    (from `read_yaml`), each problem names the line of its key, like a schema error."""
    problems: list[str] = []

    def where(key: str) -> str:
        return _where(source, key_lines or {}, tuple(key.split(".")))

    model_dir = config.model.path
    if config.model.enabled and not (model_dir / "edged-model.json").is_file():
        problems.append(
            f"{where('model.path')}: model.path = '{model_dir}': no edged model directory there "
            "(expected edged-model.json; see `edged model export`)"
        )
    tls = config.mqtt.tls
    files = (
        [
            ("mqtt.tls.ca_file", tls.ca_file),
            ("mqtt.tls.cert_file", tls.cert_file),
            ("mqtt.tls.key_file", tls.key_file),
        ]
        if tls
        else []
    )
    files.append(("mqtt.password_file", config.mqtt.password_file))
    for key, file in files:
        if file is None:
            continue
        try:
            file.open("rb").close()
        except OSError as exc:
            problems.append(f"{where(key)}: {key} = '{file}': cannot be read ({exc.strerror})")
    return problems
