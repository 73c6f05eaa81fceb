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


# Tasks are plug-ins (stages/tasks/): outside their modules no code asks which task it runs.
TASK_HOME = ("stages/tasks",)
TASK_SCOPE = ("stages", "pipeline")


def _task_names() -> set[str]:
    from kdcache.stages import tasks

    return set(tasks.names())


def _names_a_task(node: ast.AST, names: set[str]) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in names
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return any(_names_a_task(e, names) for e in node.elts)
    return (isinstance(node, ast.Name) and node.id == "TASK") or (
        isinstance(node, ast.Attribute) and node.attr == "TASK"
    )


def task_name_branches(root: Path = REPO, names: set[str] | None = None) -> list[str]:
    """`file:line` of every comparison with a task's name (or a `TASK` constant) and every dict
    keyed by one, outside the task modules."""
    names = _task_names() if names is None else names
    found = []
    for layer in TASK_SCOPE:
        for path in sorted((root / layer).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel.startswith(TASK_HOME):
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Compare):
                    operands = [node.left, *node.comparators]
                    hit = any(_names_a_task(o, names) for o in operands)
                elif isinstance(node, ast.Dict):
                    hit = any(k is not None and _names_a_task(k, names) for k in node.keys)
                else:
                    continue
                if hit:
                    found.append((rel, node.lineno))
    return [f"{rel}:{line}" for rel, line in sorted(set(found))]


def test_no_code_outside_the_task_modules_compares_a_task_name():
    assert task_name_branches() == []


def test_the_task_rule_sees_comparisons_membership_and_dicts(tmp_path):
    (tmp_path / "stages" / "tasks").mkdir(parents=True)
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "stages" / "x.py").write_text(
        "if task == 'regression':\n    pass\n"
        "ok = task in ('classification', 'other')\n"
        "codec = {'causal-lm': 'sampled'}.get(task)\n"
        "same = cfg.task != lm.TASK\n"
        "fine = task.per_token and name == 'regressions'\n"
    )
    (tmp_path / "stages" / "tasks" / "mine.py").write_text("if task == 'regression':\n    pass\n")
    names = {"classification", "regression", "causal-lm"}
    assert task_name_branches(tmp_path, names) == [
        "stages/x.py:1",
        "stages/x.py:3",
        "stages/x.py:4",
        "stages/x.py:5",
    ]
