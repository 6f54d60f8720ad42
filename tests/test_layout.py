"""The house rules, walked from the source: one-way layers, no import cycles, small modules and functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("retrieval", "pipelines")

# Each module may import only from its own layer or below (lower number). A layer lists module
# names or package prefixes; the most specific entry wins.
LAYERS: dict[str, int] = {
    # the bottom: no retrieve imports but these
    "retrieval.errors": 0,
    "retrieval.atomic": 0,
    "retrieval.paths": 0,
    "retrieval.preprocess": 0,
    "retrieval.config": 0,
    "retrieval.device": 0,
    "retrieval.progress": 0,
    "retrieval.text": 0,
    # images, architectures, the checkpoint format, sample data
    "retrieval.images": 1,
    "retrieval.models": 1,
    "retrieval.checkpoint": 1,
    "retrieval.samples": 1,
    # the backbone registry
    "retrieval.backbones": 2,
    # store / index / embed, and the open index with its Searcher
    "retrieval.embed": 3,
    "retrieval.index": 3,
    "retrieval.store": 3,
    "retrieval.query": 3,
    "retrieval.api": 3,
    # task modules
    "retrieval.evaluate": 4,
    "retrieval.maps": 4,
    "retrieval.sheet": 4,
    "retrieval.training": 4,
    "retrieval.visualise": 4,
    # the package's public face (lazy re-exports of the API)
    "retrieval": 5,
    # batch jobs
    "pipelines": 6,
    # the command line
    "retrieval.cli": 7,
    "retrieval.__main__": 7,
}
NAMES = {
    0: "base",
    1: "images/models",
    2: "backbones",
    3: "store/index/embed",
    4: "tasks",
    5: "retrieval",
    6: "pipelines",
    7: "cli",
}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def layer_of(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return LAYERS[key]
    raise AssertionError(f"{module} has no layer in tests/test_layout.py: add it to LAYERS")


def _resolve(name: str) -> str | None:
    """The module an import names (a module of ours, or the package holding the name), else None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports(module: str) -> set[str]:
    """Modules of ours that `module` imports at run time (at the top or inside functions)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            # `from retrieval import errors` imports the submodule; `from retrieval import X` the package.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target and target != module and name.split(".")[0] in PACKAGES:
                found.add(target)
    return found


GRAPH = {m: imports(m) for m in MODULES}


def test_every_import_points_down_the_layers() -> None:
    wrong = [
        f"{m} ({NAMES[layer_of(m)]}) imports {t} ({NAMES[layer_of(t)]})"
        for m, targets in GRAPH.items()
        for t in sorted(targets)
        if layer_of(t) > layer_of(m)
    ]
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    cycles = _cycles(GRAPH)
    described = [
        " <-> ".join(c) + ": " + ", ".join(f"{a} -> {b}" for a in c for b in sorted(GRAPH[a]) if b in c)
        for c in cycles
    ]
    assert not cycles, "import cycles:\n" + "\n".join(described)


def test_the_layer_check_can_fail() -> None:
    """The walker sees a function-local upward import and a cycle (so the two tests above can fail)."""
    assert layer_of("pipelines.index_folder") > layer_of("retrieval.store")
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert "retrieval.store" in GRAPH["pipelines.index_folder"]  # imported inside a function there


def _function_lengths(tree: ast.AST) -> list[tuple[str, int, int]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(getattr(body[0], "value", None), ast.Constant)
            ):
                body = body[1:]  # the docstring does not count
            if body:
                out.append((node.name, node.lineno, (body[-1].end_lineno or 0) - body[0].lineno + 1))
    return out


@pytest.mark.parametrize("package", PACKAGES)
def test_modules_and_functions_stay_small(package: str) -> None:
    big = []
    for path in sorted((ROOT / package).rglob("*.py")):
        text = path.read_text()
        rel = path.relative_to(ROOT)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            big.append(f"{rel}: {len(text.splitlines())} lines (at most {MAX_MODULE_LINES})")
        for name, line, n in _function_lengths(ast.parse(text)):
            if n > MAX_FUNCTION_LINES:
                big.append(f"{rel}:{line} {name}(): a {n}-line body (at most {MAX_FUNCTION_LINES})")
    assert not big, "rooms that grew too large:\n" + "\n".join(big)


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "bench").glob("*.py")))
def test_benchmarks_import_names_that_exist(script: str) -> None:
    """A refactor that moves a function must not leave a benchmark importing it from its old home:
    every `from retrieval... import name` in a bench script, top level or inside a function, resolves."""
    import importlib

    tree = ast.parse((ROOT / "bench" / script).read_text())
    missing = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        missing.append(f"{node.module}.{alias.name} (line {node.lineno})")
    assert not missing, f"bench/{script} imports names that do not exist: {missing}"
