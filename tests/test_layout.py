"""The package's shape: a few top-level modules and wings in the order the data flows (`tinyllama_ft.WINGS`,
written once), each module importing only from `errors`, its own wing and the wings before it (so nothing
runs back up), no import circle inside a wing, none over ~400 lines. Read from the source with `ast`,
function-level (lazy) imports included. The module paths from before the wings still import."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from conftest import ROOT
from tinyllama_ft import MOVED, WINGS

PACKAGE = ROOT / "tinyllama_ft"
TOP = ["errors", "cli", "__main__"]  # below every wing (errors) and above them all (the command line)
MAX_TOP_MODULES = 6
MAX_LINES = 400


def modules() -> dict[str, Path]:
    """Every module by dotted name inside the package: `errors`, `settings.config`, ..., wings' `__init__`s too."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[0] != "samples" and parts != ("__init__",):
            found[".".join(parts)] = path
    return found


def package_imports(path: Path, name: str) -> set[str]:
    """The package modules that module `name` (at `path`) imports, as dotted names inside the package
    (`from .x import`, `from ..wing.x import`, `from . import x`, `tinyllama_ft.wing.x`), anywhere in it."""
    package = name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
            if node.module:
                found.add(".".join([*base, *node.module.split(".")]))
            else:
                found |= {".".join([*base, alias.name]) if base or (PACKAGE / f"{alias.name}.py").exists()
                          else "__init__" for alias in node.names}  # `from .. import forward_to`: the root
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tinyllama_ft."):
            found.add(node.module.removeprefix("tinyllama_ft."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("tinyllama_ft.") for a in node.names if a.name.startswith("tinyllama_ft.")}
    return {m for m in found if m}


def rank(module: str) -> int:
    """Where a module stands: `errors` and the package root (whose code imports nothing when it runs) lowest,
    then the wings in `WINGS` order, the command line last."""
    first = module.split(".")[0]
    if first in WINGS:
        return 1 + WINGS.index(first)
    return 0 if first in ("errors", "__init__") else 1 + len(WINGS)


def test_the_top_level_holds_a_few_modules_and_the_rest_sit_in_wings():
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES and set(top) == {"__init__", *TOP}, top
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert folders == sorted(WINGS), f"a wing missing from WINGS, or a WINGS entry without a folder: {folders}"


def test_every_wing_says_what_it_does_in_one_line():
    for wing in WINGS:
        doc = ast.get_docstring(ast.parse((PACKAGE / wing / "__init__.py").read_text(encoding="utf-8")))
        assert doc and "\n" not in doc.strip(), f"{wing}/__init__.py: a one-line docstring saying what the wing does"


def test_no_module_imports_from_a_wing_above_its_own():
    upward = {}
    for name, path in modules().items():
        above = sorted(m for m in package_imports(path, name) if rank(m) > rank(name))
        if above:
            upward[name] = above
    assert not upward, f"imports of a wing above the importer's own (WINGS: {', '.join(WINGS)}): {upward}"


def test_no_import_circle_inside_a_wing():
    """Inside a wing, modules import one another in one direction: the graph has an order (Kahn's algorithm)."""
    graph = {name: {m for m in package_imports(path, name) if m in modules() and m != name}
             for name, path in modules().items() if not name.endswith("__init__")}
    remaining = dict(graph)
    while remaining:
        ready = [name for name, needs in remaining.items() if not needs & set(remaining)]
        assert ready, f"import circle among {sorted(remaining)}"
        for name in ready:
            del remaining[name]


def test_the_package_root_imports_nothing_eagerly():
    """`import tinyllama_ft` loads no stage (torch, TRL): its names are imported on first use."""
    assert package_imports(PACKAGE / "__init__.py", "__init__") == set()


def test_no_module_is_over_400_lines():
    lines = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules().items()}
    long = {name: n for name, n in lines.items() if n > MAX_LINES}
    assert not long, f"split these modules: {long}"


def test_the_architecture_page_lists_the_wings_in_their_order():
    page = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = page.split("\n## The wings", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\|\s*`?([a-z_]+)/?`?\s*\|", section, flags=re.M)[1:]  # the first is the header
    assert listed == list(WINGS), f"docs/ARCHITECTURE.md's table of wings must follow WINGS: {listed}"


@pytest.mark.parametrize("old", sorted(MOVED))
def test_module_paths_from_before_the_wings_import_the_moved_module(old):
    """`from tinyllama_ft.train import Run` (the notebook's and the README's form before the wings) keeps
    working, and gives the very module, so that a patch through the old path reaches the code."""
    assert importlib.import_module(f"tinyllama_ft.{old}") is importlib.import_module(f"tinyllama_ft.{MOVED[old]}")


def test_wings_named_like_an_old_module_forward_its_names():
    from tinyllama_ft.bench import assets_dir
    from tinyllama_ft.data import category_counts, prepare_data
    from tinyllama_ft.export import export_merged

    assert prepare_data.__module__ == "tinyllama_ft.data.prepare" and category_counts.__module__ == prepare_data.__module__
    assert export_merged.__module__ == "tinyllama_ft.export.merged"
    assert assets_dir.__module__ == "tinyllama_ft.bench.compare"
    from tinyllama_ft.data import formats  # a submodule is imported as one, not looked up in `prepare`

    assert formats.__name__ == "tinyllama_ft.data.formats"
    with pytest.raises(ImportError):
        from tinyllama_ft.data import no_such_name  # noqa: F401


def test_the_public_api_and_the_old_train_module_agree():
    import tinyllama_ft
    from tinyllama_ft.train import STAGES, Run
    from tinyllama_ft.training.sft import STAGES as stages, Run as run

    assert (Run, STAGES) == (run, stages)
    assert callable(tinyllama_ft.train) and tinyllama_ft.train.__module__ == "tinyllama_ft.training.sft"
