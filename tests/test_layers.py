"""The package's import graph: no circles, no imports hidden inside functions, and no module
importing from a layer above its own (contract <- models <- data <- module <- pipeline)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fcn_lightning"
# a module's name after "fcn_lightning." (its first one or two parts) -> its layer. The library
# (layers 0-5) has no Hydra import; compare reads finished runs' files (reports' forms, no
# model); prepare/ stands on data/; app/ is the Hydra side.
LAYERS = {
    "errors": 0,
    "atomic": 1, "contract": 1, "normalization": 1,
    "reports": 2, "checkpoints": 2,
    "models": 3,
    "data": 4,
    "metrics": 5, "optim": 5, "module": 5, "compare": 5,
    "prepare": 6,
    "app": 7,
    "bench": 8,
}  # fmt: skip
# the commands that start from a checkpoint, and the training run they never import
COMMANDS = ("app.evaluate", "app.predict", "app.export", "app.common")
TRAINING = ("app.train", "app.stages", "app.checks", "app.sweeps",
            "app.rundir", "app.board", "app.callbacks", "app.loggers")  # fmt: skip


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


def short(name: str) -> str:
    return name.removeprefix("fcn_lightning.")


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


def closure(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in edges[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_commands_do_not_import_the_training_run():
    edges, _ = graph()
    reached = {
        c: sorted(short(m) for m in closure(edges, f"fcn_lightning.{c}") if short(m) in TRAINING)
        for c in COMMANDS
    }
    assert reached == {c: [] for c in COMMANDS}


def test_no_hydra_below_the_app():
    found = []
    for name, path in modules().items():
        if layer(name) >= LAYERS["app"]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            found += [(short(name), n) for n in names if n.split(".")[0] == "hydra"]
    assert not found, found


def test_data_does_not_import_prepare():
    edges, _ = graph()
    found = [(m, d) for m, deps in edges.items() for d in deps
             if short(m).startswith("data") and short(d).startswith("prepare")]  # fmt: skip
    assert not found, found
