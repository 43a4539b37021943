"""The house rules of docs/architecture.md, checked on the source: the module import graph (lazy,
function-local imports included; annotation-only imports under ``TYPE_CHECKING`` are not
imports at run time) has no cycle, the serving side never imports build code, and
no source file outside ``tests/`` outgrows one sitting's reading."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "bench", "cli", "models", "routing", "serving", "telemetry")
MAX_LINES = 350
# the serving path: none of it may import build code (torch, transformers, optimum behind it)
RUNTIME = ("app", "serving", "routing", "telemetry", "models.runtime")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node but those under ``if TYPE_CHECKING:`` (imports for annotations only, which
    never run)."""
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
            for child in node.body for n in ast.walk(child)}
    return [n for n in ast.walk(tree) if id(n) not in skip]


def imports_of(path: Path) -> set[str]:
    """The project modules ``path`` imports when it runs, anywhere in the file (lazy,
    function-local imports included)."""
    out: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:  # ``from pkg import module`` names the module itself
                sub = f"{node.module}.{alias.name}"
                out.add(sub if is_module(sub) else node.module)
    return {m for m in out if m.split(".")[0] in PACKAGES and is_module(m)}


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) - {module_name(p)} for p in sources()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_lazy_cycle(tmp_path: Path) -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    code = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import serving.lane\n"
            "def f():\n    import routing.router\n")
    (tmp_path / "m.py").write_text(code, encoding="utf-8")
    assert imports_of(tmp_path / "m.py") == {"routing.router"}


def test_the_import_graph_has_no_cycle() -> None:
    assert cycles(graph()) == []


@pytest.mark.parametrize("side", RUNTIME)
def test_the_serving_side_imports_no_build_code(side: str) -> None:
    offenders = sorted(f"{m} -> {sorted(i)}" for m, imported in graph().items()
                       if m == side or m.startswith(f"{side}.")
                       for i in [{x for x in imported if x.startswith("models.build")}] if i)
    assert not offenders


def test_no_source_file_outgrows_one_sitting() -> None:
    long = {str(p.relative_to(ROOT)): n for p in sources()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


# what the app may not touch: the executor is its one door into serving
LANE_INTERNALS = ("serving.lane", "serving.batch", "serving.costs", "serving.load",
                  "telemetry.ledger")


def lane_reaches(path: Path) -> list[str]:
    """Where ``path`` imports lane internals or reaches through an object's ``.lane``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = [f"imports {m}" for m in imports_of(path) if m.startswith(LANE_INTERNALS)]
    found += [f"line {n.lineno}: .lane" for n in ast.walk(tree)
              if isinstance(n, ast.Attribute) and n.attr == "lane"]
    return found


def test_the_app_goes_through_the_executor_never_the_lane(tmp_path: Path) -> None:
    reaching = {str(p.relative_to(ROOT)): r for p in sorted((ROOT / "app").rglob("*.py"))
                if (r := lane_reaches(p))}
    assert not reaching, reaching
    probe = tmp_path / "probe.py"  # the rule sees both kinds of reach
    probe.write_text("import serving.lane\nx = service.executor.lane.ledger\n")
    assert len(lane_reaches(probe)) == 2
