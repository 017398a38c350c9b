"""The shape of the code base, checked like its behaviour: layers, import cycles, function sizes, style."""

import ast
import subprocess
import sys

import pytest

from conftest import ROOT

SRC = ROOT / "src" / "pneumo"
# The plumbing every stage stands on; it never imports a stage.
PLUMBING = {"errors", "labels", "fileio", "logs", "progress", "device", "distributed", "config", "process"}
MAX_LINES, MAX_PARAMETERS = 60, 8


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


def test_plumbing_never_imports_a_stage():
    trees = modules()
    for short in PLUMBING:
        name = f"pneumo.{short}"
        above = {m.removeprefix("pneumo.") for m in imports(name, trees[name], set(trees))} - PLUMBING - {""}
        assert not above - {"pneumo"}, f"{name} imports {sorted(above)}"


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
