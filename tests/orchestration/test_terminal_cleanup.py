"""An agent's sandbox files (the filtered git view its commands bind) are removed when it ends;
its home stays."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from orchestration.contracts import AgentStatus, SpawnRequest, TaskSpec
from orchestration.orchestrator import Orchestrator
from tests.orchestration.scripts import Gate, by_task, make_repo
from tests.orchestration.test_orchestrator import settings, wait_until_final

pytestmark = pytest.mark.anyio


async def test_the_sandbox_files_go_when_the_agent_ends(tmp_path: Path, bwrap: str) -> None:
    repo = make_repo(tmp_path / "repo")
    gate = Gate({"RUN": 1})  # held after its command ran, before it finishes
    model = by_task({"RUN": [("run_command", {"command": "git status --short"})]}, gate=gate)
    async with Orchestrator(settings(repo, sandbox="bwrap"), lambda _n: model) as orch:
        spawned = await orch.spawn(
            SpawnRequest(tasks=[TaskSpec(prompt="RUN", write_scope=["src/"])])
        )
        agent_id = spawned.agents[0].agent_id
        homes = repo / ".git" / "fanout" / "homes"
        with anyio.fail_after(60):
            await gate.reached["RUN"].wait()
        assert (homes / f"{agent_id}.sandbox").is_dir()  # made for its command
        gate.release["RUN"].set()
        agent = (await wait_until_final(orch, spawned.run_id)).runs[0].agents[0]
        assert agent.status is AgentStatus.SUCCEEDED
        assert agent.result is not None
        assert [c.exit_code for c in agent.result.commands] == [0]
        assert not (homes / f"{agent_id}.sandbox").exists()
        assert (homes / agent_id).is_dir()
