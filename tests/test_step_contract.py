"""The step contract (steps/context.py): no step module reaches the engine or the incident.

Walks the imports of every module in oomguard.steps, at any depth inside that package and
including imports made only for type checking, and fails on oomguard.engine or
oomguard.incident: a step gets a StepContext and returns an Outcome, nothing more.
"""

from __future__ import annotations

import ast
from pathlib import Path

import oomguard.steps
from oomguard.steps.context import Outcome

FORBIDDEN = ("oomguard.engine", "oomguard.incident")
STEPS_DIR = Path(oomguard.steps.__file__).parent


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_step_module_imports_the_engine_or_the_incident() -> None:
    modules = sorted(STEPS_DIR.glob("*.py"))
    assert len(modules) >= 12  # the step modules are where this test looks
    offenders = {
        f"{path.name}: {name}"
        for path in modules
        for name in imported_modules(path)
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN)
    }
    assert not offenders, sorted(offenders)


def test_outcomes_are_the_incident_vocabulary() -> None:
    # The values are what step hooks see as OOMGUARD_STEP_OUTCOME (docs/configuration.md).
    assert {o.value for o in Outcome} == {"done", "relief", "failed", "kernel"}
