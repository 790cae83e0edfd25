"""Status polls reuse the views of unchanged agents, and never show a stale one."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from orchestration.clock import SYSTEM_CLOCK, Clock, SystemClock
from orchestration.config import Settings
from orchestration.contracts import (
    AgentStatus,
    RunView,
    SpawnRequest,
    StatusResult,
    TaskSpec,
    TokenUsage,
)
from orchestration.errors import RunNotFound
from orchestration.orchestrator import Orchestrator, RepoContext
from orchestration.state import EventKind, StateStore
from tests.orchestration.scripts import by_task, make_repo
from tests.orchestration.test_orchestrator import wait_until_final
from toolbus.leases import LeaseMode, LeaseRequest

pytestmark = pytest.mark.anyio


async def _two_finished_agents(orch: Orchestrator) -> str:
    spawned = await orch.spawn(
        SpawnRequest(
            tasks=[TaskSpec(prompt="A", write_scope=[]), TaskSpec(prompt="B", write_scope=[])]
        )
    )
    await wait_until_final(orch, spawned.run_id)
    return spawned.run_id


@asynccontextmanager
async def _finished_run(
    tmp_path: Path, clock: Clock = SYSTEM_CLOCK
) -> AsyncGenerator[tuple[Orchestrator, RepoContext, str]]:
    """An orchestrator on a new repository, its context, and a run of two finished agents."""
    repo = make_repo(tmp_path / "repo")
    model = by_task({"A": [], "B": []})
    settings = Settings(repo=repo, sandbox="none")
    async with Orchestrator(settings, lambda _n: model, clock=clock) as orch:
        run_id = await _two_finished_agents(orch)
        yield orch, await orch.context(repo), run_id


async def test_unchanged_agents_keep_their_view_and_a_change_shows_at_once(
    tmp_path: Path,
) -> None:
    async with _finished_run(tmp_path) as (orch, ctx, run_id):
        first = (await orch.status(run_id=run_id)).runs[0].agents
        again = (await orch.status(run_id=run_id)).runs[0].agents
        assert again[0] is first[0] and again[1] is first[1]

        # a change by this process
        ctx.store.apply(first[1].agent_id, EventKind.NOTE, status_reason="changed here")
        after = (await orch.status(run_id=run_id)).runs[0].agents
        assert after[0] is first[0]
        assert after[1] is not first[1] and after[1].status_reason == "changed here"

        # a change by another server process on the same repository
        other = StateStore(ctx.store.path.parent)
        try:
            other.apply(first[0].agent_id, EventKind.NOTE, status_reason="changed there")
        finally:
            other.close()
        later = (await orch.status(run_id=run_id)).runs[0].agents
        assert later[0] is not first[0] and later[0].status_reason == "changed there"
        assert later[1] is after[1]


async def test_a_lease_taken_or_released_shows_in_the_next_status(tmp_path: Path) -> None:
    # The agent's record does not change: only the lease table does.
    async with _finished_run(tmp_path) as (orch, ctx, run_id):
        first = (await orch.status(run_id=run_id)).runs[0].agents
        assert first[0].leases == []
        holder = first[0].agent_id
        grant = await ctx.leases.acquire(
            holder, [LeaseRequest(resource="docs", mode=LeaseMode.WRITE)]
        )
        held = (await orch.status(run_id=run_id)).runs[0].agents
        assert [(lease.resource, lease.mode) for lease in held[0].leases] == [("docs", "write")]
        assert held[1] is first[1]
        await ctx.leases.release(grant)
        freed = (await orch.status(run_id=run_id)).runs[0].agents
        assert freed[0].leases == []


async def test_run_totals_follow_the_agents(tmp_path: Path) -> None:
    async with _finished_run(tmp_path) as (orch, ctx, run_id):
        run = (await orch.status(run_id=run_id)).runs[0]
        assert run.totals.by_status == {"succeeded": 2}
        a, b = run.agents
        assert run.totals.tokens == a.tokens + b.tokens and run.totals.tokens.input > 0
        ctx.store.apply(
            b.agent_id,
            EventKind.NOTE,
            status=AgentStatus.FAILED,
            tokens=TokenUsage(input=1, output=2, cache_read=3, cache_write=4),
        )
        run = (await orch.status(run_id=run_id)).runs[0]
        assert run.totals.by_status == {"succeeded": 1, "failed": 1}
        assert run.totals.tokens == a.tokens + TokenUsage(
            input=1, output=2, cache_read=3, cache_write=4
        )


async def test_a_run_made_by_another_server_shows_and_an_unknown_run_is_refused(
    tmp_path: Path,
) -> None:
    repo = make_repo(tmp_path / "repo")
    model = by_task({"A": [], "B": []})
    settings = Settings(repo=repo, sandbox="none")
    async with Orchestrator(settings, lambda _n: model) as orch:
        assert (await orch.status()).runs == []
        with pytest.raises(RunNotFound):
            await orch.status(run_id="r-nope")
        async with Orchestrator(settings, lambda _n: model) as other:
            run_id = await _two_finished_agents(other)
        status = await orch.status(run_id=run_id)
        assert [r.run_id for r in status.runs] == [run_id]
        assert [a.status for a in status.runs[0].agents] == [AgentStatus.SUCCEEDED] * 2
        assert [r.run_id for r in (await orch.status()).runs] == [run_id]
        with pytest.raises(RunNotFound):
            await orch.status(run_id="r-nope")


class SetClock(SystemClock):
    """The system's clocks, except the wall clock once the test sets `now`."""

    now: list[float] | None = None

    def time(self) -> float:
        return super().time() if self.now is None else self.now[0]


async def test_a_held_lease_keeps_its_holders_view_until_its_expiry_shows_another_second(
    tmp_path: Path,
) -> None:
    clock = SetClock()
    async with _finished_run(tmp_path, clock) as (orch, ctx, run_id):
        holder = (await orch.status(run_id=run_id)).runs[0].agents[0].agent_id
        await ctx.leases.acquire(holder, [LeaseRequest(resource="docs", mode=LeaseMode.WRITE)])
        expires_at = (await ctx.leases.table())[0].expires_at

        # the clock status reads, set by the test
        now = clock.now = [expires_at - 12.2]

        first = (await orch.status(run_id=run_id)).runs[0].agents
        assert [lease.expires_in_s for lease in first[0].leases] == [12.0]
        now[0] += 0.2  # 12.0 s still
        again = (await orch.status(run_id=run_id)).runs[0].agents
        assert again[0] is first[0] and again[0].leases[0] is first[0].leases[0]
        now[0] += 0.5  # 11.5 s to go: rounded as Python rounds
        later = (await orch.status(run_id=run_id)).runs[0].agents
        assert later[0].leases[0].expires_in_s == float(round(expires_at - now[0]))
        now[0] += 1.0
        moved = (await orch.status(run_id=run_id)).runs[0].agents
        assert moved[0] is not first[0]
        assert moved[0].leases[0].expires_in_s == float(round(expires_at - now[0])) < 12.0
        assert moved[1] is first[1]  # the agent without a lease keeps its view


async def test_the_same_question_gets_the_same_answer_until_anything_it_shows_changes(
    tmp_path: Path,
) -> None:
    async with _finished_run(tmp_path) as (orch, ctx, run_id):
        first = await orch.status(run_id=run_id)
        assert await orch.status(run_id=run_id) is first
        one = first.runs[0].agents[0].agent_id
        only_one = await orch.status(run_id=run_id, agent_ids=[one])
        assert [a.agent_id for a in only_one.runs[0].agents] == [one]
        assert await orch.status(run_id=run_id) is first  # another question kept its answer
        assert await orch.status(run_id=run_id, agent_ids=[one]) is only_one

        # a reservation of the budget records no event, and still shows
        assert ctx.store.reserve_budget(run_id, 1000)
        reserved = await orch.status(run_id=run_id)
        assert reserved is not first
        remaining = first.runs[0].totals.budget_remaining
        assert reserved.runs[0].totals.budget_remaining == remaining - 1000
        assert reserved.runs[0].agents[0] is first.runs[0].agents[0]  # the views are kept

        # a lease, then a change of an agent
        grant = await ctx.leases.acquire(one, [LeaseRequest(resource="docs", mode=LeaseMode.WRITE)])
        leased = await orch.status(run_id=run_id)
        assert leased is not reserved and leased.runs[0].agents[0].leases
        await ctx.leases.release(grant)
        ctx.store.apply(one, EventKind.NOTE, status_reason="changed")
        updated = await orch.status(run_id=run_id)
        assert updated.cursor > leased.cursor
        assert updated.runs[0].agents[0].status_reason == "changed"
        assert updated.runs[0].agents[0].leases == []
        assert await orch.status(run_id=run_id) is updated


async def test_a_finished_run_keeps_its_view_while_nothing_it_shows_changes(
    tmp_path: Path,
) -> None:
    async with _finished_run(tmp_path) as (orch, ctx, old):
        busy = await _two_finished_agents(orch)
        poll = await orch.status()
        since = poll.cursor
        first = {r.run_id: r for r in poll.runs}[old]
        assert first.changed_agents is None  # (no `since`: not asked)

        def of(result: StatusResult, run_id: str) -> RunView:
            return {r.run_id: r for r in result.runs}[run_id]

        # another run's events: the finished run's view is the same object, poll after poll,
        # asked with or without a cursor
        for turn in range(1, 4):
            ctx.store.apply(
                (await orch.status(run_id=busy)).runs[0].agents[0].agent_id,
                EventKind.NOTE,
                status_reason=f"note {turn}",
            )
            assert of(await orch.status(), old) is first
            waited = await orch.status(since=since)
            assert of(waited, old).changed_agents == []
            assert of(waited, busy).changed_agents
            assert of(await orch.status(since=since), old) is of(waited, old)

        # what it shows changes: its agent's event, its budget, its agent's lease
        agent = first.agents[1].agent_id
        ctx.store.apply(agent, EventKind.NOTE, status_reason="looked at")
        noted = of(await orch.status(), old)
        assert noted is not first and noted.agents[1].status_reason == "looked at"
        assert noted.agents[0] is first.agents[0]
        assert of(await orch.status(since=since), old).changed_agents == [agent]
        assert of(await orch.status(), old) is noted

        assert ctx.store.reserve_budget(old, 1000)
        reserved = of(await orch.status(), old)
        assert reserved is not noted
        assert reserved.totals.budget_remaining == noted.totals.budget_remaining - 1000

        grant = await ctx.leases.acquire(
            agent, [LeaseRequest(resource="docs", mode=LeaseMode.WRITE)]
        )
        leased = of(await orch.status(), old)
        assert [lease.resource for lease in leased.agents[1].leases] == ["docs"]
        await ctx.leases.release(grant)
        assert of(await orch.status(), old).agents[1].leases == []

        # an agent of the run started again: rebuilt at every poll while it is active
        ctx.store.apply(agent, EventKind.RUNNING, status=AgentStatus.RUNNING)
        running = of(await orch.status(), old)
        assert running.agents[1].status is AgentStatus.RUNNING
        assert not running.settled


async def test_a_long_history_keeps_every_finished_runs_view(tmp_path: Path) -> None:
    from tests.orchestration.test_state import _agent, _run  # pyright: ignore[reportPrivateUsage]

    async with _finished_run(tmp_path) as (orch, ctx, live):
        for n in range(300):  # closed runs, as a server's history leaves them
            run_id = f"old{n}"
            ctx.store.create_run(_run(run_id), [_agent(f"{run_id}-a", run_id)])
            ctx.store.apply(f"{run_id}-a", EventKind.MERGED, status=AgentStatus.MERGED)
        first = {r.run_id: r for r in (await orch.status()).runs}
        waited = {r.run_id: r for r in (await orch.status(since=0)).runs}
        assert len(first) == len(waited) == 301
        agent = first[live].agents[0].agent_id
        for turn in range(3):  # the live run changes; the history does not
            ctx.store.apply(agent, EventKind.NOTE, status_reason=f"note {turn}")
            again = {r.run_id: r for r in (await orch.status()).runs}
            since = {r.run_id: r for r in (await orch.status(since=0)).runs}
            assert again[live] is not first[live]
            assert all(again[r] is first[r] for r in first if r != live)
            assert all(since[r] is waited[r] for r in waited if r != live)
