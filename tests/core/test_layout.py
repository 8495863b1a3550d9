"""The layout's dependency rules, checked by walking the import graph with ``ast`` (docs/ARCHITECTURE.md).

1. The core (``slmopt/``) never imports ``slmopt.passes`` or ``slmopt.backends``: both registries name
   them as ``"module:Class"`` strings and import them on first use.
2. The core never names a pass: no string literal (docstrings aside) equals a registered pass name or
   alias, outside the registry itself. Passes declare what the driver needs (class attributes and hooks).
3. The core has no function-level ``slmopt`` imports — the usual way to hide an import cycle — except the
   commented allow-list below (lazy loading of heavy optional parts, never a cycle).
4. No module of the package (core, passes, backends, native) takes part in a module-level import cycle.

Each rule is a function over source text, so the tests below also plant a violation and see it caught.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from slmopt.pipeline.pass_base import BUILTIN_PASSES

REPO = Path(__file__).resolve().parents[2]
# Where each installed package lives in the source tree (pyproject's package-dir mapping).
ROOTS = {"slmopt": REPO / "slmopt", "slmopt.passes": REPO / "passes", "slmopt.backends": REPO / "backends",
         "slmopt.native": REPO / "cuda"}  # fmt: skip
OUTWARD = ("slmopt.passes", "slmopt.backends")

# (importing core module, imported module) -> why a function-level import is right there. Never a cycle:
# rule 4 would see the cycle once the import moved to module level.
LAZY_ALLOWED = {
    # The CLI starts in ~0.1 s: each command imports what it needs (torch, the compiler) when it runs.
    **{("slmopt.cli", m): "CLI start-up time" for m in (
        "slmopt.analysis", "slmopt.api", "slmopt.bench", "slmopt.data.quality", "slmopt.generation.bench",
        "slmopt.generation.generate", "slmopt.loaders", "slmopt.lowering", "slmopt.pipeline.options",
        "slmopt.pipeline.pass_base", "slmopt.program")},
    # Compiling the native kernel takes ~40 s and needs a compiler: only when the op is first used.
    ("slmopt.ops", "slmopt.native.build"): "optional native build",
    ("slmopt.ops", "slmopt.native"): "optional native build",
}  # fmt: skip


# (core module, literal) -> why a string equal to a pass name is not a pass name there.
LITERAL_ALLOWED = {
    ("slmopt.ops", "fff"): "the custom op slmopt::fff (torch.library name), which the fff pass emits",
}


@dataclass(frozen=True)
class Import:
    module: str  # absolute dotted name of what is imported
    line: int
    function_level: bool
    type_checking: bool


def module_name(path: Path) -> str:
    """The installed dotted name of a source file (``passes/fff/layer.py`` -> ``slmopt.passes.fff.layer``)."""
    for package, root in sorted(ROOTS.items(), key=lambda kv: len(str(kv[1])), reverse=True):
        if path.is_relative_to(root):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            return ".".join([package, *parts])
    raise ValueError(f"{path} is not in the package")


def package_files() -> dict[str, Path]:
    files = {}
    for root in ROOTS.values():
        for path in sorted(root.rglob("*.py")):
            files[module_name(path)] = path
    return files


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(source: str) -> list[Import]:
    """Every ``slmopt`` import of a module, marked function-level / under ``if TYPE_CHECKING``."""
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool, in_tc: bool) -> None:
        for child in ast.iter_child_nodes(node):
            fn = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            tc = in_tc or (isinstance(child, ast.If) and _is_type_checking(child.test))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "slmopt":
                        found.append(Import(alias.name, child.lineno, in_function, in_tc))
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if child.module.split(".")[0] == "slmopt":
                    # ``from slmopt.x import y`` may import the submodule slmopt.x.y: record both.
                    found.append(Import(child.module, child.lineno, in_function, in_tc))
                    for alias in child.names:
                        found.append(Import(f"{child.module}.{alias.name}", child.lineno, in_function, in_tc))
            elif isinstance(child, ast.Call) and _literal_import_target(child):
                found.append(Import(_literal_import_target(child), child.lineno, in_function, in_tc))
            visit(child, fn, tc)

    visit(ast.parse(source), False, False)
    return found


def _literal_import_target(call: ast.Call) -> str | None:
    """``importlib.import_module("slmopt.x")`` with a literal name (registries use variables, not literals)."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    if name in ("import_module", "__import__") and call.args and isinstance(call.args[0], ast.Constant):
        value = call.args[0].value
        if isinstance(value, str) and value.split(".")[0] == "slmopt":
            return value
    return None


def outward_imports(source: str) -> list[str]:
    """Rule 1: imports of ``slmopt.passes`` / ``slmopt.backends`` (any level, TYPE_CHECKING included)."""
    outward = [i for i in imports_of(source) if i.module.startswith(OUTWARD)]
    return [f"line {line}: {modules[0]}" for line, modules in _per_statement(outward).items()]


def _docstring_nodes(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _exempt_tables(tree: ast.Module) -> set[int]:
    """String constants of ``BUILTIN_PASSES = {...}`` (the one place pass names belong) and ``__all__``
    (identifiers of the module, e.g. the ``fff`` op function, not pass names)."""
    ids = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id in ("BUILTIN_PASSES", "__all__") for t in targets):
            ids.update(id(n) for n in ast.walk(node) if isinstance(n, ast.Constant))
    return ids


def pass_name_literals(source: str, names: set[str], module: str = "") -> list[str]:
    """Rule 2: string literals equal to a pass name or alias (docstrings, the registry table, ``__all__``
    and :data:`LITERAL_ALLOWED` aside)."""
    tree = ast.parse(source)
    skip = _docstring_nodes(tree) | _exempt_tables(tree)
    return [
        f"line {node.lineno}: {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
        and node.value.strip() in names and (module, node.value) not in LITERAL_ALLOWED
    ]  # fmt: skip


def _per_statement(found: list[Import]) -> dict[int, list[str]]:
    """``from slmopt.x import y`` records slmopt.x and slmopt.x.y: group them by statement (line)."""
    lines: dict[int, list[str]] = {}
    for imp in found:
        lines.setdefault(imp.line, []).append(imp.module)
    return lines


def lazy_imports(source: str, importer: str) -> list[str]:
    """Rule 3: function-level ``slmopt`` imports not in :data:`LAZY_ALLOWED`."""
    lazy = _per_statement([i for i in imports_of(source) if i.function_level])
    return [
        f"line {line}: {modules[0]}"
        for line, modules in lazy.items()
        if not any((importer, m) in LAZY_ALLOWED for m in modules)
    ]


def module_level_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports when it is imported (TYPE_CHECKING and functions aside).

    Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first, so those count as edges too.
    """
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges = set()
        for imp in imports_of(path.read_text()):
            if imp.function_level or imp.type_checking:
                continue
            parts = imp.module.split(".")
            for k in range(2, len(parts) + 1):
                target = ".".join(parts[:k])
                if target in files and target != name and not name.startswith(target + "."):
                    edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


def _pass_names() -> set[str]:
    return {name for name, spec in BUILTIN_PASSES.items()} | {
        a for s in BUILTIN_PASSES.values() for a in s.aliases
    }


CORE = {
    name: path for name, path in package_files().items() if not name.startswith((*OUTWARD, "slmopt.native"))
}


# ------------------------------------------------------------------------------------------ the rules
def test_core_never_imports_passes_or_backends() -> None:
    bad = {name: found for name, path in CORE.items() if (found := outward_imports(path.read_text()))}
    assert not bad, f"the core imports passes/backends (use the registries): {bad}"


def test_core_never_names_a_pass() -> None:
    names = _pass_names()
    assert {"mask-2to4", "fff", "elastic", "distill", "prune-attn"} <= names  # the check sees the registry
    bad = {
        name: found
        for name, path in CORE.items()
        if (found := pass_name_literals(path.read_text(), names, name))
    }
    assert not bad, f"the core names passes (declare it on the pass class instead): {bad}"


def test_core_has_no_function_level_imports() -> None:
    bad = {name: found for name, path in CORE.items() if (found := lazy_imports(path.read_text(), name))}
    assert not bad, f"function-level slmopt imports in the core (move the shared code instead): {bad}"
    used = {
        (name, i.module)
        for name, path in CORE.items()
        for i in imports_of(path.read_text())
        if i.function_level
    }
    assert set(LAZY_ALLOWED) <= used, f"stale allow-list entries: {set(LAZY_ALLOWED) - used}"


def test_no_module_level_import_cycles() -> None:
    files = package_files()
    assert len(files) > 60 and "slmopt.passes.fff.layer" in files and "slmopt.backends.onnxrt.check" in files
    assert not cycles(module_level_graph(files))


def test_every_source_file_is_in_an_installed_package() -> None:
    """A folder without ``__init__.py`` or missing from pyproject's package list would not be installed."""
    text = (REPO / "pyproject.toml").read_text()
    packages = {name for name, path in package_files().items() if path.name == "__init__.py"}
    for name, path in package_files().items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        assert package in packages, f"{path} is in a folder without __init__.py"
        assert f'"{package}"' in text, f"{package} is not listed in pyproject.toml's packages"


# ------------------------------------------------------------------------------------------ planted violations
@pytest.mark.parametrize(
    "source",
    [
        "from slmopt.passes.fff.layer import FFF\n",
        "import slmopt.backends.onnxrt.backend\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from slmopt.backends import fff_spec\n",
        "def f():\n    from slmopt.passes import importance\n",
        "import importlib\nm = importlib.import_module('slmopt.backends.torch_backend')\n",
    ],
)
def test_outward_import_is_caught(source: str) -> None:
    assert outward_imports(source)


@pytest.mark.parametrize(
    ("source", "caught"),
    [
        ("uses = [p for p in passes if p.name == 'distill']\n", True),
        ("if name in ('prune', 'other'):\n    pass\n", True),  # an alias counts too
        ("def f():\n    '''Runs mask-2to4 first.'''\n    return 'mask-2to4 done'\n", False),  # prose
        ("def f():\n    '''mask-2to4'''\n", False),  # a docstring
        ("BUILTIN_PASSES = {'fff': 1}\n", False),  # the registry table
        ("table = {'fff': 1}\n", True),
        ("__all__ = ['fff']\n", False),  # an identifier of the module
    ],
)
def test_pass_name_literal_is_caught(source: str, caught: bool) -> None:
    assert bool(pass_name_literals(source, _pass_names())) is caught


def test_function_level_import_is_caught() -> None:
    source = "import slmopt.errors\n\ndef f():\n    from slmopt.api import compile\n    return compile\n"
    assert lazy_imports(source, "slmopt.verification") == ["line 4: slmopt.api"]
    assert lazy_imports(source, "slmopt.cli") == []  # allow-listed for CLI start-up


def test_cycle_is_caught() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
