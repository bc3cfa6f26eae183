"""The import graph of src/dlfer has no cycle (imports inside functions count too)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dlfer"


def imported_dlfer_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dlfer":
            if node.module == "dlfer":
                names |= {alias.name for alias in node.names}
            else:
                names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("dlfer.")}
    return names


def test_no_module_imports_itself_through_others():
    graph = {path.stem: imported_dlfer_modules(path) - {path.stem} for path in PACKAGE.glob("*.py")}
    graph = {module: {name for name in imports if name in graph} for module, imports in graph.items()}
    cycles = []

    def visit(module, trail):
        for name in sorted(graph[module]):
            if name in trail:
                cycles.append(" -> ".join([*trail[trail.index(name):], name]))
            elif name not in done:
                visit(name, [*trail, name])
        done.add(module)

    done: set[str] = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert not cycles, f"import cycles: {sorted(set(cycles))}"
