"""Read a YAML config file into `EdgedConfig`, turning every problem into one clear line:
file, line (where the YAML has one), dotted key, what was given and what was expected, and a
did-you-mean for a misspelt key."""

from __future__ import annotations

import difflib
import os
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


def _where(
    source: str,
    lines: dict[tuple[str, ...], int],
    loc: tuple[Any, ...],
    origins: dict[str, str] | None = None,
) -> str:
    """Where the value at `loc` came from: the file and line, or the environment variable or
    --set flag that set it (a bad EDGED_MQTT__PORT must not be blamed on a line of the YAML)."""
    path = tuple(str(p) for p in loc)
    origin = _origin(path, origins or {})
    if origin == "env":
        return "environment EDGED_" + "__".join(path).upper()
    if origin == "flag":
        return "--set " + ".".join(path)
    if origin is not None and origin.startswith("node-file "):
        return origin.removeprefix("node-file ")
    while path and path not in lines:
        path = path[:-1]
    return f"{source}:{lines[path]}" if path else source


def _origin(path: tuple[str, ...], origins: dict[str, str]) -> str | None:
    """The layer that set the key at `path` or, for a whole section, the key under it."""
    for depth in range(len(path), 0, -1):
        found = origins.get(".".join(path[:depth]))
        if found is not None:
            return found
    prefix = ".".join(path) + "."
    under = {o for key, o in origins.items() if key.startswith(prefix)}
    return under.pop() if len(under) == 1 else None


def parse_config(
    data: Any,
    source: str = "<config>",
    base_dir: Path | None = None,
    key_lines: dict[tuple[str, ...], int] | None = None,
    origins: dict[str, str] | None = None,
) -> EdgedConfig:
    """`origins` (dotted key -> layer, from `edged.config.layers`) lets an error name the
    environment variable or flag that set a bad value instead of a line of the file."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        config = EdgedConfig.model_validate(data)
    except ValidationError as exc:
        where = key_lines or {}
        lines = [
            f"{_where(source, where, e['loc'], origins)}: {_describe(e)}"  # type: ignore[arg-type]
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys without a word; in a config that hides the
    first value an operator wrote (two `mqtt:` sections: one of them is ignored)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first on line {seen[key]})",
                    key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """A YAML file's top-level mapping and the line of every key, or one-line ConfigErrors."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
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
    state_problem = state_dir_problem(config.delivery.state_dir)
    if state_problem is not None:
        problems.append(f"{where('delivery.state_dir')}: {state_problem}")
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


def state_dir_problem(state_dir: Path, create: bool = False) -> str | None:
    """Why the daemon could not keep its answered store in `state_dir`, or None: a file in the
    way, no permission (a non-root user and /var/lib/edged), a read-only mount. Without
    `create` nothing is changed (`config check`): a missing directory is judged by the nearest
    parent that exists, which must let the daemon create it."""
    shown = f"delivery.state_dir = '{state_dir}'"
    if state_dir.exists() and not state_dir.is_dir():
        return f"{shown}: exists and is not a directory"
    if create:
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"{shown}: cannot be created ({exc.strerror})"
    target = state_dir
    while not target.exists():
        target = target.parent
    if not target.is_dir():
        return f"{shown}: {target} is not a directory"
    # os.access answers for this process's user, and says no on a read-only mount (EROFS).
    if not os.access(target, os.W_OK | os.X_OK):
        verb = "written" if target == state_dir else f"created (no write access to {target})"
        return f"{shown}: cannot be {verb} by this user; the answered store lives there"
    return None
