"""The backend's layers: no import circle in medil_backend, counting the imports inside functions (a task never
imports its operation, the batch never imports the command line)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "medil_backend"


def modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its code (top level or inside a function)."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - (node.level - 1)] if node.level else []
                module = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
                targets = [module] + [f"{module}.{a.name}" for a in node.names]
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_is_what_the_test_reads():
    graph = import_graph()
    assert "medil_backend.ops.superres" in graph["medil_backend.ops.runners"]  # an import inside a function counts
    assert "medil_backend.task" in graph["medil_backend.ops.runners"]


def test_no_import_circle_in_the_backend():
    assert circles(import_graph()) == []


def test_inference_never_imports_training_or_a_frontend():
    graph = import_graph()
    for name, targets in graph.items():
        if name.startswith(("medil_backend.ops", "medil_backend.nn", "medil_backend.task", "medil_backend.io")):
            assert not {t for t in targets if t.startswith(("medil_backend.training", "medil_backend.cli"))}, name


#: where LightningCLI reads the recipe's keys from the signature: their parameters are the recipe's, by design
LIGHTNING_SIGNATURES = {("medil_backend/training/lit.py", "__init__"), ("medil_backend/training/latents.py", "__init__")}


def long_functions(max_lines: int = 120, max_params: int = 12) -> list[tuple[str, str, int, int]]:
    """(file, function, lines, parameters) of every function in the package over either limit (self/cls not counted)."""
    out = []
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(REPO))
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            a = node.args
            params = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
            params -= bool(a.args and a.args[0].arg in ("self", "cls"))
            lines = node.end_lineno - node.lineno + 1
            if (lines > max_lines or params > max_params) and (rel, node.name) not in LIGHTNING_SIGNATURES:
                out.append((rel, node.name, lines, params))
    return out


def test_no_function_is_a_switchboard():
    """No function of more than 120 lines or more than 12 parameters: options travel as dataclasses, methods as strategies."""
    assert long_functions() == []
    assert long_functions(max_lines=10, max_params=3)  # the measure sees functions at all


#: the layers of docs/architecture.md, lowest first: a module imports its own layer and the ones below, never above
LAYERS = [
    ("foundations", ["errors", "limits", "methods", "geometry", "headers", "files", "intensity", "metrics", "medil_backend"]),
    ("data and networks", ["io", "acquisition", "nn", "preview"]),
    ("models", ["models"]),
    (
        "operations",
        [
            "ops.runtime",
            "ops.memory",
            "ops.tiling",
            "ops.interpolate",
            "ops.reconstruct",
            "ops.fixed_grid",
            "ops.adapt",
            "ops.sample",
            "ops.superres_methods",
            "ops.superres",
            "ops.multistack",
            "ops",
            "baselines",
        ],
    ),  # fmt: skip
    ("task contract", ["task"]),
    ("runners", ["ops.runners"]),
    ("files to files, front-end helpers", ["task_files", "frontend"]),
    (
        "batch, evaluation, training",
        ["batch", "evaluate", "evaluate_multistack", "evaluate_generative", "realism", "simulate_stacks", "training"],
    ),
    ("command line", ["cli", "__main__"]),
]


def layer_of(module: str) -> int:
    """The layer of a module: the longest listed name it is or lies under."""
    name = module.removeprefix("medil_backend.") if module != "medil_backend" else module
    best = max(((len(n), i) for i, (_, names) in enumerate(LAYERS) for n in names if name == n or name.startswith(n + ".")), default=None)
    assert best is not None, f"{module} is in no layer of docs/architecture.md"
    return best[1]


def test_every_import_goes_down_the_layers_of_the_architecture_document():
    upward = [(m, t) for m, targets in import_graph().items() for t in targets if layer_of(t) > layer_of(m)]
    assert upward == []
    doc = (REPO / "docs" / "architecture.md").read_text()
    for name, modules in LAYERS:
        assert name in doc and all(f"`{m}`" in doc for m in modules if m != "medil_backend"), name
