"""The package's layers, read from the source's imports: no module imports a higher layer (not even
lazily inside a function), and the import graph has no circles, between modules or packages.

Imports under `if TYPE_CHECKING:` are annotations only and do not count. README, "Layout", names
each folder's concern.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "sd3train"

# Lowest first. A module belongs to the longest prefix listed; an import may go to its own layer
# or any below, never above.
LAYERS = (
    ("foundation", ("sd3train.paths", "sd3train.durable", "sd3train.runtime")),
    ("data", ("sd3train.data",)),
    ("config", ("sd3train.config",)),
    ("model", ("sd3train.model", "sd3train.diffusion", "sd3train.eval", "sd3train.inference")),
    ("checkpoint", ("sd3train.checkpoint",)),
    ("lit", ("sd3train.lit",)),
    ("entry", ("sd3train.train", "sd3train.sample", "sd3train.evaluate", "sd3train.export", "sd3train.submit", "sd3train.cli",
               "sd3train.study", "sd3train.studies",
               "sd3train.curation", "sd3train.tools", "sd3train.bench")),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    matches = [(len(prefix), index) for index, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    if module == "sd3train" or not matches:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to the README's Layout)")
    return max(matches)[1]


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_modules(path: Path) -> set[str]:
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py")


def imports_in(source: str, own: str, is_package: bool = False) -> set[str]:
    """The sd3train modules the source of module `own` imports anywhere (module level or inside
    functions), except under `if TYPE_CHECKING:`; `from package import name` counts `package.name`
    when that is a module."""
    tree = ast.parse(source)
    package = own if is_package else own.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in found if name.startswith("sd3train") and _exists(name)}


def _exists(module: str) -> bool:
    relative = PACKAGE.parent / Path(*module.split("."))
    return relative.with_suffix(".py").is_file() or (relative / "__init__.py").is_file()


def _with_parent_packages(modules: set[str], importer: str) -> set[str]:
    """Importing `a.b.c` runs `a.b`'s __init__ too. Left out: the root package's (empty) and the
    importer's own packages, whose __init__ runs before the importer whatever it imports."""
    own = {".".join(importer.split(".")[:end]) for end in range(1, importer.count(".") + 2)}
    parents = {".".join(name.split(".")[:end]) for name in modules for end in range(2, name.count(".") + 1)}
    return modules | (parents - own)


def lazy_imports(path: Path) -> set[str]:
    """The modules a package imports on first attribute access: the values of its `_LAZY` table."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == "_LAZY" for target in node.targets):
            return {value.value for value in node.value.values if isinstance(value, ast.Constant)}
    return set()


def import_graph(lazy: bool = False) -> dict[str, set[str]]:
    """module -> the sd3train modules importing it runs (with `lazy`, also what its `_LAZY` table names)."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        targets = imported_modules(path) | (lazy_imports(path) if lazy else set())
        graph[name] = _with_parent_packages(targets, name) - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of `graph` (as the names along it), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_every_module_is_in_a_layer_and_imports_only_its_own_layer_or_lower():
    upward = []
    for module, targets in import_graph(lazy=True).items():
        if module == "sd3train":
            continue
        for target in sorted(targets):
            if target != "sd3train" and layer_of(target) > layer_of(module):
                upward.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_module_circles():
    assert _cycle(import_graph()) is None, f"import circle: {' -> '.join(_cycle(import_graph()))}"


def test_no_package_circles():
    def package_of(module: str) -> str:
        return ".".join(module.split(".")[:2])

    graph: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        graph.setdefault(package_of(module), set()).update(
            package_of(target) for target in targets if package_of(target) != package_of(module))
    assert _cycle(graph) is None, f"package circle: {' -> '.join(_cycle(graph))}"


@pytest.mark.parametrize("source, expected", [
    # The negative controls: what the checks above must catch.
    ("def build():\n    from sd3train.checkpoint.files import read_json\n", {"sd3train.checkpoint.files"}),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from sd3train.config.schema import DataConfig\n",
     set()),
    ("from sd3train.data import tar_reader\n", {"sd3train.data", "sd3train.data.tar_reader"}),
    ("from ..checkpoint import files\n", {"sd3train.checkpoint", "sd3train.checkpoint.files"}),
])
def test_lazy_imports_count_and_type_checking_imports_do_not(source, expected):
    assert imports_in(source, "sd3train.model.probe") == expected


def test_a_package_init_and_a_lazy_table_count_as_imports():
    graph = import_graph(lazy=True)
    assert "sd3train.config" in graph["sd3train.model.vae"]  # via sd3train.config.schema
    assert "sd3train.checkpoint.transformer_loader" in graph["sd3train.checkpoint"]


def test_an_upward_import_and_a_circle_are_found():
    model, files = "sd3train.model.mmdit", "sd3train.checkpoint.files"
    assert layer_of(files) > layer_of(model)
    assert _cycle({model: {files}, files: {model}}) == [files, model, files]
    assert _cycle({model: {files}, files: set()}) is None
