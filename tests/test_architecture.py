"""The import graph of the three packages, read with ast (function-local imports included): arrows point one way.

spectral/ imports neither lipschitz nor experiments; lipschitz/ does not import experiments; inside
experiments/ nothing imports the CLI (``experiments.cli`` sits on top) and no modules import each other in a circle. Run as a script to print the graph's
violations and its import cycles: ``python tests/test_architecture.py``.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("experiments", "lipschitz", "spectral")
#: Packages a package may not import (the arrows point experiments -> lipschitz -> spectral).
FORBIDDEN = {"spectral": ("lipschitz", "experiments"), "lipschitz": ("experiments",), "experiments": ()}
CLI = "experiments.cli"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at module level or inside functions (``from a import b``: a and a.b)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (annotations only; never imported at run time)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def graph() -> dict[str, set[str]]:
    """module -> the project modules it imports."""
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    modules = {module_name(p): p for p in files}
    return {name: {m for m in imports_of(path) if m in modules} for name, path in modules.items()}


def violations(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for source, targets in sorted(edges.items()):
        top = source.split(".")[0]
        for target in sorted(targets):
            if (target == CLI or target.startswith(CLI + ".")) and source != CLI:
                bad.append(f"{source} imports the CLI ({target})")
            if target.split(".")[0] in FORBIDDEN[top]:
                bad.append(f"{source} imports {target} (upward: {top} may not import {target.split('.')[0]})")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_checker_sees_function_local_and_relative_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "lipschitz"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from experiments.cli import main\n    from . import b\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert imports_of(pkg / "a.py") >= {"experiments.cli", "experiments.cli.main", "lipschitz", "lipschitz.b"}
    edges = {"lipschitz.a": {"experiments.cli"}, "experiments.cli": set()}
    assert violations(edges) == ["lipschitz.a imports the CLI (experiments.cli)",
                                 "lipschitz.a imports experiments.cli (upward: lipschitz may not import experiments)"]
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_no_module_imports_the_cli_and_no_arrow_points_up():
    assert violations(graph()) == []


def test_no_import_cycle_in_any_package():
    """No circle anywhere in spectral/, lipschitz/ and experiments/ (function-local imports included)."""
    assert cycles(graph()) == []


#: Functions allowed over ``MAX_FUNCTION_LINES`` (the argparse table of every subcommand reads best in one place).
LONG_FUNCTIONS_ALLOWED = {"experiments.cli.build_parser"}
MAX_FUNCTION_LINES = 80


def long_functions(root: Path = ROOT) -> list[str]:
    """``module.function (N lines)`` for every function or method over ``MAX_FUNCTION_LINES`` lines (docstring
    included) in the three packages, except ``LONG_FUNCTIONS_ALLOWED``."""
    out = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    name, lines = f"{module_name(path)}.{node.name}", node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES and name not in LONG_FUNCTIONS_ALLOWED:
                        out.append(f"{name} ({lines} lines)")
    return out


def test_no_function_is_longer_than_a_screen():
    assert long_functions() == []


def test_the_length_check_sees_a_long_function(tmp_path, monkeypatch):
    pkg = tmp_path / "spectral"
    pkg.mkdir()
    (pkg / "m.py").write_text("def f():\n" + "    x = 1\n" * 90)
    for other in ("lipschitz", "experiments"):
        (tmp_path / other).mkdir()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert long_functions(tmp_path) == ["spectral.m.f (91 lines)"]


if __name__ == "__main__":  # pragma: no cover
    g = graph()
    print(f"{len(g)} modules, {sum(map(len, g.values()))} import edges")
    print("violations:", violations(g) or "none")
    print("cycles:", cycles(g) or "none")
    print(f"functions over {MAX_FUNCTION_LINES} lines:", long_functions() or "none")
