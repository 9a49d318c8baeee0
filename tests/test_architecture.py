"""The import graph of probflow's modules (relative imports, including deferred ones inside
functions) follows the layers that docs/architecture.md documents (read from its table): every
module sits in one layer and imports only from its own layer or the ones below; and it has no
circle: a module never imports, directly or through others, itself."""

import ast
import fnmatch
import pathlib
import re

import probflow

ROOT = pathlib.Path(probflow.__file__).parent
DOC = ROOT.parent / "docs" / "architecture.md"


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


def documented_layers() -> list[tuple[str, list[str]]]:
    """The layers of docs/architecture.md's table, top first: (name, module patterns)."""
    text = DOC.read_text().split("## Layers", 1)[1].split("\n## ", 1)[0]
    layers = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and "`" in cells[1]:
            layers.append((cells[0], re.findall(r"`([^`]+)`", cells[1])))
    return layers


def layer_of(module: str, layers) -> int | None:
    """The index (0: top) of the layer that names `module` exactly, else of the first layer with
    a matching pattern (`data.*`), else None."""
    short = module if module == "probflow" else module.removeprefix("probflow.")
    for i, (_, patterns) in enumerate(layers):
        if short in patterns:
            return i
    for i, (_, patterns) in enumerate(layers):
        if any("*" in p and fnmatch.fnmatch(short, p) for p in patterns):
            return i
    return None


def test_layer_table_is_read():
    layers = documented_layers()
    names = [n for n, _ in layers]
    assert names[0] == "command line" and names[-1] == "ground floor" and len(layers) >= 8
    assert layer_of("probflow.data._dataset", layers) == len(layers) - 1
    assert layer_of("probflow.data._digits", layers) == names.index("models and data")
    assert layer_of("probflow._cli._flow", layers) == 0


def test_imports_follow_the_documented_layers():
    layers = documented_layers()
    graph = import_graph()
    unplaced = sorted(m for m in graph if layer_of(m, layers) is None)
    assert not unplaced, f"modules missing from docs/architecture.md's layer table: {unplaced}"
    upward = []
    for module, deps in graph.items():
        here = layer_of(module, layers)
        for dep in deps:
            there = layer_of(dep, layers)
            assert here is not None and there is not None
            if there < here:
                upward.append(f"{module} ({layers[here][0]}) imports {dep} ({layers[there][0]})")
    assert not upward, "imports going up a layer:\n" + "\n".join(sorted(upward))
