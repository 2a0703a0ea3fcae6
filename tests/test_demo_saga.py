"""The demo's order saga: one compensation per order, whatever answers first.

An order whose payment is declined can also time out: the payment timeout fires while
the capture is still being retried (after a `kill -9`, say, the timeouts are overdue when
the demo starts again). The timeout compensates the order; the decline that comes after
it must not compensate it a second time (issue 13 saw two chains, with different command
ids, for one declined payment).
"""

from __future__ import annotations

import pytest

from sagaflow import RetryPolicy
from sagaflow._demo import (
    PAYMENT_TIMEOUT,
    CancelOrder,
    CapturePayment,
    Order,
    OrderPlaced,
    OrderSaga,
    ReleaseStock,
    StockReserved,
)
from sagaflow.testing import Scenario

# Long enough that the payment timeout falls due between the capture's two attempts.
SLOW_RETRY = RetryPolicy(max_attempts=2, initial_delay=4 * PAYMENT_TIMEOUT, jitter=False)


@pytest.mark.anyio
async def test_a_decline_after_the_payment_timeout_compensates_once() -> None:
    async with Scenario(OrderSaga, state=Order, saga="order", retry=SLOW_RETRY) as scenario:
        scenario.fail(CapturePayment)
        await scenario.given(OrderPlaced("o3", 103))
        await scenario.when(StockReserved("o3"))  # the capture fails, a retry waits
        assert (scenario.sent, scenario.compensations) == ([CapturePayment("o3", 103)], [])
        await scenario.advance(PAYMENT_TIMEOUT)  # the timeout compensates, behind it
        assert (scenario.sent, scenario.compensations) == ([], [])
        await scenario.advance(4 * PAYMENT_TIMEOUT)  # the capture fails for good
        assert scenario.compensations == [ReleaseStock("o3"), CancelOrder("o3", "timeout")]
        assert (scenario.completed, scenario.status) == (True, None)  # ended
        assert scenario.dead_letters == []


@pytest.mark.anyio
async def test_a_decline_before_the_payment_timeout_compensates_once() -> None:
    async with Scenario(OrderSaga, state=Order, saga="order") as scenario:
        scenario.fail(CapturePayment)
        await scenario.given(OrderPlaced("o3", 103))
        await scenario.when(StockReserved("o3"))  # declined for good at once
        assert scenario.compensations == [ReleaseStock("o3"), CancelOrder("o3", "declined")]
        await scenario.advance(2 * PAYMENT_TIMEOUT)  # the timeout was cancelled
        assert (scenario.sent, scenario.compensations) == ([], [])
        assert scenario.dead_letters == []
