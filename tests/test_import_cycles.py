"""No import cycle among the modules of shared/, functions/, local/ and training_image/, counting the imports made inside
functions too: a cycle that only a lazy import closes still breaks on the path that takes it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("shared", "functions", "local", "training_image")


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ours that `path` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from a import b` imports a.b when b is a module, else a (b being a name in it)
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: _imports(path, modules) for name, path in modules.items()}
    for name, edges in graph.items():  # importing a.b runs a/__init__ first: that is no cycle of a.b's
        edges.discard(name)
        edges.difference_update(n for n in list(edges) if name.startswith(n + "."))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules (Tarjan), as a list of names."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_our_packages_import_without_a_cycle():
    graph = import_graph()
    assert {"shared.store", "functions.api.app", "local.cli", "training_image.modeldir"} <= graph.keys()
    assert cycles(graph) == []


def test_the_command_line_and_the_model_readers_import_one_way():
    """The API client and its errors, and the Hugging Face folder reader, are modules of their own:
    what shares them imports them, and they import none of their users, even inside a function."""
    graph = import_graph()
    assert {"local.client", "local.output"} <= graph["local.deploy"]
    assert "local.cli" not in graph["local.deploy"] | graph["local.models"] | graph["local.client"]
    assert "training_image.hf_folder" in graph["training_image.modeldir"] & graph["training_image.hf"]
    assert "training_image.hf" not in graph["training_image.modeldir"] | graph["training_image.hf_folder"]


def test_the_check_sees_a_cycle_closed_by_a_lazy_import():
    graph = import_graph()
    assert "functions.api.idempotency" in graph["functions.api.jobs"]  # imported inside create_job
    graph["functions.api.idempotency"] = graph["functions.api.idempotency"] | {"functions.api.app"}
    assert ["functions.api.app", "functions.api.idempotency", "functions.api.jobs", "functions.api.tunings"] in cycles(graph)
    assert "local.models" in graph["local.cli"]  # imported inside models_download
    graph["local.models"] = graph["local.models"] | {"local.cli"}  # as it once did, for ApiError
    assert ["local.cli", "local.models"] in cycles(graph)
