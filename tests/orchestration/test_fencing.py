"""Fencing at the join: an agent whose write lease was lost cannot land its work."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from orchestration.config import Settings
from orchestration.contracts import AgentStatus, MergeOutcome, MergeRequest, SpawnRequest, TaskSpec
from orchestration.orchestrator import Orchestrator
from tests.orchestration.scripts import by_task, git, make_repo
from tests.orchestration.test_orchestrator import wait_until_final

pytestmark = pytest.mark.anyio


async def test_a_broken_lease_cannot_land_and_nothing_is_lost(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    model = by_task({"FENCED": [("write_file", {"path": "src/app/f.py", "content": "F = 1\n"})]})
    settings = Settings(repo=repo, sandbox="none", lease_ttl_s=0.6, lease_lock_delay_s=0.0)
    async with Orchestrator(settings, lambda _name: model) as orch:
        spawned = await orch.spawn(
            SpawnRequest(tasks=[TaskSpec(prompt="FENCED", write_scope=["src/app"])])
        )
        status = await wait_until_final(orch, spawned.run_id)
        agent = status.runs[0].agents[0]
        assert agent.status == AgentStatus.SUCCEEDED
        assert [lease.resource for lease in agent.leases] == ["src/app"]
        # the lease outlives several TTLs (0.6 s) while the holder's heartbeat renews it
        ctx = await orch.context(repo)
        with anyio.fail_after(10):
            for _ in range(6):  # a round every ttl/3 = 0.2 s
                await ctx.keeper.next_round()
        still = (await orch.status(run_id=spawned.run_id)).runs[0].agents[0]
        assert still.leases and not still.lease_lost
        head = git(repo, "rev-parse", "HEAD").strip()

        await ctx.leases.break_holder(agent.agent_id, immediate=True)
        merged = await orch.merge(MergeRequest(run_id=spawned.run_id))
        outcome = merged.agents[0]
        assert outcome.outcome == MergeOutcome.SKIPPED
        assert outcome.reason is not None and "lease" in outcome.reason
        assert git(repo, "rev-parse", "HEAD").strip() == head
        assert not (repo / "src/app/f.py").exists()
        # the work is kept on the agent's branch for a rerun
        assert agent.branch is not None
        assert git(repo, "show", f"{agent.branch}:src/app/f.py") == "F = 1\n"

        # the keeper notices the loss and status shows it
        with anyio.fail_after(10):
            while not (await orch.status(run_id=spawned.run_id)).runs[0].agents[0].lease_lost:
                await ctx.keeper.next_round()
