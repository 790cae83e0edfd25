"""The setting `workspaces` chooses the agents' workspaces as `FANOUT_WORKSPACES` does, also for
a server built in code (a script on the Python API passes `Settings`, not the environment)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestration.config import Settings
from orchestration.contracts import AgentStatus, SpawnRequest, TaskSpec
from orchestration.orchestrator import Orchestrator
from tests.orchestration.gitutil import needs_views
from tests.orchestration.scripts import Step, by_task, make_repo
from tests.orchestration.test_orchestrator import wait_until_final

pytestmark = pytest.mark.anyio

WRITE: list[Step] = [("write_file", {"path": "src/app/w.py", "content": "W = 1\n"})]


class Forgetful(dict[str, str]):
    """Kinds of runs that are never kept: as for a run another process spawned."""

    def __setitem__(self, key: str, value: str) -> None:
        pass


@needs_views()
@pytest.mark.parametrize("recorded", [True, False], ids=["spawned-here", "spawned-elsewhere"])
@pytest.mark.parametrize("chosen", ["worktree", "auto"])
async def test_the_setting_chooses_the_workspaces(
    tmp_path: Path, chosen: str, recorded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FANOUT_WORKSPACES", raising=False)
    repo = make_repo(tmp_path / "repo")
    settings = Settings.model_validate({"repo": repo, "sandbox": "none", "workspaces": chosen})
    async with Orchestrator(settings, lambda _name: by_task({"W": WRITE})) as orch:
        ctx = await orch.context(repo)
        if not recorded:
            monkeypatch.setattr(ctx, "workspace_kinds", Forgetful())
        spawned = await orch.spawn(
            SpawnRequest(tasks=[TaskSpec(prompt="W", write_scope=["src/app"])])
        )
        status = await wait_until_final(orch, spawned.run_id)
    agent = status.runs[0].agents[0]
    assert agent.status == AgentStatus.SUCCEEDED
    layers = repo / ".git" / "fanout" / "layers" / spawned.run_id / agent.agent_id
    assert layers.is_dir() == (chosen != "worktree")  # auto: views, where they work
