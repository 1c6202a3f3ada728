"""The package's shape (issue 27): no import cycle between its modules, no function over 100 lines."""
import ast
from pathlib import Path

import tongue_nb

PACKAGE = Path(tongue_nb.__file__).parent


def _modules() -> dict[str, Path]:
    return {".".join(("tongue_nb",) + f.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__"): f
            for f in PACKAGE.rglob("*.py")}


def _imports(file: Path, known: set[str]) -> set[str]:
    """The package modules a file imports, function-level and TYPE_CHECKING imports included."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from tongue_nb.analysis import cv` names a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return {m for m in found if m in known and m != "tongue_nb"}


def test_no_module_imports_a_module_that_imports_it():
    modules = _modules()
    graph = {name: _imports(file, set(modules)) - {name} for name, file in modules.items()}
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_function_over_100_lines():
    long = []
    for file in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 100:
                long.append(f"{file.relative_to(PACKAGE)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
