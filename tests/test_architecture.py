"""The shape of the code, checked: the one-way pipeline's import rules, and small functions.

Data flows broker -> validate -> schedule -> infer -> guard -> publish, and a module may import
only from its own stage or earlier ones (docs/architecture.md). The policy layers — `domain`,
`config`, `clinical`, `governor` — import nothing from `mqtt`, `engine` or `service`, so they
can be tested, and reused, without sockets, threads or a model.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

EDGED = Path(__file__).resolve().parent.parent / "edged"

# Stages of the pipeline, in data-flow order. A module's stage is the longest prefix listed.
STAGES: dict[str, int] = {
    "edged.mqtt.transport": 0,  # broker
    "edged.mqtt.errors": 1,  # validate
    "edged.mqtt.topics": 1,
    "edged.mqtt.messages": 1,
    "edged.mqtt.fhir": 1,
    "edged.mqtt.routing": 1,
    "edged.scheduler": 2,  # schedule
    "edged.engine": 3,  # infer
    "edged.clinical": 4,  # guard (and the vitals path's scoring)
    "edged.mqtt.payloads": 5,  # publish
    "edged.mqtt.streaming": 5,
    "edged.mqtt.homeassistant": 5,
}
STAGE_NAMES = ("broker", "validate", "schedule", "infer", "guard", "publish")
# Below every stage: shared vocabulary, configuration and the governor's policy and sensors.
FOUNDATION = ("edged.domain", "edged.config", "edged.governor", "edged.models")
# Above every stage: wiring and entry points, which may import anything.
WIRING = (
    "edged.service",
    "edged.cli",
    "edged.demo",
    "edged.doctor",
    "edged.__main__",
    "edged.export",
)
POLICY = ("edged.clinical", "edged.config", "edged.governor")
FORBIDDEN_FOR_POLICY = ("edged.mqtt", "edged.engine", "edged.service")

MAX_FUNCTION_LINES = 60


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _stage(module: str) -> int | None:
    matches = [p for p in STAGES if _within(module, p)]
    return STAGES[max(matches, key=len)] if matches else None


def _module_name(path: Path) -> str:
    parts = path.relative_to(EDGED.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def edged_imports(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every edged module `source` imports, at any depth (lazy imports in functions too)."""
    found: set[str] = set()
    package = module if is_package else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if _within(a.name, "edged"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            if _within(base, "edged"):
                found.add(base)
    return found


def violations(module: str, imported: set[str]) -> list[str]:
    """Why `module` may not import some of `imported` (empty when all is well)."""
    problems = []
    for target in sorted(imported):
        if _within(module, "edged.domain"):
            problems.append(f"{module} imports {target}: domain imports nothing from edged")
            continue
        if any(_within(module, p) for p in POLICY) and any(
            _within(target, f) for f in FORBIDDEN_FOR_POLICY
        ):
            problems.append(f"{module} imports {target}: policy must not depend on I/O layers")
            continue
        if any(_within(module, f) for f in FOUNDATION) and any(_within(target, w) for w in WIRING):
            problems.append(f"{module} imports {target}: foundation imports no wiring")
            continue
        mine, theirs = _stage(module), _stage(target)
        if mine is not None and theirs is not None and theirs > mine:
            problems.append(
                f"{module} ({STAGE_NAMES[mine]}) imports {target} ({STAGE_NAMES[theirs]}): "
                "upstream in broker -> validate -> schedule -> infer -> guard -> publish"
            )
        if mine is not None and any(_within(target, w) for w in WIRING):
            problems.append(f"{module} imports {target}: a pipeline stage imports no wiring")
    return problems


def _modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(EDGED.rglob("*.py")):
        yield _module_name(path), path


def test_no_module_imports_upstream_or_from_io_into_policy() -> None:
    problems = []
    for module, path in _modules():
        is_package = path.name == "__init__.py"
        problems += violations(module, edged_imports(path.read_text(), module, is_package))
    assert problems == []


@pytest.mark.parametrize(
    ("module", "target"),
    [
        ("edged.clinical.advice", "edged.mqtt.payloads"),  # policy reaching into I/O
        ("edged.config.models", "edged.mqtt.topics"),
        ("edged.governor.memory_check", "edged.engine.manifest"),
        ("edged.mqtt.messages", "edged.mqtt.payloads"),  # validate -> publish: upstream
        ("edged.scheduler", "edged.engine"),  # schedule -> infer
        ("edged.engine.engine", "edged.clinical.advice"),  # infer -> guard
        ("edged.mqtt.transport", "edged.mqtt.messages"),  # broker -> validate
        ("edged.domain", "edged.config.models"),
        ("edged.engine.engine", "edged.service.daemon"),
    ],
)
def test_the_rules_catch_each_kind_of_violation(module: str, target: str) -> None:
    # The checker is what the test above relies on: it must flag these (the layering #11 fixed).
    assert violations(module, {target})


def test_relative_imports_are_resolved() -> None:
    source = "from .payloads import encode\nfrom ..engine import Engine\n"
    assert edged_imports(source, "edged.mqtt.messages") == {"edged.mqtt.payloads", "edged.engine"}
    assert edged_imports("from .engine import Engine\n", "edged.engine", is_package=True) == {
        "edged.engine.engine"
    }


def _long_functions(source: str) -> list[tuple[str, int]]:
    return [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


def test_no_function_in_edged_is_longer_than_60_lines() -> None:
    long = [
        f"{module}.{name}: {lines} lines"
        for module, path in _modules()
        for name, lines in _long_functions(path.read_text())
    ]
    assert long == []


def test_a_long_function_is_found() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert _long_functions(f"def f():\n{body}\n") == [("f", MAX_FUNCTION_LINES + 1)]


def test_no_function_in_edged_is_more_complex_than_12() -> None:
    # ruff's mccabe check (C901) with max-complexity = 12 from pyproject.toml, as `make lint`.
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--select", "C901", str(EDGED)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout


def test_the_daemon_is_wiring_only() -> None:
    lines = (EDGED / "service" / "daemon.py").read_text().count("\n")
    assert lines <= 300, f"edged/service/daemon.py has {lines} lines; it should only wire"
