"""`Wakeups.changes` read as the cursor moves: only the events after the last read are queried,
and the answer is the same as a fresh read of everything after `since`."""

from __future__ import annotations

from itertools import product
from pathlib import Path
from typing import Any

import anyio
import pytest

from orchestration.attention import WakeOn, run_attention
from orchestration.contracts import AgentStatus, StopReason
from orchestration.records import scope_requests
from orchestration.state import EventKind, StateStore
from orchestration.wakeup import Wakeups
from tests.orchestration.test_state import _agent, _run  # pyright: ignore[reportPrivateUsage]
from toolbus.lease_store import Lease, LeaseMode


async def _no_leases() -> list[Lease]:
    return []


def _wakeups(store: StateStore) -> Wakeups:
    return Wakeups(store, _no_leases, lambda _paths: [])


def test_changes_as_the_cursor_moves_match_a_fresh_read(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    wakeups = _wakeups(store)
    since = store.record_event("r1", "a1", EventKind.RUNNING, "")
    steps = [
        ("r1", "a2", EventKind.TURN),
        ("r2", "b1", EventKind.RUNNING),
        ("r1", "a1", EventKind.SUCCEEDED),
        ("r1", None, EventKind.RUN_CREATED),
        ("r2", "b1", EventKind.TURN),
    ]
    for run_id, agent_id, kind in steps:
        store.record_event(run_id, agent_id, kind, "")
        cursor = store.cursor()
        for run in (None, "r1", "r2"):
            got = wakeups.changes(since, run, cursor)
            fresh = _wakeups(store).changes(since, run, cursor)
            assert (got.agents, got.kinds) == (fresh.agents, fresh.kinds)
    # an earlier cursor, asked after a later one, is read whole
    early = _wakeups(store).changes(since, "r1", since + 1)
    assert wakeups.changes(since, "r1", since + 1) == early
    assert early.agents == {"a2"} and early.kinds == {"turn"}
    store.close()


def test_settled_answers_as_the_whole_attention_question(tmp_path: Path) -> None:
    """`settled` skips the attention question (the lease table included) while an agent runs
    or is queued; for every pair of statuses it answers as that question does."""
    for n, (first, second) in enumerate(product(list(AgentStatus), repeat=2)):
        store = StateStore(tmp_path / f"s{n}")
        store.create_run(_run(), [_agent("a1"), _agent("a2", index=2)])
        store.apply("a1", EventKind.TURN, status=first)
        store.apply("a2", EventKind.TURN, status=second)
        cursor = store.cursor()
        whole = anyio.run(_wakeups(store).attention, "r1", cursor)
        assert anyio.run(_wakeups(store).settled, "r1", cursor) == whole.settled, (first, second)
        assert anyio.run(_wakeups(store).settled, None, cursor) == whole.settled, (first, second)
        store.close()


def test_attention_reads_past_its_run_only_for_a_waiting_agent(tmp_path: Path) -> None:
    """Another run's agent holds the scope of the run's agents. For every pair of statuses the
    answer is the one from every agent and the whole lease table, and that table is read only
    when an agent of the run waits."""
    held = [Lease(holder="b1", token=1, resource="src", mode=LeaseMode.WRITE, expires_at=1e12)]
    reads: list[int] = []

    async def leases() -> list[Lease]:
        reads.append(1)
        return held

    for n, (first, second) in enumerate(product(list(AgentStatus), repeat=2)):
        store = StateStore(tmp_path / f"s{n}")
        mine = [
            a.model_copy(update={"write_scope": ["src/x"]})
            for a in (_agent("a1"), _agent("a2", index=2))
        ]
        store.create_run(_run(), mine)
        store.create_run(_run("r2"), [_agent("b1", run_id="r2")])
        store.apply("b1", EventKind.SUCCEEDED, status=AgentStatus.SUCCEEDED, commit="c" * 40)
        store.apply("a1", EventKind.TURN, status=first)
        store.apply("a2", EventKind.TURN, status=second)
        cursor = store.cursor()
        reads.clear()
        got = anyio.run(Wakeups(store, leases, scope_requests).attention, "r1", cursor)
        every = {a.agent_id: a for r in ("r1", "r2") for a in store.agents(r)}
        whole = run_attention("r1", store.agents("r1"), every, held, scope_requests)
        assert got == whole, (first, second)
        assert bool(reads) == (AgentStatus.WAITING in (first, second)), (first, second)
        store.close()


def _count_reads(store: StateStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The agents `store.agent` reads from now on, in order (the list grows as it reads)."""
    looked: list[str] = []
    agent = store.agent

    def counted(agent_id: str) -> Any:
        looked.append(agent_id)
        return agent(agent_id)

    monkeypatch.setattr(store, "agent", counted)
    return looked


def test_an_agent_out_of_budget_wakes_the_poll_while_others_run(tmp_path: Path) -> None:
    """A long-poll waiting for the run to settle wakes when one of its agents, in this run or
    (without a run id) in any, stopped for the budget, though others still run; an agent that
    finished otherwise does not wake it."""
    store = StateStore(tmp_path)
    store.create_run(_run(), [_agent(f"a{n}", index=n) for n in range(1, 6)])
    for n in range(1, 6):
        store.apply(f"a{n}", EventKind.RUNNING, status=AgentStatus.RUNNING)
    since = store.cursor()
    store.mark_final(
        "a2", AgentStatus.SUCCEEDED, "done", stop_reason=StopReason.FINISHED, reason=None
    )
    done = store.cursor()
    store.mark_final(
        "a4", AgentStatus.FAILED, "out", stop_reason=StopReason.BUDGET_EXHAUSTED, reason="budget"
    )
    out = store.cursor()
    for run in ("r1", None):
        wakeups = _wakeups(store)
        assert not anyio.run(wakeups.wakes, since, run, WakeOn.SETTLED, done), run
        assert anyio.run(wakeups.wakes, since, run, WakeOn.SETTLED, out), run
        assert anyio.run(wakeups.wakes, done, run, WakeOn.SETTLED, out), run
    store.close()


def test_turns_and_starts_after_an_unsettled_look_do_not_read_the_agents_again(
    tmp_path: Path,
) -> None:
    """A poll found the run not settled at a cursor; when only turns and starts follow, it is
    still not settled and its agents are not looked at; any other event is looked at, and the
    answers are those of a look at every step."""
    store = StateStore(tmp_path)
    store.create_run(_run(), [_agent("a1"), _agent("a2", index=2)])
    store.apply("a1", EventKind.RUNNING, status=AgentStatus.RUNNING)
    store.apply("a2", EventKind.RUNNING, status=AgentStatus.RUNNING)
    since = store.cursor()
    wakeups = _wakeups(store)
    looked: list[int] = []
    settled = wakeups.settled

    async def counted(run_id: str | None, cursor: int) -> bool:
        looked.append(cursor)
        return await settled(run_id, cursor)

    wakeups.settled = counted  # type: ignore[method-assign]

    def step(kind: EventKind, agent: str, status: AgentStatus | None, unsettled_at: int) -> bool:
        if status is None:
            store.record_event("r1", agent, kind, "")
        else:
            store.apply(agent, kind, status=status)
        cursor = store.cursor()
        got = anyio.run(
            lambda: wakeups.wakes(since, "r1", WakeOn.SETTLED, cursor, unsettled_at=unsettled_at)
        )
        whole = anyio.run(_wakeups(store).wakes, since, "r1", WakeOn.SETTLED, cursor)
        assert got == whole, (kind, status)
        return got

    store.record_event("r1", "a1", EventKind.TURN, "")
    first = store.cursor()
    assert not anyio.run(wakeups.wakes, since, "r1", WakeOn.SETTLED, first)
    assert looked == [first]
    assert not step(EventKind.TURN, "a2", None, first)
    assert not step(EventKind.TURN, "a1", None, store.cursor())
    assert looked == [first]  # two turns: not looked at
    assert not step(EventKind.SUCCEEDED, "a1", AgentStatus.SUCCEEDED, store.cursor())
    assert len(looked) == 2  # a final status is
    before = store.cursor()
    assert step(EventKind.SUCCEEDED, "a2", AgentStatus.SUCCEEDED, before)
    assert len(looked) == 3
    # the look-back holds only from the cursor the same question was last read at
    store.record_event("r1", "a2", EventKind.TURN, "")
    assert anyio.run(
        lambda: wakeups.wakes(since, "r1", WakeOn.SETTLED, store.cursor(), unsettled_at=since + 1)
    )
    assert len(looked) == 4
    store.close()


def test_a_budget_that_ran_out_is_looked_for_in_the_new_events_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a poll's cursor moves over agents finishing one by one, whether an agent's budget
    ran out is answered as a fresh look at every agent changed since the poll began would,
    and each step looks at the agents of its new events only."""
    store = StateStore(tmp_path)
    store.create_run(_run(), [_agent(f"a{n}", index=n) for n in range(1, 9)])
    for n in range(1, 9):
        store.apply(f"a{n}", EventKind.RUNNING, status=AgentStatus.RUNNING)
    since = store.cursor()
    wakeups = _wakeups(store)
    looked = _count_reads(store, monkeypatch)
    for n in range(1, 9):
        out = n == 6
        store.mark_final(
            f"a{n}",
            AgentStatus.FAILED if out else AgentStatus.SUCCEEDED,
            "done",
            stop_reason=StopReason.BUDGET_EXHAUSTED if out else StopReason.FINISHED,
            reason=None,
        )
        cursor = store.cursor()
        looked.clear()
        got = anyio.run(wakeups.wakes, since, "r1", WakeOn.SETTLED, cursor)
        assert looked == ([] if n > 6 else [f"a{n}"]), n  # (once found, it stays so)
        assert got == anyio.run(_wakeups(store).wakes, since, "r1", WakeOn.SETTLED, cursor), n
        assert got == (n >= 6), n
    store.close()


def test_a_budget_look_skips_agents_that_only_started_or_turned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Looking for a budget that ran out reads only the agents with an event an active agent
    does not make: one that was leased, started or took a turn after the cursor has not
    stopped since. The answers are those of a look at every changed agent."""
    store = StateStore(tmp_path)
    store.create_run(_run(), [_agent(f"a{n}", index=n) for n in range(1, 5)])
    since = store.cursor()
    store.record_lease("a1", 7)
    store.apply("a1", EventKind.RUNNING, status=AgentStatus.RUNNING)
    store.apply("a2", EventKind.RUNNING, status=AgentStatus.RUNNING)
    store.apply("a3", EventKind.RUNNING, status=AgentStatus.RUNNING)
    store.apply("a2", EventKind.TURN, turns=1)
    store.mark_final(
        "a3", AgentStatus.SUCCEEDED, "done", stop_reason=StopReason.FINISHED, reason=None
    )
    looked = _count_reads(store, monkeypatch)
    cursor = store.cursor()
    wakeups = _wakeups(store)
    assert not anyio.run(wakeups.wakes, since, "r1", WakeOn.SETTLED, cursor)
    assert looked == ["a3"]
    store.mark_final(
        "a2", AgentStatus.FAILED, "out", stop_reason=StopReason.BUDGET_EXHAUSTED, reason="budget"
    )
    later = store.cursor()
    looked.clear()
    assert anyio.run(wakeups.wakes, since, "r1", WakeOn.SETTLED, later)
    assert looked == ["a2"]
    assert anyio.run(_wakeups(store).wakes, since, "r1", WakeOn.SETTLED, later)
    store.close()
