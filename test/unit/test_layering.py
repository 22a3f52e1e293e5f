"""The house rules of the layout, checked on the source: who may import what, and no cycles.

Every import counts, at module level or inside a function (a late import still runs, and a
circle hidden inside functions is still a circle); only ``if TYPE_CHECKING:`` blocks are left
out of the layer rules, since they never run, but not out of the cycle check. Read with ``ast``
so nothing is executed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOTS = {
    "sglang_harli": REPO / "python" / "sglang_harli",
    "harli_kernels": REPO / "kernels" / "harli_kernels",
}


def module_name(package: str, root: Path, path: Path) -> str:
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def parse(path: Path) -> ast.Module:
    """``ast.parse`` of a file. CPython 3.11's parser keeps its recursion depth in state shared
    by threads, so a parse while another thread compiles (a jinja template of a test before,
    still rendering) can fail with "AST constructor recursion depth mismatch": parse again."""
    source = path.read_text()
    for attempt in range(3):
        try:
            return ast.parse(source)
        except SystemError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    """The import nodes under ``if TYPE_CHECKING:`` (annotations only; never executed)."""
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            ids.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return ids


def imports(path: Path, module: str, *, type_checking: bool = True) -> set[str]:
    """Absolute names of everything ``module`` imports, wherever the import statement sits."""
    tree = parse(path)
    skip = set() if type_checking else _type_checking_nodes(tree)
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(node, module, is_package)
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def all_modules(*, type_checking: bool) -> dict[str, set[str]]:
    modules = {}
    for package, root in ROOTS.items():
        for path in root.rglob("*.py"):
            if "cpu_boot" in path.parts:
                continue
            name = module_name(package, root, path)
            modules[name] = imports(path, name, type_checking=type_checking)
    return modules


MODULES = all_modules(type_checking=True)  # for cycles
RUNTIME = all_modules(type_checking=False)  # for the layers: what runs


def imports_of(prefix: str) -> dict[str, set[str]]:
    return {m: i for m, i in RUNTIME.items() if m == prefix or m.startswith(prefix + ".")}


@pytest.mark.parametrize(
    "layer, forbidden",
    [
        (
            "sglang_harli.finetune",
            (
                "sglang",
                "sqlite3",
                "requests",
                "fastapi",
                "sglang_harli.jobs",
                "sglang_harli.srt",
                "sglang_harli.corun",
            ),
        ),
        # the job service is driven: the co-run loop (corun/) pulls units from the runner and
        # hands results back; nothing in jobs/ imports it or calls back into it
        (
            "sglang_harli.jobs",
            ("sglang", "fastapi", "requests", "sglang_harli.srt", "sglang_harli.corun"),
        ),
        ("sglang_harli.corun", ("sglang", "sglang_harli.srt", "sglang_harli.jobs")),
        (
            "sglang_harli.memory",
            (
                "sglang",
                "sglang_harli.srt",
                "sglang_harli.jobs",
                "sglang_harli.corun",
                "sglang_harli.finetune",
            ),
        ),
        ("sglang_harli.cli", ("torch", "sglang", "sglang_harli.finetune", "sglang_harli.srt")),
        ("sglang_harli.config", ("torch", "sglang")),
        # the benchmarks drive servers from outside (HTTP, processes) and simulate them
        ("sglang_harli.bench", ("sglang", "sglang_harli.srt")),
        ("harli_kernels", ("sglang", "sglang_harli")),
    ],
)
def test_layers_import_only_what_they_may(layer, forbidden):
    bad = {
        (module, name)
        for module, names in imports_of(layer).items()
        for name in names
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    }
    assert not bad, f"{layer} imports what it must not: {sorted(bad)}"


def test_no_import_cycles_between_our_modules():
    graph = {
        module: {
            target
            for name in names
            for target in (name, name.rsplit(".", 1)[0])
            if target in MODULES and target != module
        }
        for module, names in MODULES.items()
    }
    # a package's __init__ importing its own submodules is how packages work, not a cycle
    graph = {
        m: {t for t in targets if not (MODULES.get(m) is not None and t.startswith(m + "."))}
        for m, targets in graph.items()
    }
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, f"import cycles: {cycles}"


def test_imports_inside_functions_count(tmp_path):
    # a late import is how the bench circle (plots <-> replay <-> profile) once hid from this test
    source = tmp_path / "late.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from sglang_harli.jobs import store\n"
        "def f():\n"
        "    from .replay import summarize\n"
        "    import torch\n"
    )
    found = imports(source, "sglang_harli.bench.late")
    assert {"sglang_harli.bench.replay.summarize", "torch", "sglang_harli.jobs"} <= found
    runtime = imports(source, "sglang_harli.bench.late", type_checking=False)
    assert "sglang_harli.jobs" not in runtime
