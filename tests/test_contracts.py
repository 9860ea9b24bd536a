"""Workflows, activities, signals, queries and updates are named once: by their class or method.

Workflows call activities through their declarations (billing.models.contracts), callers start
workflows through ``WorkflowClass.run`` and send signals, queries and updates through the handler
methods; no name is written as a string beside its definition. The names themselves are unchanged
(tests/test_replay.py replays the recorded histories).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import billing.cli.wiring as wiring
from billing.models.contracts import CONTRACTS, activity_names

ROOT = Path(__file__).resolve().parent.parent
CODE = [
    path
    for folder in ("workflows", "activities", "api", "bench", "billing")
    for path in sorted((ROOT / folder).rglob("*.py"))
] + [ROOT / "worker.py"]

# A call or decorator that names a workflow, activity or handler by a string.
BY_STRING = {
    "an activity called by name": r"\bexecute_(?:local_)?activity\(",
    "a workflow started by name": r"\b(?:start_workflow|execute_workflow|WithStartWorkflowOperation)\(\s*\"",
    "a signal, query or update sent by name": r"\.(?:signal|query|execute_update|start_update)\(\s*\"",
    "a definition named beside its method": r"@(?:activity\.defn|workflow\.(?:signal|query|update))\(\s*name=",
    "the SDK's private start response": r"_start_workflow_response",
}


@pytest.mark.parametrize("what", sorted(BY_STRING))
def test_nothing_is_named_by_a_string(what: str) -> None:
    pattern = re.compile(BY_STRING[what])
    found = [
        f"{path.relative_to(ROOT)}:{text[: match.start()].count(chr(10)) + 1}"
        for path in CODE
        for text in [path.read_text()]
        for match in pattern.finditer(text)
    ]
    assert found == [], f"{what}: {found}"


def _implementations() -> dict[type, type]:
    """Contract -> the class of activities/ the worker registers for it."""
    classes = [
        obj
        for obj in vars(wiring).values()
        if inspect.isclass(obj) and obj.__module__.startswith("activities.")
    ]
    found: dict[type, type] = {}
    for cls in classes:
        for contract in CONTRACTS:
            if issubclass(cls, contract):
                assert contract not in found, f"{contract.__name__} implemented twice"
                found[contract] = cls
    return found


def test_every_contract_is_implemented_once_method_by_method() -> None:
    implementations = _implementations()
    assert set(implementations) == set(CONTRACTS)
    for contract, implementation in implementations.items():
        names = activity_names(implementation)
        assert names, f"{contract.__name__} declares no activity"
        for name in names:
            declared, implemented = vars(contract)[name], getattr(implementation, name)
            assert implemented is not declared, f"{implementation.__name__}.{name} is not implemented"
            assert inspect.signature(implemented) == inspect.signature(declared), name


def test_activity_names_are_unique() -> None:
    names = [name for contract in CONTRACTS for name in activity_names(contract)]
    assert len(names) == len(set(names))
