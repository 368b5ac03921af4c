"""The package's shape, checked from the source with ``ast`` so a change cannot quietly break it:
no import cycles, data flows one way (core -> experiment / app), serving code stays lean."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kdcore.config import REPO_ROOT

PACKAGE = REPO_ROOT / "kdcore"
MAX_LINES = 500
# What the app and the live path load: no training, quantisation, metrics or data splitting.
SERVING = ("kdcore.inference", "kdcore.cam", "kdcore.cam_predictor", "kdcore.onnx_runtime")
NOT_FOR_SERVING = ("kdcore.export", "kdcore.metrics", "kdcore.data", "kdcore.engine", "kdcore.distill")
NOT_FOR_SERVING_THIRD_PARTY = ("sklearn", "onnxruntime.quantization", "imagehash", "matplotlib")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of the file (lazy imports count too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    """kdcore module -> the kdcore modules it imports; plus third-party imports under '<ext>'."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in files.items():
        imported = imported_modules(path)
        edges[name] = {m for m in imported if m in files and m != name}
        edges[f"<ext>{name}"] = {m for m in imported if not m.startswith("kdcore")}
    return edges


def internal(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {k: v for k, v in graph.items() if not k.startswith("<ext>")}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, pending = set(), [start]
    while pending:
        for nxt in graph.get(pending.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                pending.append(nxt)
    return seen


def test_no_import_cycles(graph):
    modules = internal(graph)
    cycles = [m for m in modules if m in reachable(modules, m) and not m.endswith("__init__")]
    assert not cycles, f"import cycles through: {sorted(cycles)}"


def test_core_never_imports_experiment_or_app_and_app_never_imports_experiment(graph):
    modules = internal(graph)
    upward = [
        (m, dep)
        for m, deps in modules.items()
        for dep in deps
        if (m.count(".") == 1 and dep.startswith(("kdcore.experiment", "kdcore.app")))
        or (m.startswith("kdcore.app") and dep.startswith("kdcore.experiment"))
    ]
    assert not upward, f"imports against the flow core -> experiment / app: {upward}"


@pytest.mark.parametrize("serving_module", SERVING)
def test_serving_code_does_not_load_training_quantisation_metrics_or_splitting(graph, serving_module):
    closure = reachable(internal(graph), serving_module) | {serving_module}
    assert not closure & set(NOT_FOR_SERVING), sorted(closure & set(NOT_FOR_SERVING))
    third_party = {m for module in closure for m in graph[f"<ext>{module}"]}
    assert not {m for m in third_party if m.startswith(NOT_FOR_SERVING_THIRD_PARTY)}


def test_no_module_is_too_long_to_read():
    long = {
        str(p.relative_to(REPO_ROOT)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these by concern: {long}"


def test_the_three_parts_are_folders():
    assert (PACKAGE / "experiment" / "__init__.py").is_file() and (PACKAGE / "app" / "__init__.py").is_file()
    assert (PACKAGE / "app" / "patches" / "__init__.py").is_file()
