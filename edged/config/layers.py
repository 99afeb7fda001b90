"""Fleet configuration: layers merged into one `EdgedConfig`, remembering where each value
came from.

Lowest to highest: built-in defaults → the fleet file's `defaults:` → the board profile
(`profiles:`, chosen by `profile:` or detected from the board) → the fleet file's entry for this
node (`nodes:`) → a node-local override file → environment variables
`EDGED_<SECTION>__<KEY>` → command-line `--set key=value`. A config file without `defaults:`,
`profiles:` or `nodes:` is a single-node file and sits where the fleet's node entry would.
String values may hold `${ENV_VAR}` placeholders, so secrets stay out of the YAML.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from edged.config.loader import ConfigError, parse_config, read_yaml
from edged.config.models import EdgedConfig
from edged.domain import BoardProfile, default_node_id

FLEET_KEYS = ("defaults", "profiles", "nodes")
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SECRET_KEYS = ("password",)


@dataclass(frozen=True)
class Resolved:
    config: EdgedConfig
    origins: dict[str, str]
    """Dotted key -> the layer that set it (`default` when none did)."""
    profile: str
    key_lines: dict[tuple[str, ...], int] = field(default_factory=dict)
    """Line of each key in the config file, by its path (for messages)."""
    warnings: tuple[str, ...] = ()
    """Problems that do not stop the daemon (an EDGED_ variable that looks like config but is
    not read); the CLI prints them and `edged run` logs them."""


def detect_board(root: Path = Path("/")) -> BoardProfile:
    """The profile for this board, from the kernel's device tree and NVIDIA's release file.
    `root` is configurable so tests can point it at a fake tree."""
    if (root / "etc" / "nv_tegra_release").is_file():
        return BoardProfile.JETSON_ORIN_NANO
    try:
        model = (root / "proc" / "device-tree" / "model").read_bytes().decode(errors="replace")
    except OSError:
        return BoardProfile.GENERIC
    model = model.rstrip("\0")
    if "Raspberry Pi 5" in model:
        return BoardProfile.PI5
    if "Raspberry Pi 4" in model:
        return BoardProfile.PI4
    if "NVIDIA Jetson" in model:
        return BoardProfile.JETSON_ORIN_NANO
    return BoardProfile.GENERIC


def _merge(
    base: dict[str, Any],
    layer: Mapping[str, Any],
    origin: str,
    origins: dict[str, str],
    prefix: str = "",
) -> None:
    for key, value in layer.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value, origin, origins, dotted + ".")
        elif isinstance(value, Mapping):
            base[key] = {}
            _merge(base[key], value, origin, origins, dotted + ".")
        else:
            base[key] = value
            origins[dotted] = origin


# The top-level keys an EDGED_ variable without "__" may set (EDGED_NODE_ID, EDGED_PROFILE).
# Any other such variable belongs to a tool (EDGED_GENAI_VENV, EDGED_ARM64_CACHE) and is not
# config. A variable with "__" is always config, so a misspelt section is an error, not ignored.
_ENV_TOP_LEVEL = frozenset(
    {"profile"}
    | {
        name
        for name, field in EdgedConfig.model_fields.items()
        if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel))
    }
)


_SECTIONS = tuple(name for name in EdgedConfig.model_fields if name not in _ENV_TOP_LEVEL)


def env_warnings(environ: Mapping[str, str]) -> list[str]:
    """EDGED_ variables that look like config but are not read: EDGED_MQTT_PORT (one
    underscore) is ignored like a tool's variable, which would silently keep the file's port."""
    found = []
    for name in sorted(environ):
        rest = name[len("EDGED_") :].lower() if name.startswith("EDGED_") else ""
        if "__" in rest or rest in _ENV_TOP_LEVEL:
            continue
        section = next((sec for sec in _SECTIONS if rest.startswith(sec + "_")), None)
        if section is not None:
            key = rest[len(section) + 1 :]
            found.append(
                f"environment: {name} is not read: a key inside a section needs two "
                f"underscores after the section; did you mean EDGED_{section.upper()}__"
                f"{key.upper()}?"
            )
    return found


def _env_layer(environ: Mapping[str, str]) -> dict[str, Any]:
    """EDGED_MQTT__HOST=b -> {"mqtt": {"host": "b"}}; values are YAML scalars ("2" is 2)."""
    layer: dict[str, Any] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith("EDGED_"):
            continue
        path = [p.lower() for p in name[len("EDGED_") :].split("__")]
        if len(path) == 1 and path[0] not in _ENV_TOP_LEVEL:
            continue
        try:
            value = yaml.safe_load(raw) if raw else raw
        except yaml.YAMLError:
            value = raw
        node = layer
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return layer


def _flag_layer(flags: list[str]) -> dict[str, Any]:
    layer: dict[str, Any] = {}
    for flag in flags:
        key, sep, raw = flag.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {flag!r}: expected KEY=VALUE, e.g. mqtt.port=8883")
        node = layer
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw else raw
    return layer


def _substitute(data: Any, environ: Mapping[str, str], where: str, path: str = "") -> Any:
    if isinstance(data, dict):
        return {k: _substitute(v, environ, where, f"{path}{k}.") for k, v in data.items()}
    if isinstance(data, list):
        return [_substitute(v, environ, where, path) for v in data]
    if isinstance(data, str) and "${" in data:

        def value(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in environ:
                raise ConfigError(
                    f"{where}: {path.rstrip('.')}: environment variable {name} is not set"
                )
            return environ[name]

        return _PLACEHOLDER.sub(value, data)
    return data


def resolve(
    config_file: Path,
    *,
    node_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: list[str] | None = None,
    node_id: str | None = None,
    board_root: Path = Path("/"),
) -> Resolved:
    env = os.environ if environ is None else environ
    data, lines = read_yaml(config_file)
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    source = str(config_file)
    node_layer = read_yaml(node_file)[0] if node_file is not None else {}
    env_layer, flag_layer = _env_layer(env), _flag_layer(flags or [])
    chosen_id = _node_id(node_id, flag_layer, env_layer, node_layer, data)
    upper: list[tuple[str, dict[str, Any]]] = []
    profiles: dict[str, Any] = {}
    if any(k in data for k in FLEET_KEYS):
        _check_fleet_keys(data, source)
        _merge(merged, data.get("defaults") or {}, "fleet", origins)
        profiles = data.get("profiles") or {}
        upper.append(("node", _node_entry(data.get("nodes") or {}, chosen_id, source)))
    else:
        upper.append(("file", data))
    if node_file is not None:
        upper.append((f"node-file {node_file}", node_layer))
    upper.append(("env", env_layer))
    upper.append(("flag", flag_layer))
    if chosen_id.explicit:
        # One rule: whichever way the node was named, that name is both the fleet entry used
        # and the node_id the daemon publishes as.
        upper.append((chosen_id.origin, {"node_id": chosen_id.value}))

    profile = _profile(merged, upper, profiles, board_root, source)
    if profile in profiles:
        _merge(merged, profiles[profile] or {}, f"profile {profile}", origins)
    for origin, layer in upper:
        _merge(merged, layer, origin, origins)
    merged.pop("profile", None)
    origins.pop("profile", None)
    merged = _substitute(merged, env, source)
    config = parse_config(
        merged, source, base_dir=config_file.resolve().parent, key_lines=lines, origins=origins
    )
    return Resolved(config, origins, profile, lines, tuple(env_warnings(env)))


@dataclass(frozen=True)
class _NodeId:
    value: str
    origin: str
    explicit: bool
    """Named by the user (flag, --set, environment, a file), not the host name."""


def _node_id(
    flag_id: str | None,
    flag_layer: Mapping[str, Any],
    env_layer: Mapping[str, Any],
    node_layer: Mapping[str, Any],
    data: Mapping[str, Any],
) -> _NodeId:
    """The node's id, from the highest layer that names it: --node-id and --set node_id (which
    must agree), EDGED_NODE_ID, the node-local file, the fleet's defaults or a single-node
    file; else the host name."""
    set_id = flag_layer.get("node_id")
    if flag_id is not None and set_id is not None and str(set_id) != flag_id:
        raise ConfigError(f"--node-id {flag_id} and --set node_id={set_id} disagree; give one")
    file_id = (data.get("defaults") or {}) if any(k in data for k in FLEET_KEYS) else data
    for value, origin in (
        (flag_id, "flag"),
        (set_id, "flag"),
        (env_layer.get("node_id"), "env"),
        (node_layer.get("node_id"), "node-file"),
        (file_id.get("node_id") if isinstance(file_id, Mapping) else None, "file"),
    ):
        if value is not None:
            return _NodeId(str(value), origin, True)
    return _NodeId(_hostname(), "default", False)


def _node_entry(nodes: Mapping[str, Any], node: _NodeId, source: str) -> dict[str, Any]:
    """The fleet's entry for this node. A node named on purpose must have one: a typo in
    --node-id would otherwise start a node on the defaults alone, under a name no one expects.
    A host name without an entry is a new board, on the defaults."""
    if node.value in nodes:
        entry = dict(nodes[node.value] or {})
        if "node_id" in entry and str(entry["node_id"]) != node.value:
            raise ConfigError(
                f"{source}: nodes.{node.value}.node_id = {entry['node_id']!r}: an entry is named "
                "by its key; leave node_id out of it"
            )
        return entry
    if node.explicit and nodes:
        raise ConfigError(
            f"{source}: node id {node.value!r} (from {_ORIGIN_NAMES[node.origin]}) has no entry "
            f"in nodes: ({', '.join(sorted(nodes))})"
        )
    return {}


_ORIGIN_NAMES = {
    "flag": "the command line",
    "env": "EDGED_NODE_ID",
    "node-file": "the node-local file",
    "file": "the config file",
}


def _check_fleet_keys(data: Mapping[str, Any], source: str) -> None:
    unknown = sorted(set(data) - set(FLEET_KEYS))
    if unknown:
        raise ConfigError(
            f"{source}: a fleet file has only defaults, profiles and nodes; "
            f"unknown top-level key(s) {', '.join(unknown)}"
        )


def _profile(
    merged: Mapping[str, Any],
    upper: list[tuple[str, dict[str, Any]]],
    profiles: Mapping[str, Any],
    board_root: Path,
    source: str,
) -> str:
    """The profile named by the highest layer that names one, else detected from the board."""
    chosen = "auto"
    for _, layer in [("fleet", merged), *upper]:
        if isinstance(layer.get("profile"), str):
            chosen = layer["profile"]
    profile = str(detect_board(board_root)) if chosen == "auto" else chosen
    if profiles and profile not in profiles:
        raise ConfigError(
            f"{source}: profile {profile!r} is not one of the fleet file's "
            f"profiles ({', '.join(profiles)})"
        )
    return profile


def _hostname() -> str:
    return default_node_id()


def render_resolved(resolved: Resolved) -> str:
    """Every leaf of the config, its value (secrets masked) and where it came from."""
    out: list[str] = [f"# profile: {resolved.profile}"]

    def walk(data: Any, prefix: str) -> None:
        if isinstance(data, dict) and data:
            for key, value in data.items():
                walk(value, f"{prefix}{key}.")
            return
        key = prefix.rstrip(".")
        shown = "********" if key.rsplit(".", 1)[-1] in _SECRET_KEYS and data else data
        out.append(
            f"{key} = {yaml.safe_dump(shown, default_flow_style=True).strip()}"
            f"    # {resolved.origins.get(key, 'default')}"
        )

    walk(resolved.config.model_dump(mode="json"), "")
    text = "\n".join(line.replace("\n...", "") for line in out)
    return text + "\n"
