"""The package's shape, drawn from its own imports: HTTP sees only the engine, the engine and the
API load no torch, and no module imports itself back through others (shared/DESIGN.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[1] / "app"
BELOW_THE_ENGINE = ("app.worker", "app.model", "app.layers", "app.kernels")
WIRING = "app.stack"  # builds the whole stack; the CLI hands the API what it made


def module_name(path: Path) -> str:
    parts = path.relative_to(APP.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: str = "app") -> dict[str, Path]:
    root = APP.parent / package.replace(".", "/")
    return {module_name(p): p for p in sorted(root.rglob("*.py"))}


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(path: Path) -> set[str]:
    """Every app module `path` imports, at the top or inside a function (not for type checking)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking(child):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("app"))
            elif (
                isinstance(child, ast.ImportFrom)
                and child.level == 0
                and (child.module or "").startswith("app")
            ):
                base = child.module or ""
                known = modules()
                for a in child.names:  # `from app.api import protocol` imports the module app.api.protocol
                    found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def within(name: str, packages: tuple[str, ...] | str) -> bool:
    packages = (packages,) if isinstance(packages, str) else packages
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_no_api_module_imports_below_the_engine_or_the_wiring() -> None:
    bad = {
        name: sorted(i for i in imports_of(path) if within(i, (*BELOW_THE_ENGINE, WIRING)))
        for name, path in modules("app.api").items()
    }
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_engine_imports_nothing_below_it_nor_the_api() -> None:
    bad = {
        name: sorted(i for i in imports_of(path) if within(i, (*BELOW_THE_ENGINE, WIRING, "app.api")))
        for name, path in modules("app.engine").items()
    }
    assert {k: v for k, v in bad.items() if v} == {}


def test_importing_the_api_and_the_engine_loads_no_torch_even_indirectly() -> None:
    names = sorted([*modules("app.api"), *modules("app.engine")])
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', "
        f"{', '.join(repr(p + '.') for p in (*BELOW_THE_ENGINE, WIRING))})) or m == {WIRING!r})\n"
        "print(loaded)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=APP.parent, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_the_import_test_sees_what_it_forbids() -> None:
    """The checks above can fail: the wiring itself does import the pool, and it loads torch."""
    assert "app.worker.pool" in imports_of(APP / "stack.py")
    code = "import sys, app.stack; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=APP.parent, check=True
    )
    assert out.stdout.strip() == "True"


def test_no_import_cycles() -> None:
    graph = {
        name: {i for i in imports_of(path) if i in modules() and i != name}
        for name, path in modules().items()
    }
    # a package's __init__ is imported with each of its modules: an edge to the package is one to its __init__
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name)
    assert cycles == []


@pytest.mark.parametrize(
    "loose", ["tokenizer_gguf", "chat_template", "detokenizer", "generate", "inspect", "runtime"]
)
def test_no_loose_top_level_modules(loose: str) -> None:
    assert not (APP / f"{loose}.py").exists()
