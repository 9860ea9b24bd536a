"""Record workflow histories for the replay test: ``python -m tests.record_histories``.

Runs a scenario of the org-billing workflow on its own Temporal dev server and a fresh database, and
saves the history as ``tests/histories/org_billing.json``. Commit the file: tests/test_replay.py replays
every history in that folder, so a change that would break running workflows fails the suite. Re-record
only for a deliberate, versioned change (and keep the old file if old runs may still be open).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from billing.db import open_pool
from billing.ids import org_billing_id
from billing.models_billing import OperatorRequest
from billing.org_billing import query_org_billing_state
from billing.temporal import SEARCH_ATTRIBUTES
from tests import stripe_payloads as sp
from tests.conftest import LOCAL_POSTGRES, VENV_BIN, fresh_database
from tests.webhook_support import T0, customer_of, harness, paid_org, subscription_of

HISTORIES = Path(__file__).resolve().parent / "histories"


async def record_org_billing() -> Path:
    """Metered and plan failures (both shapes), a Stripe refusal, operator block/unblock, payments."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(VENV_BIN / "temporal"),
        search_attributes=SEARCH_ATTRIBUTES,
        data_converter=pydantic_data_converter,
        dev_server_log_level="error",
    )
    try:
        with fresh_database(LOCAL_POSTGRES) as url:
            pool = await open_pool(url, max_size=5)
            try:
                org = await paid_org(pool)
                common = {
                    "customer_id": customer_of(org.id),
                    "subscription_id": subscription_of(org.id),
                    "organization_id": org.id,
                }
                metered = sp.invoice(shape="old", billing_reason="subscription_threshold", **common)
                plan = sp.invoice(shape="new", **common)
                events = [
                    sp.subscription_event(
                        "customer.subscription.created", sp.subscription(**common, plan="pro"), created=T0
                    ),
                    sp.invoice_event("invoice.payment_failed", metered, created=T0 + 10),
                    sp.invoice_event("invoice.payment_failed", plan, created=T0 + 20),
                    sp.invoice_event("invoice.paid", plan, created=T0 + 30),
                    sp.invoice_event("invoice.paid", metered, created=T0 + 40),
                ]
                async with harness(url, pool, env.client) as h:
                    for event in events:
                        await h.deliver(event, times=2)
                    await h.settle(org.id)
                    handle = env.client.get_workflow_handle(org_billing_id(org.id))

                    await handle.signal("operator_block", OperatorRequest(reason="recorded block"))
                    await handle.signal("operator_unblock", OperatorRequest(reason="recorded unblock"))
                    for _ in range(200):
                        view = await query_org_billing_state(env.client, org.id)
                        if view is not None and len(view.operator_actions) == 2 and view.queued == 0:
                            break
                        await asyncio.sleep(0.05)
                    history = await handle.fetch_history()
            finally:
                await pool.close()
    finally:
        await env.shutdown()
    HISTORIES.mkdir(exist_ok=True)
    path = HISTORIES / "org_billing.json"
    path.write_text(json.dumps(json.loads(history.to_json()), indent=1) + "\n")
    return path


def main() -> None:
    """Record every history this module knows."""
    print(f"recorded {asyncio.run(record_org_billing())}")


if __name__ == "__main__":
    main()
