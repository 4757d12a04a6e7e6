"""The package's layers (docs/architecture.md): each folder imports only from the layers below it, and a method
never imports another method. Read from the source with ``ast``, so a stray import fails here, not in review.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from xa_lightning.paths import PACKAGE_DIR

FOUNDATION = {"errors", "paths", "weights", "config", "runtime", "benchmarking"}
# folder -> the first-level names it may import from (besides itself and the foundation)
ALLOWED: dict[str, set[str]] = {
    "backbones": set(),
    "plugins": {"backbones"},
    "data": {"backbones"},
    "training": {"backbones"},
    "methods": {"backbones", "plugins", "training", "data"},
    "metrics": set(),
    "callbacks": {"metrics", "training"},
    "reporting": set(),  # tables and plots read run directories, never the code that wrote them
}


def _first_level_imports(file: Path) -> set[str]:
    """``xa_lightning.<name>`` for every ``xa_lightning.<name>...`` import in a file (lazy imports too)."""
    names = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        modules = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module]
        elif isinstance(node, ast.ImportFrom) and node.level:
            continue  # relative imports stay inside their folder
        for module in modules:
            parts = module.split(".")
            if parts[0] == "xa_lightning" and len(parts) > 1:
                names.add(".".join(parts[1:3]) if parts[1] == "methods" and len(parts) > 2 else parts[1])
    return names


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE_DIR.glob("*/**/*.py") if p.parent != PACKAGE_DIR)


@pytest.mark.parametrize("file", _sources(), ids=lambda p: str(p.relative_to(PACKAGE_DIR)))
def test_folder_imports_only_from_lower_layers(file: Path):
    parts = file.relative_to(PACKAGE_DIR).parts
    folder = parts[0]
    if folder not in ALLOWED:
        pytest.skip(f"{folder}/ is not a layered folder")
    own = f"methods.{parts[1]}" if folder == "methods" and len(parts) > 2 else folder
    for name in _first_level_imports(file):
        top = name.split(".")[0]
        if name == own or top == folder and folder != "methods" or top in FOUNDATION:
            continue
        if folder == "methods" and top == "methods":
            assert name == "methods" or name == own, f"{file.name}: a method imports another method ({name})"
            continue
        assert top in ALLOWED[folder], f"{'/'.join(parts)} imports xa_lightning.{name}: {folder}/ may not"


def test_the_check_sees_imports(tmp_path: Path):
    source = tmp_path / "x.py"
    source.write_text(
        "import xa_lightning.metrics.fid\ndef f():\n    from xa_lightning.methods.sun import lit_module\n"
    )
    assert _first_level_imports(source) == {"metrics", "methods.sun"}
