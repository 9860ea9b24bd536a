"""Talking to ``org-billing/{org_id}`` from outside Temporal: signal-with-start (Stripe events),
update-with-start (operator block/unblock) and the `state` query.

Shared by the webhook receiver (api/webhooks.py), the CLI (`billing block/unblock/status`) and
GET /v1/orgs/{id}.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Literal

from temporalio.client import Client, WithStartWorkflowOperation, WorkflowQueryFailedError
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDConflictPolicy
from temporalio.service import RPCError, RPCStatusCode

from billing.domain.ids import org_billing_id
from billing.domain.stripe_events import BillingEvent
from billing.models.org_billing import OperatorRequest, OrgBillingInput, OrgBillingView
from billing.models.search_attributes import ORG_ID, PAYMENT_STATUS
from workflows.org_billing import OrgBillingWorkflow

log = logging.getLogger(__name__)

QUERY_TIMEOUT = timedelta(seconds=5)


async def signal_org_billing(
    client: Client,
    task_queue: str,
    org_id: str,
    event: BillingEvent,
    *,
    rpc_timeout: timedelta | None = None,
) -> str:
    """Signal a Stripe event to ``org-billing/{org_id}``, starting it first if it is not running; returns
    its run id.

    Signal-with-start is one atomic request: when it returns, Temporal has durably recorded the
    signal, so the caller may acknowledge (the webhook answers 200 only then).
    """
    handle = await client.start_workflow(
        OrgBillingWorkflow.run,
        OrgBillingInput(org_id=org_id),
        id=org_billing_id(org_id),
        task_queue=task_queue,
        # The SDK takes the signal's name; @workflow.signal names it after its method.
        start_signal=OrgBillingWorkflow.stripe_event.__name__,
        start_signal_args=[event],
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        search_attributes=TypedSearchAttributes(
            [SearchAttributePair(ORG_ID, org_id), SearchAttributePair(PAYMENT_STATUS, "ok")]
        ),
        static_summary=f"Payment state machine of org {org_id}",
        rpc_timeout=rpc_timeout,
    )
    return handle.result_run_id or ""


async def operator_update(
    client: Client,
    task_queue: str,
    org_id: str,
    action: Literal["block", "unblock"],
    request: OperatorRequest,
    *,
    rpc_timeout: timedelta | None = None,
) -> OrgBillingView:
    """`billing block` / `billing unblock`: a Temporal Update of ``org-billing/{org_id}``, starting the
    workflow first if it is not running (update-with-start, one request).

    Returns the org's state once the billing row and the quota flags are committed: the next quota check
    of any project of the org already sees the new status. A retried call with the same
    `request.request_id` is applied once.
    """
    start = WithStartWorkflowOperation(
        OrgBillingWorkflow.run,
        OrgBillingInput(org_id=org_id),
        id=org_billing_id(org_id),
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        search_attributes=TypedSearchAttributes(
            [SearchAttributePair(ORG_ID, org_id), SearchAttributePair(PAYMENT_STATUS, "ok")]
        ),
        static_summary=f"Payment state machine of org {org_id}",
    )
    update = OrgBillingWorkflow.block if action == "block" else OrgBillingWorkflow.unblock
    return await client.execute_update_with_start_workflow(
        update, request, start_workflow_operation=start, rpc_timeout=rpc_timeout
    )


async def query_org_billing_state(client: Client, org_id: str) -> OrgBillingView | None:
    """The org workflow's `state`, or None when it does not exist or cannot answer right now.

    Never raises for a missing workflow or an unresponsive worker: the status of an org must not
    depend on it.
    """
    handle = client.get_workflow_handle(org_billing_id(org_id))
    try:
        return await handle.query(OrgBillingWorkflow.state, rpc_timeout=QUERY_TIMEOUT)
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            log.warning("org-billing/%s did not answer the state query: %s", org_id, exc)
        return None
    except WorkflowQueryFailedError as exc:
        log.warning("org-billing/%s failed the state query: %s", org_id, exc)
        return None
