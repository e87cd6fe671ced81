"""The package's shape: modules in the order the data flows, each importing only modules before it (so
there is no import circle, and nothing runs back up), none over ~400 lines. Read from the source with
`ast`, function-level (lazy) imports included."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "tinyllama_ft"
# Lowest first: a module may import only the modules listed before it.
LAYERS = ["errors", "files", "timings", "validation", "config_sources", "formats", "memory", "precision", "config", "encoding",
          "data", "preference_data", "chat_template", "modeling", "batching", "tables", "generation", "evaluate",
          "preference_eval", "card", "fingerprint", "run_folder", "lm_head", "train", "saved_model", "dpo", "export",
          "gguf_export", "chat", "api", "serve", "plots", "harness", "bench", "bench_worker", "cli", "__main__"]
MAX_LINES = 400


def package_imports(path: Path) -> set[str]:
    """The package modules `path` imports (`from .x import`, `from . import x`, `tinyllama_ft.x`), anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1 and module:
                found.add(module.split(".")[0])
            elif node.level == 1:
                found |= {alias.name for alias in node.names}
            elif module.startswith("tinyllama_ft."):
                found.add(module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("tinyllama_ft.")}
    return found


def test_every_module_is_placed_in_the_layers():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(LAYERS), f"add new modules to LAYERS: {sorted(modules ^ set(LAYERS))}"


def test_modules_import_only_modules_before_them():
    upward = {}
    for name in LAYERS:
        later = {m for m in package_imports(PACKAGE / f"{name}.py") if m in LAYERS[LAYERS.index(name):]}
        if later:
            upward[name] = sorted(later)
    assert not upward, f"imports of a module at or after the importer's place in LAYERS: {upward}"


def test_the_package_root_imports_nothing_eagerly():
    """`import tinyllama_ft` loads no stage (torch, TRL): its names are imported on first use."""
    assert package_imports(PACKAGE / "__init__.py") == set()


def test_no_module_is_over_400_lines():
    lines = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.glob("*.py")}
    long = {name: n for name, n in lines.items() if n > MAX_LINES}
    assert not long, f"split these modules: {long}"
