"""The import graph of probflow's modules (relative imports, including deferred ones inside
functions) has no circle: a module never imports, directly or through others, itself."""

import ast
import pathlib

import probflow

ROOT = pathlib.Path(probflow.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the probflow modules it imports (relative or absolute `probflow.` imports)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                # `from . import _x` imports the submodule; `from .m import name` the module m.
                targets = [
                    f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names
                ]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t in modules and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle in `graph` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (c := visit(v)) is not None:
                return c
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state and (c := visit(u)) is not None:
            return c
    return None


def test_find_cycle_finds_circles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_the_known_edges():
    g = import_graph()
    assert "probflow._sde" in g["probflow._flow"]
    assert "probflow._flow" in g["probflow._likelihood"]
    assert "probflow._time" in g["probflow._dpm"]
    assert len(g) > 30


def test_no_import_circle():
    # The package's __init__ re-exports everything, so it is left out (nothing imports it
    # from inside except through `probflow.X` module paths, which name the module itself).
    g = {k: v - {"probflow"} for k, v in import_graph().items() if k != "probflow"}
    assert find_cycle(g) is None, " -> ".join(find_cycle(g))
