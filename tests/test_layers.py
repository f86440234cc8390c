"""Dependencies inside llava_ft run one way, and nothing imports in a circle (package or benchmarks).

Every import statement (at module level or inside a function: a deferred import is still a dependency)
is read with `ast`, without importing anything. The layers, lowest first:

    0  llava_ft (constants), errors, versions, fileio, utf8, config, trainer_args, templates, checkpoint
    1  model, data                                                                      built from a config
    2  engine, inference, convert, datatools                                            use models and data
    3  serve, demo, testing                                  put those together (testing builds on the demo)
    4  commands, cli, __main__                                                          what users type

A module may import from its own layer or a lower one; the packages of one layer may use each other as
long as that makes no cycle. A new top-level module or package must be given a layer here.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "llava_ft"
LAYERS = [
    {"", "errors", "versions", "fileio", "utf8", "config", "trainer_args", "templates", "checkpoint"},
    {"model", "data"},
    {"engine", "inference", "convert", "datatools"},
    {"serve", "demo", "testing"},
    {"commands", "cli", "__main__"},
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def _modules() -> dict[str, Path]:
    """Dotted name -> file for every module of the package (serve/ is inside it through llava_ft/serve)."""
    out = {}
    for folder, dirs, files in os.walk(PACKAGE, followlinks=True):
        dirs[:] = [d for d in dirs if d not in ("recipes", "static", "__pycache__")]
        for name in files:
            if name.endswith(".py"):
                rel = (Path(folder) / name).relative_to(PACKAGE.parent).with_suffix("")
                parts = list(rel.parts)
                if parts[-1] == "__init__":
                    parts.pop()
                out[".".join(parts)] = Path(folder) / name
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool, known: set) -> set[str]:
    """Modules of the package that `module` imports (resolving relative imports and `from pkg import mod`)."""
    found: set[str] = set()

    def visit(node):
        if isinstance(node, ast.If) and _is_type_checking(node):
            return  # annotations only: not a runtime dependency
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "llava_ft")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] == "llava_ft":
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if sub in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _graph() -> dict[str, set[str]]:
    files = _modules()
    known = set(files)
    return {m: _imports(ast.parse(p.read_text(encoding="utf-8")), m, p.name == "__init__.py", known) - {m}
            for m, p in files.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan), each a cycle of imports."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_every_package_has_a_layer():
    units = {_unit(m) for m in _modules()}
    assert units - set(RANK) == set(), "give these a layer in tests/test_layers.py"


def test_imports_go_to_the_same_or_a_lower_layer():
    wrong = []
    for module, targets in sorted(_graph().items()):
        for target in sorted(targets):
            src, dst = _unit(module), _unit(target)
            if src in RANK and dst in RANK and RANK[dst] > RANK[src]:
                wrong.append(f"{module} (layer {RANK[src]}) imports {target} (layer {RANK[dst]})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_between_packages_or_modules():
    graph = _graph()
    units: dict[str, set[str]] = {}
    for module, targets in graph.items():
        units.setdefault(_unit(module), set()).update(_unit(t) for t in targets if _unit(t) != _unit(module))
    assert _cycles(units) == []
    assert _cycles(graph) == []


def test_no_import_cycle_between_benchmarks():
    scripts = {p.stem: p for p in (REPO / "benchmarks").glob("*.py")}
    graph = {}
    for name, path in scripts.items():
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module in scripts and not node.level:
                graph[name].add(node.module)
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in scripts)
    assert _cycles(graph) == []


@pytest.mark.parametrize("graph,expected", [({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]),
                                            ({"a": {"b"}, "b": {"c"}, "c": set()}, [])])
def test_the_cycle_finder_finds_cycles(graph, expected):
    assert _cycles(graph) == expected
