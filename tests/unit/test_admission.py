"""Per-route admission: the in-flight bound, the bounded queue, hand-offs in order, no leaked slot."""

from __future__ import annotations

import asyncio

import pytest

from gateway.admission import Admission
from gateway.errors import Rejection
from gateway.reasons import Reason


async def _hold(
    admission: Admission, entered: list[str], name: str, release: asyncio.Event
) -> None:
    async with admission:
        entered.append(name)
        await release.wait()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_within_the_limit_requests_enter_at_once_and_leave_no_trace() -> None:
    admission = Admission(limit=2, queue=0)
    async with admission, admission:
        assert admission.in_flight == 2
    assert admission.in_flight == 0


async def test_beyond_limit_and_queue_a_request_is_refused_at_once() -> None:
    admission = Admission(limit=1, queue=1)
    release = asyncio.Event()
    entered: list[str] = []
    first = asyncio.create_task(_hold(admission, entered, "first", release))
    second = asyncio.create_task(_hold(admission, entered, "second", release))
    await _settle()
    with pytest.raises(Rejection) as caught:
        async with admission:
            pass
    assert caught.value.reason is Reason.UPSTREAM_OVERLOADED
    release.set()
    await asyncio.gather(first, second)
    assert entered == ["first", "second"]
    assert admission.in_flight == 0


async def test_a_leaving_request_hands_its_slot_to_the_oldest_waiter() -> None:
    admission = Admission(limit=1, queue=3)
    gates = [asyncio.Event() for _ in range(3)]
    entered: list[str] = []
    tasks = [
        asyncio.create_task(_hold(admission, entered, str(i), gate)) for i, gate in enumerate(gates)
    ]
    await _settle()
    assert entered == ["0"]
    gates[0].set()
    await _settle()
    assert entered == ["0", "1"]  # handed over, in order; the count never dropped
    assert admission.in_flight == 1
    gates[1].set()
    await _settle()
    assert entered == ["0", "1", "2"]
    gates[2].set()
    await asyncio.gather(*tasks)
    assert admission.in_flight == 0


async def test_a_waiter_cancelled_in_the_queue_takes_no_slot() -> None:
    admission = Admission(limit=1, queue=2)
    release = asyncio.Event()
    entered: list[str] = []
    holder = asyncio.create_task(_hold(admission, entered, "holder", release))
    await _settle()
    leaver = asyncio.create_task(_hold(admission, entered, "leaver", release))
    await _settle()
    leaver.cancel()
    await _settle()
    late = asyncio.create_task(_hold(admission, entered, "late", release))
    await _settle()
    release.set()
    await asyncio.gather(holder, late)
    assert leaver.cancelled()
    assert entered == ["holder", "late"]
    assert admission.in_flight == 0


async def test_a_waiter_cancelled_just_after_the_hand_off_passes_the_slot_on() -> None:
    admission = Admission(limit=1, queue=2)
    release = asyncio.Event()
    entered: list[str] = []
    await admission.__aenter__()  # the holder is this test
    unlucky = asyncio.create_task(_hold(admission, entered, "unlucky", release))
    next_in_line = asyncio.create_task(_hold(admission, entered, "next", release))
    await _settle()
    await admission.__aexit__(None, None, None)  # hands the slot to `unlucky` (no suspension)...
    unlucky.cancel()  # ...which is cancelled before it could run
    await _settle()
    assert entered == ["next"]
    assert admission.in_flight == 1
    release.set()
    await next_in_line
    assert admission.in_flight == 0
    with pytest.raises(asyncio.CancelledError):
        await unlucky


async def test_with_no_queue_the_limit_is_a_hard_bound() -> None:
    admission = Admission(limit=1, queue=0)
    async with admission:
        with pytest.raises(Rejection):
            async with admission:
                pass
    async with admission:  # and the slot came back
        assert admission.in_flight == 1


async def test_a_refusal_says_why() -> None:
    admission = Admission(limit=1, queue=0)
    async with admission:
        with pytest.raises(Rejection) as caught:
            async with admission:
                pass
    assert (caught.value.reason, caught.value.detail) == (
        Reason.UPSTREAM_OVERLOADED,
        "in-flight and queue limits reached",
    )


async def test_a_waiter_cancelled_before_a_release_skips_it_gives_back_no_slot() -> None:
    """Cancelled while queued, then passed over by a release before its task runs: it was
    handed nothing, so it passes nothing on; one request in flight, never two."""
    admission = Admission(limit=1, queue=3)
    release = asyncio.Event()
    entered: list[str] = []
    await admission.__aenter__()  # the holder is this test
    cancelled = asyncio.create_task(_hold(admission, entered, "cancelled", release))
    tasks = [asyncio.create_task(_hold(admission, entered, n, release)) for n in ("b", "c")]
    await _settle()
    cancelled.cancel()  # its waiter is cancelled now; its task has not run yet...
    await admission.__aexit__(None, None, None)  # ...when the release skips it, hands to "b"
    await _settle()
    assert entered == ["b"]
    assert admission.in_flight == 1
    release.set()
    await asyncio.gather(*tasks)
    assert entered == ["b", "c"]
    assert admission.in_flight == 0
    with pytest.raises(asyncio.CancelledError):
        await cancelled
