"""The package's shape: imports point one way (no circle, even under TYPE_CHECKING), the
hub and core layers import only what is below them, and their modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

import ssehub

ROOT = Path(ssehub.__file__).parent
# What each layer may import from the package (besides itself).
BELOW = {
    "ssehub.core": ("ssehub.core", "ssehub.config"),
    "ssehub.hub": ("ssehub.hub", "ssehub.core", "ssehub.config", "ssehub.redis", "ssehub.logs"),
}
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules ``name`` imports, wherever the import stands."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_module_imports_itself_back() -> None:
    graph = _graph()
    # Depth-first search for a back edge; the path shows the circle.
    state: dict[str, int] = {}
    circles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                circles.append(" -> ".join([*path[path.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert circles == []


def test_hub_and_core_import_only_the_layers_below() -> None:
    wrong = []
    for name, deps in _graph().items():
        for layer, allowed in BELOW.items():
            if name.startswith(layer + ".") or name == layer:
                wrong += [f"{name} -> {d}" for d in sorted(deps) if not d.startswith(allowed)]
    assert wrong == []


def test_hub_and_core_modules_stay_small() -> None:
    long = {}
    for layer in ("hub", "core"):
        for path in (ROOT / layer).glob("*.py"):
            lines = len(path.read_text(encoding="utf-8").splitlines())
            if lines > MAX_LINES:
                long[path.name] = lines
    assert long == {}
