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


# --- resize (a reload's new limits) ---------------------------------------------------------
async def test_raising_the_limit_admits_queued_waiters_at_once_in_order() -> None:
    admission = Admission(limit=1, queue=3)
    release = asyncio.Event()
    entered: list[str] = []
    tasks = [asyncio.create_task(_hold(admission, entered, n, release)) for n in "abcd"]
    await _settle()
    assert entered == ["a"]
    admission.resize(3, 3)  # no request left: the new room goes to the oldest waiters
    await _settle()
    assert entered == ["a", "b", "c"]
    assert admission.in_flight == 3
    release.set()
    await asyncio.gather(*tasks)
    assert entered == ["a", "b", "c", "d"]
    assert admission.in_flight == 0


async def test_raising_the_limit_skips_a_waiter_that_already_left() -> None:
    admission = Admission(limit=1, queue=3)
    release = asyncio.Event()
    entered: list[str] = []
    holder = asyncio.create_task(_hold(admission, entered, "holder", release))
    await _settle()
    leaver = asyncio.create_task(_hold(admission, entered, "leaver", release))
    stayer = asyncio.create_task(_hold(admission, entered, "stayer", release))
    await _settle()
    leaver.cancel()  # its waiter is cancelled; its task has not run yet...
    admission.resize(2, 3)  # ...when the new room is handed out: it goes to "stayer"
    await _settle()
    assert entered == ["holder", "stayer"]
    assert admission.in_flight == 2
    release.set()
    await asyncio.gather(holder, stayer)
    assert admission.in_flight == 0
    with pytest.raises(asyncio.CancelledError):
        await leaver


async def test_lowering_the_limit_lets_in_flight_finish_and_admits_none_beyond_it() -> None:
    admission = Admission(limit=3, queue=3)
    gates = {name: asyncio.Event() for name in ("a", "b", "c", "late")}
    entered: list[str] = []
    first = [asyncio.create_task(_hold(admission, entered, n, gates[n])) for n in "abc"]
    await _settle()
    assert admission.in_flight == 3
    admission.resize(1, 3)
    assert admission.in_flight == 3  # nobody is thrown out
    late = asyncio.create_task(_hold(admission, entered, "late", gates["late"]))
    await _settle()
    assert entered == ["a", "b", "c"]  # over the new limit: it waits
    for name, in_flight in (("a", 2), ("b", 1)):
        gates[name].set()
        await _settle()
        assert entered == ["a", "b", "c"]  # still at or over the limit: nothing admitted
        assert admission.in_flight == in_flight
    gates["c"].set()  # the last of the old requests leaves: now there is room for one
    await _settle()
    assert entered == ["a", "b", "c", "late"]
    assert admission.in_flight == 1
    gates["late"].set()
    await asyncio.gather(*first, late)
    assert admission.in_flight == 0


async def test_lowering_the_queue_to_zero_refuses_newcomers_at_once() -> None:
    admission = Admission(limit=1, queue=5)

    async def enter() -> None:
        async with admission:
            pass

    async with admission:
        admission.resize(1, 0)
        with pytest.raises(Rejection) as caught:
            await asyncio.wait_for(enter(), 1)  # refused, not queued
        assert caught.value.reason is Reason.UPSTREAM_OVERLOADED
    assert admission.in_flight == 0
