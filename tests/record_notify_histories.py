"""Record the notification workflows' histories for the replay test:
``python -m tests.record_notify_histories`` (see tests/record_histories.py for the rules).

Writes ``tests/histories/notify.json`` (two refused attempts, then delivered),
``notify_given_up.json`` (never accepted: recorded failed) and ``notifications_dispatch.json``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from pathlib import Path

from temporalio.client import WorkflowHistory

from billing.db.pool import open_pool
from billing.models.notify import DeliveryResult, DispatchInput, DispatchResult, NotifyInput
from billing.testing.scratch import scratch_database, throwaway_temporal_server
from tests.conftest import make_settings, running_worker
from tests.factories import make_org
from tests.notify_receiver import Receiver
from workflows.notify import NotificationDispatchWorkflow, NotifyWorkflow

HISTORIES = Path(__file__).resolve().parent / "histories"
SECRET = "whsec_" + base64.b64encode(b"notify-secret-of-the-histories").decode()


def _save(name: str, history: WorkflowHistory) -> Path:
    path = HISTORIES / f"{name}.json"
    path.write_text(json.dumps(json.loads(history.to_json()), indent=1) + "\n")
    return path


async def record() -> list[Path]:
    """Run the three scenarios on a dev server and database of their own."""
    async with throwaway_temporal_server() as env:
        with scratch_database() as url:
            pool = await open_pool(url, max_size=5)
            try:
                org = await make_org(pool, payment_status="past_due")  # one notification, recorded
                async with pool.connection() as conn:
                    await conn.execute(
                        "UPDATE organization_billing SET plan = 'pro' WHERE organization_id = %s", [org.id]
                    )
                    rows = await (
                        await conn.execute(
                            "SELECT id FROM notifications WHERE organization_id = %s ORDER BY id", [org.id]
                        )
                    ).fetchall()
                first, second = (row["id"] for row in rows)
                with Receiver(refuse_first=2) as receiver:
                    settings = make_settings(
                        url, env.client, BILLING_NOTIFY_URL=receiver.url, BILLING_NOTIFY_SECRET=SECRET
                    )
                    async with running_worker(settings, pool, env.client):
                        delivered = await env.client.start_workflow(
                            NotifyWorkflow.run,
                            NotifyInput(notification_id=first, first_retry_seconds=0.2),
                            id=f"notify/{first}",
                            task_queue=settings.task_queue,
                            result_type=DeliveryResult,
                        )
                        await delivered.result()
                        receiver.refuse_first = 1_000
                        given_up = await env.client.start_workflow(
                            NotifyWorkflow.run,
                            NotifyInput(
                                notification_id=second, first_retry_seconds=0.2, give_up_after_hours=2 / 3600
                            ),
                            id=f"notify/{second}",
                            task_queue=settings.task_queue,
                            result_type=DeliveryResult,
                        )
                        await given_up.result()
                        dispatch = await env.client.start_workflow(
                            NotificationDispatchWorkflow.run,
                            DispatchInput(),
                            id=f"notifications-dispatch-{uuid.uuid4().hex[:8]}",
                            task_queue=settings.task_queue,
                            result_type=DispatchResult,
                        )
                        await dispatch.result()
                        return [
                            _save("notify", await delivered.fetch_history()),
                            _save("notify_given_up", await given_up.fetch_history()),
                            _save("notifications_dispatch", await dispatch.fetch_history()),
                        ]
            finally:
                await pool.close()


if __name__ == "__main__":
    for saved in asyncio.run(record()):
        print(f"recorded {saved}")
