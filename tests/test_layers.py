"""The package shows its layers: the HTTP, hub, core, config, CLI and logging modules
import no module that imports them back (at run time, inside a function or under
``TYPE_CHECKING`` alike), and none is over 500 lines."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

import ssehub

ROOT = Path(ssehub.__file__).parent
# The layers this test holds to the rule (others have theirs).
CHECKED = (
    "ssehub.http",
    "ssehub.hub",
    "ssehub.core",
    "ssehub.config",
    "ssehub.cli",
    "ssehub.logs",
)
# What the hub and its pure core may import from the package (besides themselves):
# only the layers below them, never http/, the server, node or supervisors.
BELOW = {
    "ssehub.core": ("ssehub.core", "ssehub.config"),
    "ssehub.hub": ("ssehub.hub", "ssehub.core", "ssehub.config", "ssehub.redis", "ssehub.logs"),
}
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = ("ssehub", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every ssehub module ``name`` imports, anywhere in its text."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the module; `from mod import name`, the module.
            subs = [f"{base}.{alias.name}" for alias in node.names]
            targets = [sub if sub in known else base for sub in subs]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


@functools.cache
def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph.get(name, ()))
    return seen


def _checked(name: str) -> bool:
    return any(name == layer or name.startswith(layer + ".") for layer in CHECKED)


def test_the_graph_sees_relative_and_absolute_imports() -> None:
    graph = _graph()
    assert "ssehub.config" in graph["ssehub.logs"]
    assert "ssehub.http.auth" in graph["ssehub.http.app"]
    assert "ssehub.logs" in graph["ssehub.cli.main"]


@pytest.mark.parametrize("name", sorted(n for n in _graph() if _checked(n)))
def test_no_import_circle_through(name: str) -> None:
    graph = _graph()
    back = [other for other in _reaches(graph, name) if name in _reaches(graph, other)]
    assert not back, f"{name} imports {sorted(back)}, which import it back"


def test_logs_import_nothing_above_the_config() -> None:
    above = [
        name
        for name in _reaches(_graph(), "ssehub.logs")
        if name != "ssehub.config" and not name.startswith("ssehub.config.")
    ]
    assert not above


@pytest.mark.parametrize("layer", sorted(BELOW))
def test_hub_and_core_import_only_the_layers_below(layer: str) -> None:
    wrong = [
        f"{name} -> {dep}"
        for name, deps in _graph().items()
        if name == layer or name.startswith(layer + ".")
        for dep in sorted(deps)
        if not any(dep == ok or dep.startswith(ok + ".") for ok in BELOW[layer])
    ]
    assert not wrong


@pytest.mark.parametrize("name", sorted(n for n in _modules() if _checked(n)))
def test_no_module_over_500_lines(name: str) -> None:
    lines = len(_modules()[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{name}: {lines} lines"
