"""The house's layering, checked on the source: no import cycle anywhere, no upward import, and the
OpenAI-compatible server and `moe/` free of pipeline imports (imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cli", "server", "flows", "tasks", "moe", "storage")
# What each layer may import from the project (besides itself).
ALLOWED = {
    "storage": set(),
    "moe": set(),
    "tasks": {"storage", "moe"},
    "flows": {"tasks", "storage", "moe"},
    "server": {"storage", "moe"},  # the OpenAI-compatible server: no pipeline code
    "cli": {"flows", "server", "tasks", "storage", "moe"},  # the entry point: parse, call, print
}
SERVER = ("server.app", "server.model")  # depends on moe/ and storage/ only


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            subs = {f"{module}.{a.name}" for a in node.names} & known  # `from . import losses`
            found |= subs or {module}
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_point_down_only():
    upward = [
        f"{m} imports {d}"
        for m, deps in _graph().items()
        for d in deps
        if (src := m.split(".")[0]) != (dst := d.split(".")[0]) and dst not in ALLOWED[src]
    ]
    assert upward == []


def test_the_server_and_moe_import_no_pipeline_code():
    graph = _graph()
    for name in SERVER:
        assert {d.split(".")[0] for d in graph[name]} <= {"moe", "storage", "server"}, name
    assert all(
        not d.startswith(("tasks", "flows", "storage"))
        for m in graph
        if m.startswith("moe")
        for d in graph[m]
    )


def _opens_registry(path: Path) -> list[int]:
    """Lines where the module opens a registry itself: ``Registry(...)`` or ``Registry.from_settings``."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Name) and f.id == "Registry") or (
                isinstance(f, ast.Attribute)
                and f.attr == "from_settings"
                and isinstance(f.value, ast.Name)
                and f.value.id == "Registry"
            ):
                lines.append(node.lineno)
    return lines


def test_only_the_stages_open_the_registry_in_tasks():
    """tasks/: the modules at the top are pure or are given a Registry by their caller; only the
    registry-facing stage functions in tasks/stages/ open one."""
    offenders = {
        name: lines
        for name, path in _modules().items()
        if name.startswith("tasks.")
        and not name.startswith("tasks.stages")
        and (lines := _opens_registry(path))
    }
    assert offenders == {}
    assert _opens_registry(ROOT / "tasks" / "stages" / "train.py")  # the check sees a real opening
