"""A minimal workflow that imports the payment reducer inside Temporal's workflow sandbox.

Used by `test_payment_state.py::test_reducer_imports_inside_the_workflow_sandbox` to prove the reducer
and the event model stay sandbox-safe (no I/O or non-deterministic imports at module level).
"""

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    import pydantic  # noqa: F401  (pass pydantic through, as the real workflows do)

from billing.domain.payment_state import PaymentState, apply_event, apply_operator
from billing.domain.stripe_events import BillingEvent


@workflow.defn
class PaymentReducerProbeWorkflow:
    @workflow.run
    async def run(self, event: BillingEvent) -> str:
        state = apply_event(PaymentState(), event).state
        return apply_operator(state, "block", "probe", at=event.created).state.payment_status
