"""The pace shared by the agents calling one model API: nothing until the API refuses a request
for its rate limit; then a pause for everyone, and requests spaced, in the order they came."""

from __future__ import annotations

import contextlib

import anyio
import pytest

from orchestration.errors import ModelOverloaded, ModelRateLimited
from orchestration.rate_gate import FIRST_SPACING_SHARE, SLOW_DOWN, SPEED_UP, RateGate

pytestmark = pytest.mark.anyio


class Clock:
    """A clock that moves only when a request sleeps (so the figures are exact)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await anyio.lowlevel.checkpoint()


def _gate(clock: Clock, max_pause_s: float | None = None) -> RateGate:
    return RateGate(clock=clock, sleep=clock.sleep, max_pause_s=max_pause_s)


async def ok() -> str:
    return "ok"


def refusal(retry_after_s: float | None) -> ModelRateLimited:
    return ModelRateLimited("429", retry_after_s=retry_after_s)


async def _refuse(gate: RateGate, retry_after_s: float | None) -> None:
    async def refused() -> str:
        raise refusal(retry_after_s)

    with pytest.raises(ModelRateLimited):
        await gate.call(refused)


async def test_requests_leave_at_once_until_the_api_refuses_one() -> None:
    clock = Clock()
    gate = _gate(clock)
    for _ in range(5):
        assert await gate.call(ok) == "ok"
    with pytest.raises(ModelOverloaded):  # (only the rate limit paces)

        async def overloaded() -> str:
            raise ModelOverloaded("529")

        await gate.call(overloaded)
    assert await gate.call(ok) == "ok"
    assert clock.sleeps == [] and not gate.paced


async def test_a_refusal_pauses_everyone_then_they_leave_spaced_in_their_order() -> None:
    clock = Clock()
    gate = _gate(clock)
    await _refuse(gate, 2.0)
    assert gate.paced and gate.refusals == 1
    left: list[tuple[int, float]] = []

    async def request(i: int) -> None:
        async def send() -> None:
            left.append((i, clock.now))

        await gate.call(send)

    async with anyio.create_task_group() as tg:
        for i in range(4):
            tg.start_soon(request, i)
            await anyio.lowlevel.checkpoint()  # (each comes after the one before)
    spacing = FIRST_SPACING_SHARE * 2.0
    times = [t - 100.0 for _, t in left]
    assert [i for i, _ in left] == [0, 1, 2, 3]
    assert times[0] == pytest.approx(2.0)  # the pause the refusal asked for
    for before, after, k in zip(times, times[1:], range(1, 4), strict=False):
        # each let through narrows the spacing the next one keeps
        assert after - before == pytest.approx(spacing * SPEED_UP**k)


async def test_a_refusal_at_the_pace_widens_it_and_requests_let_through_narrow_it_away() -> None:
    clock = Clock()
    gate = _gate(clock)
    await _refuse(gate, 1.0)
    first = FIRST_SPACING_SHARE * 1.0
    await gate.call(ok)  # it waits out the pause, at the first pace
    await _refuse(gate, 1.0)  # sent at that pace: too fast
    assert gate.refusals == 2
    widened = SLOW_DOWN * first * SPEED_UP
    assert gate._spacing == pytest.approx(widened)  # pyright: ignore[reportPrivateUsage]
    for _ in range(200):
        await gate.call(ok)
    assert not gate.paced  # narrowed away, the pause long over


async def test_refusals_of_requests_sent_before_the_pace_changed_widen_it_once() -> None:
    """Requests in flight together when the first refusal comes are refused alike: that says
    nothing of the new pace, which they did not keep."""
    clock = Clock()
    gate = _gate(clock)
    gates_open = anyio.Event()

    async def refused() -> str:
        await gates_open.wait()
        raise refusal(1.0)

    async def one() -> None:
        with pytest.raises(ModelRateLimited):
            await gate.call(refused)

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(one)
        await anyio.wait_all_tasks_blocked()
        gates_open.set()
    assert gate.refusals == 5
    assert gate._spacing == pytest.approx(FIRST_SPACING_SHARE)  # pyright: ignore[reportPrivateUsage]


async def test_a_pause_is_the_retry_after_up_to_the_cap_or_a_second_without_one() -> None:
    clock = Clock()
    gate = _gate(clock, max_pause_s=3.0)
    await _refuse(gate, 120.0)
    await gate.call(ok)
    assert clock.sleeps == [pytest.approx(3.0)]
    clock2 = Clock()
    gate2 = _gate(clock2)
    await _refuse(gate2, None)
    await gate2.call(ok)
    assert clock2.sleeps == [pytest.approx(1.0)]


async def test_a_refusal_while_others_wait_pauses_them_again() -> None:
    clock = Clock()
    gate = _gate(clock)
    await _refuse(gate, 1.0)
    left: list[float] = []
    refused_once = False

    async def send() -> None:
        nonlocal refused_once
        if not refused_once:
            refused_once = True
            raise refusal(5.0)
        left.append(clock.now - 100.0)

    async def request() -> None:
        with contextlib.suppress(ModelRateLimited):
            await gate.call(send)

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(request)
            await anyio.lowlevel.checkpoint()
    # the first left at 1.0 and was refused for 5 s: the two after it leave from 6.0 on
    assert len(left) == 2 and min(left) >= 6.0
