"""Replay every recorded history in tests/histories/ against today's workflow code.

A change that would make running workflows non-deterministic (new activities or timers in a different
order, a changed signal handling) fails here. Record histories with ``python -m tests.record_histories``;
anyone may drop more ``<name>.json`` files (a history as ``WorkflowHistory.to_json`` writes it) in the
folder.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from worker import WORKFLOWS

HISTORIES = sorted((Path(__file__).resolve().parent / "histories").glob("*.json"))


def _events(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["events"]


def test_every_workflow_type_has_a_recorded_history() -> None:
    recorded = {
        _events(path)[0]["workflowExecutionStartedEventAttributes"]["workflowType"]["name"]
        for path in HISTORIES
    }
    assert recorded == {workflow.__name__ for workflow in WORKFLOWS}


def test_failure_paths_are_recorded_too() -> None:
    """Not only happy paths: an activity that failed and was retried, and a continue-as-new that
    carried queued signals into the next run."""
    retried = [
        path.stem
        for path in HISTORIES
        for event in _events(path)
        if int(event.get("activityTaskStartedEventAttributes", {}).get("attempt", 1)) > 1
    ]
    assert "monthly_reset_retried" in retried
    carried = {}
    for path in HISTORIES:
        attributes = _events(path)[-1].get("workflowExecutionContinuedAsNewEventAttributes")
        if attributes is not None:
            data = json.loads(base64.b64decode(attributes["input"]["payloads"][0]["data"]))
            carried[path.stem] = len(data.get("queue", []))
    assert carried.get("org_billing_continued", 0) > 0, carried


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
