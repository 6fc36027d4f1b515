"""The floor plan of gpu/: three wings and the parallel split, their allowed imports, no circles.

Every `import gpu...` counts, wherever it stands (inside functions too): the model (`gpu.vap`)
imports nothing of the others, `gpu.parallel` only the model, the tools anything, and the service
of the tools only what it serves from (the memory plan's table and the time estimate).
"""

from __future__ import annotations

import ast
from pathlib import Path

GPU = Path(__file__).resolve().parents[2] / "gpu"

# wing -> the wings (or single tool modules) it may import
ALLOWED = {
    "vap": {"vap"},
    "parallel": {"parallel", "vap"},
    "service": {"service", "parallel", "vap", "tools.plan_table", "tools.scaling"},
    "tools": {"tools", "service", "parallel", "vap"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in GPU.rglob("*.py"):
        parts = path.relative_to(GPU.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The gpu modules `path` imports (a `from package import module` names the module)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "gpu"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gpu":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in modules else node.module)
    return {m for m in out if m in modules and m.count(".") >= 1}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) for name, path in modules.items()}


def _wing(module: str) -> str:
    return module.split(".")[1]


def test_each_wing_imports_only_what_the_plan_allows():
    broken = []
    for module, imported in _graph().items():
        if module == "gpu":
            continue
        allowed = ALLOWED[_wing(module)]
        for other in imported:
            rest = other.split(".", 1)[1]
            if _wing(other) not in allowed and not any(
                rest == a or rest.startswith(a + ".") for a in allowed
            ):
                broken.append(f"{module} -> {other}")
    assert broken == []


def test_no_module_of_gpu_is_in_an_import_circle():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph[node]:
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert circles == []
    assert "gpu.vap.transformer" in graph and "gpu.parallel.sequence" in graph  # the scan saw them
