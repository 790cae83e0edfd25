"""The read side (RepoQueries): the engine's look-ups and messages, typed answers, git read off
the event loop."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from orchestration.config import Settings
from orchestration.contracts import AgentStatus, SpawnRequest, TaskSpec
from orchestration.errors import AgentNotFound, PathNotFound, RunNotFound
from orchestration.orchestrator import Orchestrator
from orchestration.queries import RepoQueries
from tests.orchestration.scripts import by_task, make_repo
from tests.orchestration.test_orchestrator import wait_until_final

pytestmark = pytest.mark.anyio


async def test_queries_answer_what_the_engine_knows(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    model = by_task({"WRITE": [("write_file", {"path": "src/new.py", "content": "x = 1\n"})]})
    async with Orchestrator(Settings(repo=repo, sandbox="none"), lambda _n: model) as orch:
        spawned = await orch.spawn(
            SpawnRequest(tasks=[TaskSpec(prompt="WRITE a file", write_scope=["src/"])])
        )
        await wait_until_final(orch, spawned.run_id)
        ctx = await orch.context(repo)
        queries = RepoQueries(ctx)
        agent_id = spawned.agents[0].agent_id

        [listing] = queries.runs()
        assert listing.run.run_id == spawned.run_id
        assert listing.statuses == {agent_id: AgentStatus.SUCCEEDED}

        run = queries.run(spawned.run_id)
        files = {f.path: f.blob for f in await queries.base_files(run)}
        assert "src/new.py" not in files and files  # the base, not the agent's work
        some_path = sorted(files)[0]
        found = await queries.file_at_base(spawned.run_id, some_path, 1_000_000)
        assert found.blob == files[some_path] and found.text is not None
        assert len(found.text.encode()) == found.size
        too_big = await queries.file_at_base(spawned.run_id, some_path, found.size - 1)
        assert too_big.text is None and too_big.size == found.size

        agent = queries.agent(agent_id)
        assert agent.commit is not None
        diff = await queries.diff(agent, agent.commit)
        assert "+++ b/src/new.py" in diff and "+x = 1" in diff
        whole = await queries.transcript(agent_id, 10_000_000)
        assert '"role"' in whole
        tail = await queries.transcript(agent_id, len(whole.encode()) - 1)
        assert tail and whole.endswith(tail) and len(tail) < len(whole)
        assert all(json.loads(line) for line in tail.splitlines())  # whole lines only

        holders = {row.holder for row in await queries.leases(time.time())}
        assert agent_id in holders  # a succeeded, unmerged agent keeps its scope

        with pytest.raises(RunNotFound, match="get_status lists the runs"):
            queries.run("r-missing")
        with pytest.raises(AgentNotFound, match="get_status lists the agents"):
            queries.agent("r-missing-a1")
        with pytest.raises(PathNotFound, match="does not exist at"):
            await queries.file_at_base(spawned.run_id, "no/such/file", 1_000)
