"""What status shows while an agent is still running."""

from __future__ import annotations

import shutil
from pathlib import Path

import anyio
import pytest

from orchestration.config import Settings
from orchestration.contracts import AgentStatus, SpawnRequest, TaskSpec
from orchestration.orchestrator import Orchestrator
from tests.orchestration.scripts import Gate, by_task, make_repo
from tests.orchestration.test_orchestrator import wait_until_final

pytestmark = pytest.mark.anyio


async def test_files_written_so_far_show_while_the_agent_runs(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    gate = Gate({"LIVE": 2})
    model = by_task(
        {
            "LIVE": [
                ("write_file", {"path": "src/app/live.py", "content": "LIVE = 1\n"}),
                ("list_files", {"path": "src/app"}),
            ]
        },
        gate=gate,
    )
    settings = Settings(repo=repo, sandbox="none")
    async with Orchestrator(settings, lambda _name: model) as orch:
        spawned = await orch.spawn(
            SpawnRequest(tasks=[TaskSpec(prompt="LIVE", write_scope=["src/app"])])
        )
        with anyio.fail_after(30):
            await gate.reached["LIVE"].wait()
        agent = (await orch.status(run_id=spawned.run_id)).runs[0].agents[0]
        assert agent.status == AgentStatus.RUNNING
        assert agent.changed_files == ["src/app/live.py"]
        assert agent.turns == 2 and agent.tokens.input > 0
        gate.release["LIVE"].set()
        with anyio.fail_after(30):
            cursor = 0
            while True:
                status = await orch.status(run_id=spawned.run_id, since=cursor, wait_s=5)
                cursor = status.cursor
                if not status.runs[0].agents[0].status.active:
                    break
    final = status.runs[0].agents[0]
    assert final.status == AgentStatus.SUCCEEDED
    assert final.changed_files == ["src/app/live.py"]


async def test_spawn_warns_when_commands_would_run_without_a_sandbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo(tmp_path / "repo")
    only_git = tmp_path / "path-without-bwrap"
    only_git.mkdir()
    (only_git / "git").symlink_to(shutil.which("git") or "/usr/bin/git")
    model = by_task({"X": []})
    async with Orchestrator(Settings(repo=repo, sandbox="auto"), lambda _n: model) as orch:
        monkeypatch.setenv("PATH", str(only_git))  # git is found, bubblewrap is not
        spawned = await orch.spawn(SpawnRequest(tasks=[TaskSpec(prompt="X", write_scope=[])]))
        monkeypatch.undo()
        assert any("WITHOUT a sandbox" in w and "bwrap" in w for w in spawned.warnings)
        await wait_until_final(orch, spawned.run_id)
