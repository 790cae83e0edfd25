"""Limits across runs and within a run: agents running at once, and token budgets."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from mcp_server import answers
from orchestration.contracts import AgentStatus, SpawnRequest, StopReason, TaskSpec
from orchestration.orchestrator import Orchestrator
from tests.orchestration.scripts import by_task, make_repo
from tests.orchestration.test_orchestrator import settings, wait_until_final

pytestmark = pytest.mark.anyio


class CallMeter:
    """Holds every model call until `opened`, counting the calls in flight."""

    def __init__(self, target: int) -> None:
        self.inside = 0
        self.most = 0
        self.target = target
        self.reached = anyio.Event()  # `target` calls in flight at once
        self.opened = anyio.Event()

    async def __call__(self, key: str, turn: int) -> None:
        self.inside += 1
        self.most = max(self.most, self.inside)
        if self.inside >= self.target:
            self.reached.set()
        try:
            await self.opened.wait()
        finally:
            self.inside -= 1


def _read_only_tasks(n: int) -> SpawnRequest:
    tasks = [TaskSpec(name=f"t{i}", prompt=f"WORK {i}", write_scope=[]) for i in range(n)]
    return SpawnRequest(tasks=tasks, max_concurrency=2)


@pytest.mark.parametrize(("max_running", "most"), [(64, 6), (3, 3)])
async def test_agents_running_at_once_are_capped_across_runs(
    tmp_path: Path, max_running: int, most: int
) -> None:
    """Three runs at a cap of 2 each: six model calls at once, unless the server caps them."""
    repo = make_repo(tmp_path / "repo")
    meter = CallMeter(target=most)
    model = by_task({"WORK": []}, gate=meter)
    async with Orchestrator(settings(repo, max_running=max_running), lambda _n: model) as orch:
        runs = [(await orch.spawn(_read_only_tasks(3))).run_id for _ in range(3)]
        with anyio.fail_after(30):
            await meter.reached.wait()
        status = await orch.status()
        assert status.server.running == most
        assert status.server.max_running == max_running
        shown = answers.status_answer(status).server
        assert (shown is not None) == (most == max_running)  # shown when the cap binds
        if shown is not None:
            assert "of 3 agent slots taken" in answers.status_text(answers.status_answer(status))
        meter.opened.set()
        for run_id in runs:
            final = await wait_until_final(orch, run_id)
            assert [a.status for a in final.runs[0].agents] == [AgentStatus.SUCCEEDED] * 3
    assert meter.most == most


async def test_the_server_budget_stops_agents_of_every_run(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    model = by_task({"WORK": []})
    limited = settings(repo, server_budget_tokens=1_000)
    async with Orchestrator(limited, lambda _n: model) as orch:
        run_ids = [(await orch.spawn(_read_only_tasks(1))).run_id for _ in range(2)]
        for run_id in run_ids:
            agent = (await wait_until_final(orch, run_id)).runs[0].agents[0]
            assert agent.result is not None
            assert agent.result.stop_reason is StopReason.BUDGET_EXHAUSTED
            assert "the server's budget across runs" in (agent.result.error or "")
        server = (await orch.status()).server
        assert (server.budget_tokens, server.tokens_used, server.budget_remaining) == (
            1_000,
            0,
            1_000,
        )
    # the control: the same work without the server budget succeeds
    async with Orchestrator(settings(repo), lambda _n: model) as orch:
        run_id = (await orch.spawn(_read_only_tasks(1))).run_id
        agent = (await wait_until_final(orch, run_id)).runs[0].agents[0]
        assert agent.status is AgentStatus.SUCCEEDED
        server = (await orch.status()).server
        assert server.budget_tokens is None and server.tokens_used > 0


async def test_a_run_budget_stops_its_agents_and_not_others(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    model = by_task({"WORK": []})
    async with Orchestrator(settings(repo), lambda _n: model) as orch:
        small = _read_only_tasks(1).model_copy(update={"budget_tokens": 1_000})
        starved = (await orch.spawn(small)).run_id
        fed = (await orch.spawn(_read_only_tasks(1))).run_id
        agent = (await wait_until_final(orch, starved)).runs[0].agents[0]
        assert agent.result is not None
        assert agent.result.stop_reason is StopReason.BUDGET_EXHAUSTED
        assert "the run's token budget cannot cover another turn" in (agent.result.error or "")
        other = (await wait_until_final(orch, fed)).runs[0].agents[0]
        assert other.status is AgentStatus.SUCCEEDED
