"""The shape of the code base, checked like its behaviour: layers, import cycles, function sizes, style."""

import ast
import subprocess
import sys

import pytest

from conftest import ROOT

SRC = ROOT / "src" / "pneumo"
# The architecture, lowest layer first: a subpackage imports from itself and from lower layers only, so
# plumbing (core) never imports a stage and stages of one layer never import each other.
LAYERS = [{"core"}, {"data", "cpu"}, {"model"}, {"reference"}, {"evaluate"}, {"train", "score"}, {"site"}, {"cli"}]
MAX_LINES, MAX_PARAMETERS = 60, 8
MAX_TOP_LEVEL_MODULES, MAX_MODULE_DOCSTRING = 8, 1200


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The pneumo modules `name` imports anywhere, inside functions too."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pneumo"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in known else node.module)
    return out - {name}


def test_no_import_cycles():
    trees = modules()
    graph = {name: imports(name, tree, set(trees)) for name, tree in trees.items()}
    # __main__ runs the CLI; a package's __init__ importing its own submodules is how packages work.
    graph = {k: {v for v in vs if not v.startswith(k + ".")} for k, vs in graph.items()}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def layer(name: str) -> int:
    """The layer of module `pneumo.X...` (the package root's __init__ and __main__ stand outside)."""
    part = name.split(".")[1]
    return next(i for i, packages in enumerate(LAYERS) if part in packages)


def test_each_layer_imports_only_the_layers_below_it():
    trees = modules()
    wrong = []
    for name, tree in trees.items():
        if name in ("pneumo", "pneumo.__main__"):
            continue
        for target in imports(name, tree, set(trees)) - {"pneumo"}:
            same_package = target.split(".")[1] == name.split(".")[1]
            if not same_package and layer(target) >= layer(name):
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong


def test_the_top_level_shows_the_architecture():
    top = sorted(p.name for p in SRC.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    packages = {p.parent.name for p in SRC.glob("*/__init__.py")}
    assert packages == set().union(*LAYERS) - {"cli"}, "every subpackage has its place in LAYERS"
    long = {n: len(ast.get_docstring(t) or "") for n, t in modules().items()}
    assert all(size <= MAX_MODULE_DOCSTRING for size in long.values()), {n: s for n, s in long.items() if s > 1200}


def test_the_network_reads_as_its_math():
    """SmallCNN.logit is each block as written, relu(pool(bn(conv(x)))), with one call that lets the CPU
    kernels run a block; no kernel's name appears in it."""
    tree = modules()["pneumo.model.network"]
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SmallCNN")
    logit = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "logit")
    source = ast.get_source_segment((SRC / "model" / "network.py").read_text(), logit)
    assert logit.end_lineno - logit.lineno + 1 <= 15
    assert "relu(pool(bn(conv(x))))" in source
    assert not any(word in source for word in ("fused", "winograd", "stem", "covers", "numba"))


def test_functions_a_reader_can_hold_in_view():
    too_long, too_many = [], []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                a = node.args
                names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
                params = len([n for n in names if n not in ("self", "cls")])
                if lines > MAX_LINES:
                    too_long.append(f"{name}.{node.name}: {lines} lines")
                if params > MAX_PARAMETERS:
                    too_many.append(f"{name}.{node.name}: {params} parameters")
    assert not too_long and not too_many, too_long + too_many


def test_ruff_lint_and_format_are_clean():
    # ruff comes with the test extra, so the README's test command (and CI) runs it.
    ruff = [sys.executable, "-m", "ruff"]
    lint = subprocess.run([*ruff, "check", "--no-cache", str(ROOT)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout[-3000:]
    fmt = subprocess.run([*ruff, "format", "--check", "--no-cache", str(ROOT)], capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout[-3000:]
