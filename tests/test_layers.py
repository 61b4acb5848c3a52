"""The package's import graph: no circles, no imports hidden inside functions, and no module
importing from a layer above its own (contract <- models <- data <- module <- pipeline)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fcn_lightning"
# the first part of a module's name after "fcn_lightning." -> its layer
LAYERS = {
    "contract": 0, "normalization": 0, "atomic": 0, "checkpoints": 0, "console": 0,
    "models": 1,
    "data": 2,
    "metrics": 3, "optim": 3, "module": 3, "board": 3, "callbacks": 3,
    "rundir": 4, "stages": 4, "checks": 4, "evaluation": 4, "pipeline": 4, "prediction": 4, "sweeps": 4, "hydra_callbacks": 4,
    "prepare": 4, "export": 4,
    "bench": 5,
}  # fmt: skip


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> tuple[set[str], list[str]]:
    """The project modules ``name`` imports, and the imports written inside functions."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    deps, local = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - max(node.level - 1, 0)]
            target = (
                ".".join([*base, node.module] if node.module else base)
                if node.level
                else node.module
            )
            candidates = [target, *(f"{target}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        deps |= {c for c in candidates if c in known and c not in (name, "fcn_lightning")}
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            local += [
                ast.unparse(n) for n in ast.walk(fn) if isinstance(n, ast.Import | ast.ImportFrom)
            ]
    return deps, local


def graph() -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    mods = modules()
    edges, local = {}, {}
    for name, path in mods.items():
        edges[name], local[name] = imports(name, path, set(mods))
    return edges, local


def layer(name: str) -> int:
    return LAYERS[name.split(".")[1]] if "." in name else 0


def test_every_module_has_a_layer():
    assert {n.split(".")[1] for n in modules() if "." in n} <= set(LAYERS)


def test_no_import_circles():
    edges, _ = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_no_module_imports_from_a_layer_above():
    edges, _ = graph()
    upward = [(m, d) for m, deps in edges.items() for d in deps if layer(d) > layer(m)]
    assert not upward, upward


def test_no_imports_hidden_in_functions():
    _, local = graph()
    hidden = {
        m: lines
        for m, lines in local.items()
        if any("fcn_lightning" in line or line.startswith("from .") for line in lines)
    }
    assert not hidden, hidden
