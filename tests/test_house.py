"""Facts about the house, read from the AST of carv_attrib/ (no import of the package needed).

Every `import` counts, at module level or inside a function (a lazy import is still an arrow). The
rooms and who may import whom are README's Layout section; these tests keep them true:
- no import circle between modules;
- no library module imports the CLI;
- no stage of pipeline/ imports another stage (shared helpers are listed in PIPELINE_SHARED);
- the estimator (carv/), the gradient machinery (attrib/), search/ and video/ import neither run
  storage nor the stages above them (ROOM_MAY_NOT).
The largest module and function are printed (`pytest -s`) so a review can quote them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "carv_attrib"

# pipeline/ modules every stage may use; any other pipeline/ module is a stage. A composer runs other
# stages by name: `demo` all of them, `featurize` ends by building the index (`featurize_and_index`).
PIPELINE_SHARED = {
    "carv_attrib.pipeline._job",
    "carv_attrib.pipeline.ray_exec",
    "carv_attrib.pipeline.index_parts",
}
PIPELINE_COMPOSERS = {
    "carv_attrib.pipeline.demo": None,  # None: any stage
    "carv_attrib.pipeline.featurize": {"carv_attrib.pipeline.index"},
}

# room -> rooms it must never import (a room is the first package level under carv_attrib)
ROOM_MAY_NOT = {
    "carv": {"attrib", "search", "store", "video", "models", "pipeline", "lds", "cli", "config"},
    "attrib": {"store", "video", "pipeline", "lds", "cli"},
    "search": {"store", "video", "pipeline", "lds", "cli", "attrib"},
    "video": {"store", "attrib", "search", "models", "pipeline", "lds", "cli"},
    "store": {"pipeline", "lds", "cli"},
    "models": {"pipeline", "lds", "cli"},
    "lds": {"pipeline", "cli"},
    "config": {"pipeline", "lds", "cli", "attrib", "search", "models"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The carv_attrib modules `path` imports (resolved to a module of the package, not a name in it)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            # the longest known module that prefixes the target: `from a.b import c` is a.b.c or a.b
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t != "carv_attrib":
                out.add(t)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    g = {name: _imports(path, name, known) for name, path in mods.items()}
    # a package's __init__ is imported by each of its modules' imports: only its own imports count
    return g


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else parts[-1]


def test_no_import_circle(graph: dict[str, set[str]]) -> None:
    # Tarjan-free: depth-first search for a back edge, reporting the first cycle found
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import circle: " + " -> ".join(cycle))


def test_no_library_module_imports_the_cli(graph: dict[str, set[str]]) -> None:
    bad = {m: sorted(n for n in deps if _room(n) == "cli") for m, deps in graph.items() if _room(m) != "cli"}
    assert {m: d for m, d in bad.items() if d} == {}


def test_no_stage_imports_another_stage(graph: dict[str, set[str]]) -> None:
    def is_stage(m: str) -> bool:
        return m.startswith("carv_attrib.pipeline.") and m not in PIPELINE_SHARED

    def allowed(m: str, n: str) -> bool:
        if m not in PIPELINE_COMPOSERS:
            return False
        composes = PIPELINE_COMPOSERS[m]
        return composes is None or n in composes

    bad = {
        m: sorted(n for n in deps if is_stage(n) and not allowed(m, n))
        for m, deps in graph.items()
        if is_stage(m)
    }
    assert {m: d for m, d in bad.items() if d} == {}


def test_rooms_import_only_downwards(graph: dict[str, set[str]]) -> None:
    bad = {
        m: sorted(n for n in deps if _room(n) in ROOM_MAY_NOT.get(_room(m), set()))
        for m, deps in graph.items()
    }
    assert {m: d for m, d in bad.items() if d} == {}


def test_the_rules_cover_every_room() -> None:
    rooms = {_room(m) for m in _modules() if m.count(".") >= 2}
    assert rooms - set(ROOM_MAY_NOT) <= {"cli", "pipeline"}, "a new room needs its line in ROOM_MAY_NOT"


def test_sizes_are_reported(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints the largest module and function (not a limit: a number for the review to quote)."""
    modules, functions = [], []
    for name, path in _modules().items():
        src = path.read_text(encoding="utf-8")
        modules.append((len(src.splitlines()), name))
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                functions.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    modules.sort()
    functions.sort()
    with capsys.disabled():
        print(f"\nlargest module: {modules[-1][1]} ({modules[-1][0]} lines)")
        print(f"largest function: {functions[-1][1]} ({functions[-1][0]} lines)")
    assert modules and functions
