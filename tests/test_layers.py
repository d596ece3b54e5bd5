"""The package imports only downward: no import circle among optbundle's modules, and each layer imports only
itself or a layer below (files ← step ← store ← meta ← apps ← cli / the package). Read from the source with
`ast`: module-level imports of optbundle modules, relative or absolute (``if TYPE_CHECKING:`` blocks and
imports inside functions do not run at import time and are not counted; the second test bounds those)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: package → source folder, as pyproject.toml's package-dir maps them
SOURCES = {"optbundle": ROOT / "bundle", "optbundle.kernels": ROOT / "kernels", "optbundle.recipes": ROOT / "recipes"}
#: the lowest layer first; a module belongs to the longest prefix listed
LAYERS = [
    ("optbundle.files", "optbundle.recipes"),
    ("optbundle.step", "optbundle.kernels"),
    ("optbundle.store",),
    ("optbundle.meta",),
    ("optbundle.apps", "optbundle.recipes.fit_adam_init"),
    ("optbundle", "optbundle.cli"),
]
#: imports of optbundle modules that may stay inside a function, each for a reason
LAZY_ALLOWED = {
    ("optbundle", "optbundle.store.trainer"): "BundleCallback needs transformers, which `import optbundle` does not",
    ("optbundle.store.bundle", "optbundle.store.trainer"): "trainer.py imports transformers",
    ("optbundle.store.bundle", "optbundle.meta.refine"): "Bundle.refine, the one way up to the meta layer",
    ("optbundle.step.optimizer", "optbundle.kernels.learned_step"): "Triton (optional, heavy)",
}


def modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package: name → (file, is a package ``__init__``)."""
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            name = ".".join([package, *(parts[:-1] if is_package else parts)])
            found[name] = (path, is_package)
    return found


def _imports(name: str, path: Path, is_package: bool, known: set[str]):
    """``(target module, line, inside a function)`` for each import of an optbundle module in ``path``."""

    def target(node: ast.ImportFrom, alias: str) -> str:
        if node.level:
            base = name.split(".") if is_package else name.split(".")[:-1]
            base = base[: len(base) - node.level + 1]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        return f"{module}.{alias}" if f"{module}.{alias}" in known else module

    def walk(node: ast.AST, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                for alias in child.names:
                    yield target(child, alias.name), child.lineno, inner
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, child.lineno, inner
            yield from walk(child, inner)

    for module, line, inner in walk(ast.parse(path.read_text(encoding="utf-8")), False):
        if module == "optbundle" or module.startswith("optbundle."):
            yield module, line, inner


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """Module-level edges ``{module: {imported modules}}`` and the imports inside functions."""
    found = modules()
    edges: dict[str, set[str]] = {name: set() for name in found}
    lazy = []
    for name, (path, is_package) in found.items():
        for module, line, inner in _imports(name, path, is_package, set(found)):
            if inner:
                lazy.append((name, module, line))
            elif module != name:
                edges[name].add(module)
    return edges, lazy


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt in edges and nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def layer_of(module: str) -> int:
    best, rank = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    assert rank is not None, f"{module} belongs to no layer; add it to LAYERS"
    return rank


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle():
    edges, _ = import_graph()
    assert "optbundle.step.optimizer" in edges and "optbundle.store.bundle" in edges  # the walk found the package
    cycle = find_cycle(edges)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_each_layer_imports_only_itself_or_below():
    edges, _ = import_graph()
    upward = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module, targets in sorted(edges.items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "imports going up a layer:\n" + "\n".join(upward)


def test_imports_inside_functions_are_only_the_listed_ones():
    _, lazy = import_graph()
    unexpected = [f"{module}:{line} imports {target}" for module, target, line in lazy if (module, target) not in LAZY_ALLOWED]
    assert not unexpected, "optbundle imports inside functions (move them to the top):\n" + "\n".join(unexpected)
    meta = [(module, line) for module, target, line in lazy if module.startswith("optbundle.store") and target.startswith("optbundle.meta")]
    assert len(meta) == 1, f"the store layer reaches the meta layer once (Bundle.refine), found {meta}"


def test_kernels_read_only_the_step_layer():
    edges, _ = import_graph()
    reads = {target for module, targets in edges.items() if module.startswith("optbundle.kernels") for target in targets}
    assert reads and all(target.startswith(("optbundle.step.", "optbundle.kernels")) for target in reads), sorted(reads)


@pytest.mark.parametrize("folder", ["step", "store", "meta", "apps"])
def test_layer_folders_are_regular_packages_listed_in_pyproject(folder):
    assert (SOURCES["optbundle"] / folder / "__init__.py").is_file()
    assert f'"optbundle.{folder}"' in (ROOT / "pyproject.toml").read_text()
