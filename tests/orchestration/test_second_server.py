"""A second server on the same repository: it takes over the leases of a dead server's finished
agents, never those of a live server, and a merge leaves no lease behind whoever kept it."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from orchestration.clock import Timing
from orchestration.config import Settings
from orchestration.contracts import (
    AgentStatus,
    MergeOutcome,
    MergeRequest,
    SpawnRequest,
    SpawnResult,
    TaskSpec,
)
from orchestration.model import Model
from orchestration.orchestrator import Orchestrator, RepoContext
from orchestration.state import AgentRecord, EventKind, StateStore
from tests.orchestration.scripts import Gate, Step, add_server, by_task, exited_pid, make_repo
from tests.orchestration.test_orchestrator import wait_until_final

pytestmark = pytest.mark.anyio

WRITE: list[Step] = [("write_file", {"path": "src/app/w.py", "content": "W = 1\n"})]


def settings(repo: Path) -> Settings:
    return Settings(repo=repo, sandbox="none", lease_ttl_s=30.0, lease_lock_delay_s=0.0)


async def holders(ctx: RepoContext) -> set[str]:
    return {lease.holder for lease in await ctx.leases.table()}


def long_task() -> tuple[Gate, Model]:
    """A model whose `LONG` agent writes src/app/w.py, then stays in its next model call until
    the gate is released."""
    gate = Gate({"LONG": 1})
    return gate, by_task({"LONG": [*WRITE, ("x", {})]}, gate=gate)


async def spawn_long(orch: Orchestrator, gate: Gate) -> SpawnResult:
    """Spawn the `LONG` agent (write scope src/app); return once it has written its file and
    waits for the model."""
    spawned = await orch.spawn(
        SpawnRequest(tasks=[TaskSpec(prompt="LONG", write_scope=["src/app"])])
    )
    with anyio.fail_after(30):
        await gate.reached["LONG"].wait()
    return spawned


async def test_a_server_opened_during_a_merge_leaves_the_live_servers_lease_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race the two-server reliability test hit: a server that opened the repository while
    another one merged took the merging agent's scope for it and renewed it for ever, so every
    later agent on that scope waited for ever."""
    repo = make_repo(tmp_path / "repo")
    model = by_task({"FIRST": WRITE, "SECOND": WRITE})
    async with (
        Orchestrator(settings(repo), lambda _name: model) as a,
        Orchestrator(settings(repo), lambda _name: model) as b,
    ):
        spawned = await a.spawn(
            SpawnRequest(tasks=[TaskSpec(prompt="FIRST", write_scope=["src/app"])])
        )
        first = (await wait_until_final(a, spawned.run_id)).runs[0].agents[0]
        assert first.status == AgentStatus.SUCCEEDED

        # the second server opens the repository in the middle of the merge (while the merged
        # agent's workspace is being removed)
        opened: list[RepoContext] = []
        merger = a._merger  # pyright: ignore[reportPrivateUsage]
        remove_workspace = merger.remove_workspace

        async def remove_then_open(ctx: RepoContext, agent: AgentRecord) -> None:
            await remove_workspace(ctx, agent)
            if not opened:
                opened.append(await b.context(repo))

        monkeypatch.setattr(merger, "remove_workspace", remove_then_open)
        merged = await a.merge(MergeRequest(run_id=spawned.run_id))
        assert [r.outcome for r in merged.agents] == [MergeOutcome.MERGED]
        assert opened
        # nobody holds the merged agent's scope, now or after the second server's heartbeat
        ctx_a = await a.context(repo)
        assert first.agent_id not in await holders(ctx_a)
        with anyio.fail_after(10):
            await opened[0].keeper.renew_all()
        assert first.agent_id not in await holders(ctx_a)

        # so a later agent on the same scope runs at once instead of waiting for ever
        again = await a.spawn(
            SpawnRequest(tasks=[TaskSpec(prompt="SECOND", write_scope=["src/app"])])
        )
        with anyio.fail_after(30):
            second = (await wait_until_final(a, again.run_id)).runs[0].agents[0]
        assert second.status == AgentStatus.SUCCEEDED
        record = (await a.status(run_id=spawned.run_id)).runs[0].agents[0]
        assert record.status == AgentStatus.MERGED and not record.lease_lost


async def test_a_stopped_servers_finished_agent_is_taken_over_merged_and_leaves_no_lease(
    tmp_path: Path,
) -> None:
    repo = make_repo(tmp_path / "repo")
    model = by_task({"FIRST": WRITE})
    async with Orchestrator(settings(repo), lambda _name: model) as a:
        spawned = await a.spawn(
            SpawnRequest(tasks=[TaskSpec(prompt="FIRST", write_scope=["src/app"])])
        )
        first = (await wait_until_final(a, spawned.run_id)).runs[0].agents[0]
        assert first.status == AgentStatus.SUCCEEDED
    # the first server stopped; its finished agent's scope is still held, and the next server
    # on the repository keeps it (and becomes the agent's owner)
    async with Orchestrator(settings(repo), lambda _name: model) as b:
        ctx = await b.context(repo)
        assert first.agent_id in await holders(ctx)
        owner = ctx.store.agent(first.agent_id)
        assert owner is not None and owner.owner == ctx.store.server_id
        with anyio.fail_after(10):
            await ctx.keeper.renew_all()
        assert first.agent_id in await holders(ctx)
        merged = await b.merge(MergeRequest(run_id=spawned.run_id))
        assert [r.outcome for r in merged.agents] == [MergeOutcome.MERGED]
        assert first.agent_id not in await holders(ctx)
    assert (repo / "src/app/w.py").read_text() == "W = 1\n"


async def test_a_finished_agents_lease_that_lapsed_in_its_lock_delay_is_taken_again(
    tmp_path: Path,
) -> None:
    """The next server opened after the dead one's grant expired but before its lock-delay
    ended: the agent's own lock-delay is no other holder, so its scope is taken again and it
    merges, instead of being marked as having lost its lease."""
    repo = make_repo(tmp_path / "repo")
    model = by_task({"FIRST": WRITE})
    lapsing = Settings(repo=repo, sandbox="none", lease_ttl_s=1.0, lease_lock_delay_s=120.0)
    async with Orchestrator(lapsing, lambda _name: model) as a:
        spawned = await a.spawn(
            SpawnRequest(tasks=[TaskSpec(prompt="FIRST", write_scope=["src/app"])])
        )
        first = (await wait_until_final(a, spawned.run_id)).runs[0].agents[0]
        assert first.status == AgentStatus.SUCCEEDED
        ctx = await a.context(repo)
        (grant,) = [lease for lease in await ctx.leases.table() if lease.holder == first.agent_id]
    await anyio.sleep(max(0.0, grant.expires_at - time.time()) + 0.1)
    async with Orchestrator(lapsing, lambda _name: model) as b:
        ctx = await b.context(repo)
        record = ctx.store.agent(first.agent_id)
        assert record is not None and not record.lease_lost
        assert first.agent_id in await holders(ctx)
        merged = await b.merge(MergeRequest(run_id=spawned.run_id))
        assert [r.outcome for r in merged.agents] == [MergeOutcome.MERGED]
        assert first.agent_id not in await holders(ctx)
    assert (repo / "src/app/w.py").read_text() == "W = 1\n"


async def test_an_agent_a_killed_server_left_running_keeps_its_scope_until_rerun(
    tmp_path: Path,
) -> None:
    """Recovery makes the interrupted agent this server's own; its lease must still be kept
    (renewed here) so that no other agent takes the scope before the rerun."""
    repo = make_repo(tmp_path / "repo")
    gate, model = long_task()
    quick = Settings(repo=repo, sandbox="none", lease_ttl_s=1.0, lease_lock_delay_s=0.0)
    async with Orchestrator(quick, lambda _name: model) as a:
        spawned = await spawn_long(a, gate)
        agent_id = spawned.agents[0].agent_id
        dead = (await a.context(repo)).store.server_id
    # as a killed server leaves it: the agent still `running`, owned by a server that is gone
    store = StateStore(repo / ".git" / "fanout")
    store.apply(agent_id, EventKind.NOTE, status=AgentStatus.RUNNING, owner=dead)
    store.close()

    rerun_model = by_task({"LONG": [("read_file", {"path": "src/app/w.py"})]})
    async with Orchestrator(quick, lambda _name: rerun_model) as b:
        ctx = await b.context(repo)
        record = ctx.store.agent(agent_id)
        assert record is not None and record.status == AgentStatus.INTERRUPTED
        assert record.owner == ctx.store.server_id
        with anyio.fail_after(10):
            for _ in range(6):  # a round every ttl/3: two TTLs
                await ctx.keeper.next_round()
        assert agent_id in await holders(ctx)  # renewed here, not lapsed
        rerun = await b.rerun(agent_id)
        status = await wait_until_final(
            b, spawned.run_id, statuses={AgentStatus.SUCCEEDED, AgentStatus.DISCARDED}
        )
        views = {v.agent_id: v for v in status.runs[0].agents}
        assert views[rerun.agent.agent_id].status == AgentStatus.SUCCEEDED
        merged = await b.merge(MergeRequest(run_id=spawned.run_id))
        assert [r.outcome for r in merged.agents] == [MergeOutcome.MERGED]
        assert not await holders(ctx) & {agent_id, rerun.agent.agent_id}
    assert (repo / "src/app/w.py").read_text() == "W = 1\n"


async def test_a_running_server_takes_over_the_agents_of_one_that_died_since(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server killed while another one is already open: the open one notices at its next
    heartbeat (the dead server's process is gone from this machine) and marks the agent
    interrupted, with its work committed, instead of showing it `running` for ever."""
    fast = Timing(server_heartbeat_s=0.1)
    repo = make_repo(tmp_path / "repo")
    gate, model = long_task()
    gone = await exited_pid()  # the killed server's process, as far as its id goes
    async with Orchestrator(settings(repo), lambda _name: model, timing=fast) as b:
        ctx = await b.context(repo)
        async with Orchestrator(settings(repo), lambda _name: model, timing=fast) as a:
            spawned = await spawn_long(a, gate)
        agent_id = spawned.agents[0].agent_id
        me = ctx.store.server_id
        # a stopped cleanly: b takes over the interrupted agent's lease at its next heartbeat
        with anyio.fail_after(20):
            while (taken := ctx.store.agent(agent_id)) is None or taken.owner != me:
                await ctx.store.wait_for_change(ctx.store.cursor(), 1.0)
        # now as a server killed at that point would leave it: the agent `running`, its owner
        # registered with a fresh heartbeat, but its process gone
        ghost = "ghost-server"
        add_server(ctx.store, ghost, gone)
        ctx.store.apply(agent_id, EventKind.NOTE, status=AgentStatus.RUNNING, owner=ghost)

        with anyio.fail_after(20):
            while (record := ctx.store.agent(agent_id)) is None or record.status.active:
                await ctx.store.wait_for_change(ctx.store.cursor(), 1.0)
        assert record.status == AgentStatus.INTERRUPTED
        assert record.owner == me
        assert record.result is not None and record.commit is not None
        assert [c.path for c in record.result.changed_files] == ["src/app/w.py"]
        assert agent_id in await holders(ctx)  # its scope stays reserved for the rerun


async def test_an_agent_run_by_another_live_server_is_cancelled_from_this_one(
    tmp_path: Path,
) -> None:
    """Two sessions on one repository: the user cancels from the session that did not start the
    run. The request is recorded; the server running the agent stops it, its work committed."""
    repo = make_repo(tmp_path / "repo")
    gate, model = long_task()
    async with (
        Orchestrator(settings(repo), lambda _name: model) as a,
        Orchestrator(settings(repo), lambda _name: model) as b,
    ):
        spawned = await spawn_long(a, gate)
        agent_id = spawned.agents[0].agent_id
        with anyio.fail_after(40):
            cancelled = await b.cancel(spawned.run_id)
        assert [x.status for x in cancelled.agents] == [AgentStatus.CANCELLED]
        record = (await a.status(run_id=spawned.run_id)).runs[0].agents[0]
        assert record.agent_id == agent_id and record.status == AgentStatus.CANCELLED
        assert record.result is not None and record.result.commit is not None
        assert "another server" in (record.result.error or "")
        assert [c.path for c in record.result.changed_files] == ["src/app/w.py"]
        assert not record.lease_lost


async def test_cancelling_an_agent_whose_server_is_gone_recovers_it_at_once(
    tmp_path: Path,
) -> None:
    repo = make_repo(tmp_path / "repo")
    gate, model = long_task()
    gone = await exited_pid()
    async with Orchestrator(settings(repo), lambda _name: model) as a:
        spawned = await spawn_long(a, gate)
    agent_id = spawned.agents[0].agent_id
    async with Orchestrator(settings(repo), lambda _name: model) as b:
        ctx = await b.context(repo)
        # as a server killed after b started leaves it (b's heartbeat comes only every 5 s):
        # `running`, owned by a server whose process is gone
        add_server(ctx.store, "ghost", gone)
        ctx.store.apply(agent_id, EventKind.NOTE, status=AgentStatus.RUNNING, owner="ghost")
        with anyio.fail_after(10):
            cancelled = await b.cancel(spawned.run_id)
        assert [x.status for x in cancelled.agents] == [AgentStatus.INTERRUPTED]
