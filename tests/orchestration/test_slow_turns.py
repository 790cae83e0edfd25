"""Workspace operations that cannot be made on the event loop take turns per key: while the
first caller makes, in a thread, what the others wait for (a run's base), they wait on the event
loop and then make theirs there, instead of each waiting in a thread of its own."""

from __future__ import annotations

import threading
import time

import anyio
import pytest

from orchestration.context import SlowTurns
from orchestration.runner import quick_or_thread
from orchestration.workspace import BaseNotReady, WouldBlock

pytestmark = pytest.mark.anyio


class _Base:
    """A base the first caller checks out (slowly, in a thread); quick once it is there."""

    def __init__(self) -> None:
        self.ready = False
        self.lock = threading.Lock()
        self.threads: list[str] = []
        self.quick: list[str] = []
        self.refused = 0  # quick tries that found the base not ready

    def make(self, who: str, wait: bool) -> str:
        if not wait:
            if not self.ready or self.lock.locked():
                self.refused += 1
                raise BaseNotReady("the base is not checked out yet")
            self.quick.append(who)
            return who
        assert threading.current_thread() is not threading.main_thread()
        with self.lock:
            if not self.ready:
                time.sleep(0.05)
                self.ready = True
        self.threads.append(who)
        return who


async def _all(base: _Base, turns: SlowTurns | None, key: str = "c") -> list[str]:
    made: list[str] = []

    async def one(n: int) -> None:
        made.append(await quick_or_thread(lambda wait: base.make(f"a{n}", wait), None, turns, key))

    async with anyio.create_task_group() as tg:
        for n in range(8):
            tg.start_soon(one, n)
    return made


async def test_callers_of_one_key_wait_for_the_first_instead_of_taking_threads() -> None:
    base, turns = _Base(), SlowTurns()
    made = await _all(base, turns)
    assert sorted(made) == sorted(f"a{n}" for n in range(8))
    assert len(base.threads) == 1, base.threads  # the checkout; the rest made on the loop
    assert len(base.quick) == 7
    assert turns.waiting() == 0  # no lock kept once nobody holds or waits for one
    # the first caller's two tries (before its turn and in it); the others wait for their
    # turns without a try that would fail
    assert base.refused == 2


async def test_without_turns_every_blocked_caller_takes_a_thread() -> None:
    base = _Base()
    made = await _all(base, None)
    assert sorted(made) == sorted(f"a{n}" for n in range(8))
    assert len(base.threads) == 8


async def test_what_is_slow_for_another_reason_still_runs_in_threads_side_by_side() -> None:
    """A worktree's checkout is slow whatever the others do: those go to threads at once, all
    eight together (each waits at a barrier for the seven others)."""
    turns = SlowTurns()
    met = threading.Barrier(8, timeout=10)

    def make(who: str, wait: bool) -> str:
        if not wait:
            raise WouldBlock("a worktree's checkout takes time")
        met.wait()
        return who

    made: list[str] = []

    async def one(n: int) -> None:
        made.append(await quick_or_thread(lambda wait: make(f"a{n}", wait), None, turns, "c"))

    async with anyio.create_task_group() as tg:
        for n in range(8):
            tg.start_soon(one, n)
    assert sorted(made) == sorted(f"a{n}" for n in range(8))
    assert turns.waiting() == 0


async def test_other_keys_do_not_wait_for_each_other() -> None:
    turns = SlowTurns()
    order: list[str] = []

    async def hold(key: str, delay: float) -> None:
        async with turns.of(key):
            await anyio.sleep(delay)
            order.append(key)

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold, "slow", 0.2)
        await anyio.sleep(0.01)
        tg.start_soon(hold, "fast", 0.0)
    assert order == ["fast", "slow"]
    assert turns.waiting() == 0
