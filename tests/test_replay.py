"""Replay every recorded history in tests/histories/ against today's workflow code.

A change that would make running workflows non-deterministic (new activities or timers in a different
order, a changed signal handling) fails here. Record histories with ``python -m tests.record_histories``;
anyone may drop more ``<name>.json`` files (a history as ``WorkflowHistory.to_json`` writes it) in the
folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from worker import WORKFLOWS

HISTORIES = sorted((Path(__file__).resolve().parent / "histories").glob("*.json"))


def test_there_is_a_history_to_replay() -> None:
    recorded = {path.stem for path in HISTORIES}
    assert {"org_billing", "monthly_reset", "usage_sync", "stripe_report"} <= recorded


@pytest.mark.parametrize("path", HISTORIES, ids=[path.stem for path in HISTORIES])
async def test_recorded_history_replays(path: Path) -> None:
    text = path.read_text()
    events = json.loads(text)["events"]
    started = events[0]["workflowExecutionStartedEventAttributes"]
    workflow_id = started.get("workflowId") or path.stem
    history = WorkflowHistory.from_json(workflow_id, text)
    replayer = Replayer(workflows=list(WORKFLOWS), data_converter=pydantic_data_converter)
    result = await replayer.replay_workflow(history, raise_on_replay_failure=True)
    assert result.replay_failure is None
