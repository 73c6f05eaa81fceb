"""Layers only point down: pipeline -> stages -> storage, checked on the source (every import,
function-local ones included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ORDER = ("storage", "stages", "pipeline")  # a layer may import only those before it


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        # `from kdcache import pipeline` names the layer in the alias, not the module.
        return [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return []


def upward_imports(layer: str, root: Path = REPO) -> list[str]:
    """`file:line imports kdcache.X` for every import of a layer above `layer`."""
    above = ORDER[ORDER.index(layer) + 1 :]
    found = []
    for path in sorted((root / layer).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for name in _imported(node):
                parts = name.split(".")
                if parts[0] == "kdcache" and len(parts) > 1 and parts[1] in above:
                    rel = path.relative_to(root).as_posix()
                    found.append(f"{rel}:{node.lineno} imports {name}")
                    break
    return found


@pytest.mark.parametrize("layer", ORDER)
def test_layers_only_import_downward(layer):
    assert upward_imports(layer) == []


def test_the_check_sees_function_local_and_from_imports(tmp_path):
    (tmp_path / "storage").mkdir()
    (tmp_path / "storage" / "x.py").write_text(
        "import kdcache.storage.fsio\n"
        "def f():\n"
        "    from kdcache.stages.common.data import get_batch\n"
        "    from kdcache import pipeline\n"
    )
    assert upward_imports("storage", tmp_path) == [
        "storage/x.py:3 imports kdcache.stages.common.data",
        "storage/x.py:4 imports kdcache.pipeline",
    ]
