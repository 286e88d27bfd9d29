"""The architecture holds: import-linter's contracts (pyproject.toml), no import circles between
modules, and size limits per module and per function.

The layers (DESIGN.md convention 11) are checked by import-linter over the package's import
graph, imports inside functions included; a broken contract fails with import-linter's report.
Circles are checked by a graph of our own, read from the source files with `ast`: every import
statement counts, at module level, inside functions and under `if TYPE_CHECKING:` (a circle there
still means two modules that cannot be understood one without the other).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "src" / "lora_project"
MAX_LINES = 450
MAX_FUNCTION_LINES = 120  # a function's full span: decorators, signature, docstring, body

# Modules over MAX_LINES today, each with its size when it was listed. Being split (issue 12);
# remove an entry when its module is split, never add one: split the module instead.
OVER_THE_LIMIT = {
}


def test_import_linter_contracts_are_kept():
    # A child process: import-linter prints a rich report, and the package it analyses must be
    # this checkout's src/ (not another install of lora_project on sys.path).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()",
                           str(REPO / "pyproject.toml"), "--no-cache", "--no-logo"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"import-linter contracts broken:\n{proc.stdout}\n{proc.stderr}"
    assert "0 broken" in proc.stdout and "KEPT" in proc.stdout, proc.stdout


def _line_counts() -> dict[str, int]:
    return {p.relative_to(PACKAGE).as_posix(): len(p.read_text(encoding="utf-8").splitlines())
            for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_module_is_over_the_line_limit():
    counts = _line_counts()
    over = {name: n for name, n in counts.items() if n > MAX_LINES and name not in OVER_THE_LIMIT}
    assert not over, f"modules over {MAX_LINES} lines (split them): {over}"
    grown = {name: (counts[name], was) for name, was in OVER_THE_LIMIT.items() if counts.get(name, 0) > was}
    assert not grown, f"allow-listed modules grew (lines now, when listed): {grown}"
    done = [name for name in OVER_THE_LIMIT if counts.get(name, 0) <= MAX_LINES]
    assert not done, f"now within {MAX_LINES} lines: remove {done} from OVER_THE_LIMIT in {__file__}"


def function_lengths(package_dir: Path) -> dict[str, int]:
    """"module.py:qualified.name" -> lines of each function and method (nested ones too, each on its
    own and inside its parent's span), from its first decorator to its last line."""
    lengths = {}
    for path in sorted(package_dir.rglob("*.py")):
        module = path.relative_to(package_dir).as_posix()

        def visit(node, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                name = prefix
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}{child.name}."
                    if not isinstance(child, ast.ClassDef):
                        start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                        lengths[f"{module}:{prefix}{child.name}"] = child.end_lineno - start + 1
                visit(child, name)

        visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), "")
    return lengths


def test_no_function_is_over_the_line_limit():
    lengths = function_lengths(PACKAGE)
    assert len(lengths) > 500, "the function check reads nothing: check function_lengths"
    over = {name: n for name, n in sorted(lengths.items()) if n > MAX_FUNCTION_LINES}
    assert not over, f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps): {over}"


def test_the_function_check_counts_the_full_span(tmp_path):
    pkg = tmp_path / "planted"
    pkg.mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(5))
    (pkg / "m.py").write_text(
        "import functools\n\n\n@functools.cache\n@functools.wraps(print)\ndef top():\n" + body +
        "\n\nclass K:\n    def method(self):\n        def inner():\n            pass\n        return inner\n",
        encoding="utf-8")
    assert function_lengths(pkg) == {"m.py:top": 8, "m.py:K.method": 4, "m.py:K.method.inner": 2}


def import_graph(package_dir: Path) -> dict[str, dict[str, int]]:
    """module -> {module of the same package it imports: line of the first such import}.

    Every `import` / `from ... import` statement anywhere in the file counts (module level, in
    functions, under TYPE_CHECKING). `from a.b import c` points at module a.b.c when that is a
    module of the package, else at a.b; relative imports are resolved against the importer."""
    root = package_dir.name
    files = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        files[".".join(parts[:-1] if is_package else parts)] = (path, is_package)

    def known(name: str) -> str | None:  # the longest prefix of `name` that is a module of ours
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for module, (path, is_package) in files.items():
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the importer's package, `level - 1` packages up
                    anchor = module.split(".") if is_package else module.split(".")[:-1]
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" for a in node.names]
            for name in targets:
                if name.split(".")[0] != root:
                    continue
                target = known(name)
                if target and target != module:
                    edges.setdefault(target, node.lineno)
        graph[module] = edges
    return graph


def import_circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The graph's circles: each strongly connected group of two or more modules, sorted (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(groups)


def _describe(graph: dict[str, dict[str, int]], group: list[str]) -> str:
    inside = set(group)
    return "; ".join(f"{a} -> {b} (line {line})" for a in group for b, line in sorted(graph[a].items()) if b in inside)


def test_no_import_circles_between_modules():
    graph = import_graph(PACKAGE)
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100, "the import graph reads nothing: check import_graph"
    circles = import_circles(graph)
    assert not circles, "import circles (move the shared part into a module below both):\n" + "\n".join(
        _describe(graph, g) for g in circles)


def test_the_circle_check_sees_every_kind_of_import(tmp_path):
    # A package with one circle per kind of import the check must see, and modules without any.
    pkg = tmp_path / "planted"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "sub/__init__.py": "",
        # top level <-> TYPE_CHECKING only
        "a.py": "from planted.b import thing\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from planted.a import x\nthing = 1\n",
        # inside a function (nested in a class method) <-> top level, `import x.y` form
        "c.py": "import planted.d\n",
        "d.py": "class K:\n    def f(self):\n        def g():\n            from planted import c\n        return g\n",
        # relative imports, `from . import name` and `from ..x import y`
        "sub/e.py": "from . import f\n",
        "sub/f.py": "def h():\n    from ..sub.e import y\n",
        # no circle: one direction only, and a name imported from a module (not a module)
        "g.py": "from planted.a import thing\nimport os\n",
        "h.py": "from planted.g import thing\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text, encoding="utf-8")
    graph = import_graph(pkg)
    assert graph["planted.g"] == {"planted.a": 1}
    assert graph["planted.sub.f"] == {"planted.sub.e": 2}
    assert import_circles(graph) == [["planted.a", "planted.b"], ["planted.c", "planted.d"],
                                     ["planted.sub.e", "planted.sub.f"]]
    assert "planted.b -> planted.a (line 3)" in _describe(graph, ["planted.a", "planted.b"])
    # Breaking the circles (the TYPE_CHECKING import moved away) leaves that group out.
    (pkg / "b.py").write_text("thing = 1\n", encoding="utf-8")
    assert ["planted.a", "planted.b"] not in import_circles(import_graph(pkg))


def test_the_training_recipe_is_short_and_takes_one_options_object():
    # Issue 32: `train_adapter` reads as its steps; how a run is carried out is one RunOptions.
    tree = ast.parse((PACKAGE / "training" / "single.py").read_text(encoding="utf-8"))
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train_adapter")
    args = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
    assert fn.end_lineno - fn.lineno + 1 <= 70 and len(args) <= 6 and not fn.args.kwarg and not fn.args.vararg
    assert "options" in [a.arg for a in args]
    options = ast.parse((PACKAGE / "training" / "options.py").read_text(encoding="utf-8"))
    cls = next(n for n in options.body if isinstance(n, ast.ClassDef) and n.name == "RunOptions")
    undocumented = [item.target.id for item, after in zip(cls.body, cls.body[1:] + [None])
                    if isinstance(item, ast.AnnAssign) and not (isinstance(after, ast.Expr)
                                                                and isinstance(after.value, ast.Constant))]
    assert not undocumented, f"RunOptions fields without a docstring: {undocumented}"


def test_figures_are_saved_by_one_function(tmp_path):
    # Issue 32: utils/plotting.save_figure is the one place a figure is written and closed.
    callers = sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
                     if ".savefig(" in p.read_text(encoding="utf-8"))
    assert callers == ["utils/plotting.py"], f"save figures with utils.plotting.save_figure: {callers}"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lora_project.utils.plotting import save_figure

    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [1, 0])
    out = save_figure(fig, tmp_path / "new" / "folder" / "f.png", dpi=50)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and fig.number not in plt.get_fignums()
