"""The package's layout, read from the source (nothing is imported): no import cycles between its
modules, and no library module importing `animatediff_jax.testing` (what tests and benchmarks build).

The import graph has an edge for every `import x` / `from x import y` of an `animatediff_jax` module,
those inside functions included (a lazy import that only hides a cycle is still one); `from pkg import
name` points at the submodule `pkg.name` when there is one, else at `pkg`.
"""

from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "animatediff_jax")
PACKAGE = "animatediff_jax"
TESTING = f"{PACKAGE}.testing"


def module_files(root: str = ROOT, package: str = PACKAGE) -> dict[str, str]:
    """`{dotted module name: path}` of every .py file under `root` (a package's `__init__.py` is the package)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        rel = os.path.relpath(folder, root)
        prefix = package if rel == "." else f"{package}.{rel.replace(os.sep, '.')}"
        for f in sorted(files):
            if f.endswith(".py"):
                out[prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"] = os.path.join(folder, f)
    return out


def imported_modules(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of `known` that the source `tree` of `module` imports, anywhere in it."""
    found = set()

    def nearest(name: str) -> str | None:  # `a.b.c` -> the longest known module among a.b.c, a.b, a
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [nearest(a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package, up `level - 1` more
                parts = module.split(".") if is_package else module.split(".")[:-1]
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else nearest(base) for a in node.names]
        else:
            continue
        found.update(t for t in targets if t is not None and t != module)
    return found


def parse_package(root: str = ROOT, package: str = PACKAGE) -> dict[str, tuple[str, ast.AST]]:
    """`{module: (path, its syntax tree)}` of every module under `root`, read once."""
    out = {}
    for name, path in module_files(root, package).items():
        with open(path, encoding="utf-8") as f:
            out[name] = (path, ast.parse(f.read(), path))
    return out


def import_graph(root: str = ROOT, package: str = PACKAGE, parsed: dict | None = None) -> dict[str, set[str]]:
    """`{module: the package's modules it imports}` from the source under `root` (or `parsed`)."""
    parsed = parse_package(root, package) if parsed is None else parsed
    known = set(parsed)
    return {name: imported_modules(tree, name, path.endswith("__init__.py"), known)
            for name, (path, tree) in parsed.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of `graph` (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        work.append((v, iter(sorted(graph.get(v, ())))))

    for root in sorted(graph):
        if root in index:
            continue
        work: list = []
        visit(root)
        while work:
            node, edges = work[-1]
            for w in edges:
                if w not in index:
                    visit(w)
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    components.append(sorted(comp))
    return components


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (`[a, b, ..., a]`, the shortest through the component's first module) per strongly
    connected component of `graph` that has one, sorted."""
    cycles = []
    for comp in strongly_connected(graph):
        members, start = set(comp), comp[0]
        if len(comp) == 1 and start not in graph.get(start, ()):
            continue
        parent: dict[str, str] = {}  # breadth first from `start` back to it, inside the component
        frontier, last = [start], None
        while last is None:
            nxt = []
            for u in frontier:
                if start in graph.get(u, ()):
                    last = u
                    break
                for w in sorted(graph.get(u, ())):
                    if w in members and w not in parent:
                        parent[w] = u
                        nxt.append(w)
            frontier = nxt
        path = [last]
        while path[-1] != start:
            path.append(parent[path[-1]])
        cycles.append(path[::-1] + [start])
    return sorted(cycles)


def uses_of(target: str, parsed: dict, graph: dict[str, set[str]]) -> list[str]:
    """Where a module outside package `target` imports it (or one of its modules), or names one in a
    string (what `importlib.import_module` is given)."""
    dotted = re.compile(rf"{re.escape(target)}(\.\w+)*")
    inside = lambda m: m == target or m.startswith(target + ".")  # noqa: E731
    bad = []
    for name, (_, tree) in sorted(parsed.items()):
        if inside(name):
            continue
        bad += [f"{name} imports {t}" for t in sorted(graph[name]) if inside(t)]
        bad += [f"{name} names {node.value!r} (a module to import)" for node in ast.walk(tree)
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and dotted.fullmatch(node.value)]
    return bad


def _show(cycle: list[str]) -> str:
    return " -> ".join(cycle)


# ------------------------------------------------------------------ the graph functions themselves


def test_find_cycles_finds_a_cycle_in_a_synthetic_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["e", "e"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) == []
    # Two cycles through one module are one component: one of them is reported.
    cycles = find_cycles({"x": {"y", "z"}, "y": {"x"}, "z": {"x"}})
    assert cycles == [["x", "y", "x"]]


def test_import_graph_reads_every_kind_of_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.leaf import VALUE\n")
    (pkg / "sub" / "leaf.py").write_text("VALUE = 1\n\ndef late():\n    from pkg import top\n")
    (pkg / "sub" / "other.py").write_text("from . import leaf\nfrom .. import top\nimport os\n")
    (pkg / "top.py").write_text("import pkg.sub.other\nfrom pkg.sub import VALUE\n")
    graph = import_graph(str(pkg), "pkg")
    assert graph == {
        "pkg": set(),
        "pkg.sub": {"pkg.sub.leaf"},
        "pkg.sub.leaf": {"pkg.top"},  # an import inside a function counts
        "pkg.sub.other": {"pkg.sub.leaf", "pkg.top"},  # relative imports resolved to the submodules
        "pkg.top": {"pkg.sub.other", "pkg.sub"},  # `from pkg.sub import VALUE`: a name, so the package
    }
    assert find_cycles(graph) == [["pkg.sub", "pkg.sub.leaf", "pkg.top", "pkg.sub"]]


def test_uses_of_finds_imports_and_module_names(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "testing").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "testing" / "__init__.py").write_text("")
    (pkg / "testing" / "tiny.py").write_text("from pkg import clean\n")
    (pkg / "clean.py").write_text("import os\nDOC = 'see pkg.testing.tiny for more'\n")
    (pkg / "lazy.py").write_text("def f():\n    from pkg import testing\n")
    (pkg / "table.py").write_text("COMMANDS = {'x': 'pkg.testing.tiny'}\n")
    parsed = parse_package(str(pkg), "pkg")
    assert uses_of("pkg.testing", parsed, import_graph(parsed=parsed)) == [
        "pkg.lazy imports pkg.testing", "pkg.table names 'pkg.testing.tiny' (a module to import)"]


# ------------------------------------------------------------------ the package


@pytest.fixture(scope="module")
def parsed():
    return parse_package()


@pytest.fixture(scope="module")
def graph(parsed):
    return import_graph(parsed=parsed)


def test_no_import_cycles(graph):
    cycles = find_cycles(graph)
    tangled = [c for c in strongly_connected(graph) if len(c) > 1]
    assert not cycles, (
        "import cycles (each module imports the next, the last the first):\n" + "\n".join(_show(c) for c in cycles)
        + "\nmodules that import each other (all cycles run through these):\n"
        + "\n".join(", ".join(c) for c in tangled))


def test_the_library_never_imports_testing(parsed, graph):
    """`animatediff_jax.testing` is what tests and benchmarks build; no other module imports it, nor
    names it for `importlib` (the command table)."""
    bad = uses_of(TESTING, parsed, graph)
    assert not bad, "\n".join(bad)
