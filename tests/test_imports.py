"""The package's imports run one way: no module of rgemma_cli/ imports, directly or through
others, a module that imports it, counting imports inside functions too (a lazy import hides a
cycle from Python, not from the next reader)."""

import ast
from pathlib import Path

import rgemma_cli

PACKAGE = Path(rgemma_cli.__file__).resolve().parent


def _module_name(root: Path, path: Path) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the modules of the package at `root` it imports anywhere in its source (read
    with ast, not run)."""
    files = {_module_name(root, p): p for p in root.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import sub` imports the submodule; `from mod import name` the module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                           for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in files and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert "rgemma_cli.formats" in graph and "rgemma_cli.kernels.matvec" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_check_sees_a_cycle_through_an_in_function_import(tmp_path):
    # what quantize.py and checkpoint.py did before: each imported the other inside a function
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "checkpoint.py").write_text("def load():\n    from .quantize import wrap\n")
    (pkg / "quantize.py").write_text("import numpy\nfrom .sub import kern\n\n"
                                     "def run():\n    from . import checkpoint\n")
    (pkg / "sub" / "kern.py").write_text("from ..errors import E\n")
    (pkg / "errors.py").write_text("")
    graph = import_graph(pkg)
    assert graph["pkg.quantize"] == {"pkg.sub.kern", "pkg.checkpoint"}
    assert graph["pkg.sub.kern"] == {"pkg.errors"}
    assert find_cycle(graph) == ["pkg.checkpoint", "pkg.quantize", "pkg.checkpoint"]
    (pkg / "checkpoint.py").write_text("")
    assert find_cycle(import_graph(pkg)) is None


def test_layers_run_downwards():
    """The kernels import nothing of the package but each other; the weight formats, the
    quantizer and the checkpoint reader never reach the CLI, the chat UI or generation."""
    graph = import_graph()
    for name, edges in graph.items():
        if name.startswith("rgemma_cli.kernels"):
            assert all(e.startswith("rgemma_cli.kernels") for e in edges), (name, edges)

    def reach(n, seen=None):
        seen = set() if seen is None else seen
        for m in graph[n]:
            if m not in seen:
                seen.add(m)
                reach(m, seen)
        return seen

    for low in ("rgemma_cli.formats", "rgemma_cli.quantize", "rgemma_cli.checkpoint",
                "rgemma_cli.model", "rgemma_cli.linear"):
        assert not reach(low) & {"rgemma_cli.cli", "rgemma_cli.chat", "rgemma_cli.generation"}, low
