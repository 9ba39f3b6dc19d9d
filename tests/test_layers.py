"""The package's shape: layers that import only downwards, no import circles, small files and
functions. The layer order below is the one place it is written; the README's code map shows it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "lmforge"

# Lowest first. A module may import from its own layer and from the layers before it.
LAYERS: list[tuple[str, str]] = [
    ("base", "config, runtime, distributed setup, metrics, tokenizer, input readers, faults"),
    ("data", "token store, preparation, datasets, collation, the dialogue format"),
    ("ops", "the fast paths and their torch references: attention, dropout, output layer, C++ kernels"),
    ("models", "GPT, BERT, heads, the registry, Hugging Face name maps"),
    ("checkpoint", "save, verified load, retention, load_model"),
    ("report", "plots and the HTML page from metrics.jsonl"),
    ("inference", "generation, loaded models, the chat session, classifier and embedding use"),
    ("train", "the Trainer, tasks, optimizer, update, logging"),
    ("serve", "the HTTP server: OpenAI-compatible routes, request checks, streaming, the chat page"),
    ("commands", "what each CLI command does"),
    ("entry", "cli, the library API, the package root"),
]
ENTRY_MODULES = {"lmforge", "lmforge.cli", "lmforge.api", "lmforge.__main__"}
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80



def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer_of(module: str) -> int:
    # cli.py's argument groups may live beside it as cli_<group>.py (e.g. cli_serve.py).
    if module in ENTRY_MODULES or module.startswith("lmforge.cli_"):
        return len(LAYERS) - 1
    second = module.split(".")[1]
    names = [name for name, _ in LAYERS]
    if second not in names:
        raise AssertionError(f"{module}: in no layer; add its package to LAYERS in tests/test_layers.py")
    return names.index(second)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The lmforge modules `path` imports, anywhere in the file (function-level imports count)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known and name != module}
    return found


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    return {module: _imports(path, module, set(sources)) for module, path in sources.items()}


def test_every_module_sits_in_a_layer_and_imports_only_downwards():
    upward = set()
    for module, imported in _graph().items():
        for target in imported:
            if _layer_of(target) > _layer_of(module):
                upward.add((module, target))
    assert not upward, "upward imports:\n" + "\n".join(f"  {a} -> {b}" for a, b in sorted(upward))


def test_no_import_circles():
    graph = _graph()
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join("  " + " -> ".join(c) for c in circles)


def _long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    name = _module_name(path)
    return [f"{name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def test_functions_and_files_are_small():
    long_files, long_functions = set(), set()
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_FILE_LINES:
            long_files.add(f"{_module_name(path)} ({lines} lines)")
        long_functions |= set(_long_functions(path))
    assert not long_files, f"files over {MAX_FILE_LINES} lines: {sorted(long_files)}"
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {sorted(long_functions)}"


@pytest.mark.parametrize("layer", [name for name, _ in LAYERS[:-1]])
def test_each_layer_is_a_package(layer: str):
    assert (PACKAGE / layer / "__init__.py").exists(), f"src/lmforge/{layer}/ is not a package"
