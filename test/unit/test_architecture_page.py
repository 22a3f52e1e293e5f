"""The design page cannot go stale: every file and ``module.symbol`` it names exists.

``docs/architecture.md`` is how a newcomer finds their way; a page that sketches functions which
do not exist sends them looking for code that is not there. Checked on the source with ``ast``
(nothing of ours or SGLang's is imported), in the style of ``test_layering.py``:

- the layout tree (the fenced block under "## Layout"): each entry, at its place in the tree;
- every backticked path (``srt/cpu.py``, ``docs/memory.md``, ``test/support/``) in the repository,
  tried from the root and from each package's folder;
- every backticked dotted name (``config.parse_harli_args``, ``HarliScheduler.run_batch``,
  ``sglang.srt.managers.scheduler.Scheduler``) and every dotted call in the other fenced blocks:
  ours resolved to a module (full or trailing part of its name) or a top-level class, then to
  its symbols; SGLang's in SGLang's installed sources;
- relative markdown links.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
from pathlib import Path

import pytest

from test.unit.test_layering import REPO, ROOTS, module_name, parse

PAGE = REPO / "docs" / "architecture.md"
# files a running server writes (state dir, adapters): named on the page, not in the repository
ARTIFACT_SUFFIXES = {".json", ".db", ".npz", ".safetensors", ".gguf", ".jsonl", ".log", ".yaml"}
SOURCE_SUFFIXES = {".py", ".md", ".sh", ".toml", ".csv"}
DOTTED = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(\(.*\))?$")
CALL = re.compile(r"\b([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)\(")
BACKTICKED = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def page_parts() -> tuple[str, list[tuple[str, str]]]:
    """The page's prose and its fenced blocks as (heading they sit under, text)."""
    prose, blocks, heading = [], [], ""
    block: list[str] | None = None
    for line in PAGE.read_text().splitlines():
        if line.startswith("```"):
            if block is None:
                block = []
            else:
                blocks.append((heading, "\n".join(block)))
                block = None
        elif block is not None:
            block.append(line)
        else:
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
            prose.append(line)
    return "\n".join(prose), blocks


PROSE, BLOCKS = page_parts()


# --- our modules and their symbols ------------------------------------------------------------


@functools.cache
def our_modules() -> dict[str, Path]:
    modules = {}
    for package, root in ROOTS.items():
        for path in root.rglob("*.py"):
            modules[module_name(package, root, path)] = path
    return modules


def symbols_of(tree: ast.AST) -> dict[str, ast.AST | None]:
    """Names bound at the top of a module or class body (defs, classes, assignments, imports),
    plus, for a class, the ``self.x`` attributes its methods assign."""
    found: dict[str, ast.AST | None] = {}
    for node in getattr(tree, "body", []):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            found[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    found[target.id] = None
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found[node.target.id] = None
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:  # a name brought in, not defined here: nothing beyond it
                found[(alias.asname or alias.name).split(".")[0]] = node
    if isinstance(tree, ast.ClassDef):
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
            ):
                found.setdefault(node.attr, None)
    return found


@functools.cache
def parsed(path: Path) -> ast.Module:
    return parse(path)


def resolves_in(tree: ast.AST, names: list[str]) -> bool:
    """``names`` is a chain of symbols inside ``tree``; past a class's attribute (an instance's
    field, whose type the source does not say) the chain is taken as given."""
    for i, name in enumerate(names):
        symbols = symbols_of(tree)
        if name not in symbols:
            return False
        node = symbols[name]
        if not isinstance(node, ast.ClassDef):
            last = i == len(names) - 1
            return last or (node is None and not isinstance(tree, ast.Module))
        tree = node
    return True


def resolves_in_ours(dotted: str) -> bool:
    parts = dotted.split(".")
    modules = our_modules()
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        for name, path in modules.items():
            if name == head or name.endswith("." + head):
                if resolves_in(parsed(path), parts[cut:]):
                    return True
    # a top-level class or function of ours, named without its module
    return any(resolves_in(parsed(path), parts) for path in modules.values())


# --- SGLang's sources -------------------------------------------------------------------------


@functools.cache
def sglang_root() -> Path:
    spec = importlib.util.find_spec("sglang")  # finds the package, imports nothing
    assert spec is not None and spec.submodule_search_locations, "sglang is not installed"
    return Path(next(iter(spec.submodule_search_locations)))


def resolves_in_sglang(dotted: str) -> bool:
    parts = dotted.split(".")[1:]
    for cut in range(len(parts), -1, -1):
        base = sglang_root().joinpath(*parts[:cut])
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if cut and path.is_file() and resolves_in(parsed(path), parts[cut:]):
                return True
    return False


def reference_exists(dotted: str) -> bool:
    if dotted.startswith("sglang."):
        return resolves_in_sglang(dotted)
    return resolves_in_ours(dotted)


# --- what the page names ----------------------------------------------------------------------


def layout_entries() -> list[str]:
    """Repository paths of the layout tree: an entry is a line whose first word is a file or a
    folder (``name/``); deeper-indented lines under it are its contents or its description."""
    (tree,) = [text for heading, text in BLOCKS if heading == "Layout"]
    entries, stack = [], []  # stack: (indent, folder)
    for line in tree.splitlines():
        words = line.split()
        if not words:
            continue
        indent = len(line) - len(line.lstrip())
        names = []
        for word in words:
            word = word.rstrip(",")
            if not (word.endswith("/") or Path(word).suffix in SOURCE_SUFFIXES):
                break
            names.append(word)
        if not names:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1] if stack else ""
        entries += [parent + name for name in names]
        if len(names) == 1 and names[0].endswith("/"):
            stack.append((indent, parent + names[0]))
    return entries


def backticked() -> list[str]:
    return BACKTICKED.findall(PROSE) + [
        token for _, text in BLOCKS for token in BACKTICKED.findall(text)
    ]


def named_paths() -> list[str]:
    paths = []
    for token in backticked():
        token = token.strip()
        if " " in token or token.startswith(("/", "~", ".", "$", "<", "-", "http")):
            continue
        if any(c in token for c in "*{}<>=:"):
            continue
        suffix = Path(token.rstrip("/")).suffix
        if "/" in token or suffix in SOURCE_SUFFIXES:
            if suffix in ARTIFACT_SUFFIXES:
                continue
            paths.append(token)
    return paths


def path_exists(token: str) -> bool:
    bases = [REPO, *(root for root in ROOTS.values()), REPO / "python", REPO / "kernels"]
    if any((base / token).exists() for base in bases):
        return True
    if "/" not in token:  # a file named alone: somewhere in the repository
        return any(p for p in REPO.rglob(token) if ".git" not in p.parts and ".venv" not in p.parts)
    return False


def named_symbols() -> list[str]:
    names = []
    for token in backticked():
        match = DOTTED.match(token.strip())
        if match and Path(match.group(1)).suffix not in SOURCE_SUFFIXES | ARTIFACT_SUFFIXES:
            names.append(match.group(1))
    for heading, text in BLOCKS:
        if heading != "Layout":
            names += CALL.findall(text)
    return sorted(set(names))


def test_the_layout_tree_lists_files_that_exist():
    entries = layout_entries()
    assert len(entries) > 40, "the layout tree was not found or not parsed"
    missing = [e for e in entries if not (REPO / e).exists()]
    assert not missing, f"docs/architecture.md's layout names paths that do not exist: {missing}"


def test_every_package_module_is_on_the_layout_tree():
    # the other direction: a newcomer reading the tree sees every module of ours
    listed = set(layout_entries())
    unlisted = [
        str(path.relative_to(REPO))
        for path in our_modules().values()
        if path.name != "__init__.py"
        and "cpu_boot" not in path.parts
        and str(path.relative_to(REPO)) not in listed
    ]
    assert not unlisted, f"modules missing from docs/architecture.md's layout: {unlisted}"


def test_every_named_path_exists():
    paths = named_paths()
    assert paths, "no backticked paths found on the page"
    missing = [p for p in paths if not path_exists(p)]
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


# Resolved while the tests are collected, before any test's threads run (see ``parse``).
NAMED_SYMBOLS = named_symbols()
MISSING_SYMBOLS = [n for n in NAMED_SYMBOLS if not reference_exists(n)]


def test_every_named_symbol_exists():
    names = NAMED_SYMBOLS
    assert len(names) > 10, "no dotted names found on the page"
    missing = MISSING_SYMBOLS
    assert not missing, f"docs/architecture.md names symbols that do not exist: {missing}"


def test_relative_links_resolve():
    links = [
        link.split("#")[0]
        for link in LINK.findall(PAGE.read_text())
        if not link.startswith(("http", "#", "mailto:"))
    ]
    missing = [link for link in links if link and not (PAGE.parent / link).exists()]
    assert not missing, f"docs/architecture.md links to files that do not exist: {missing}"


@pytest.mark.parametrize(
    "name, exists",
    [
        ("config.parse_harli_args", True),
        ("HarliScheduler.get_internal_state", True),
        ("srt.process.run_scheduler_process", True),
        ("sglang.srt.managers.scheduler.Scheduler", True),
        ("engine.launch", False),
        ("feedback.record", False),
        ("HarliScheduler.no_such_method", False),
        ("sglang.srt.managers.scheduler.NoSuchScheduler", False),
    ],
)
def test_the_checker_tells_real_names_from_invented_ones(name, exists):
    assert reference_exists(name) is exists
