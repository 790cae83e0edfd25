"""An agent's commit made while its model call is in flight (`AgentRunner.commit_ahead`): used
at its finish when the bus has only read since, made anew when it wrote, never made for an
agent that ran a command. Through the real client against the fake Messages API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from fakeapi import FakeAnthropic, by_turn, finish, reply, tool_use
from fakeapi.replies import ToolUse
from orchestration import workspace as ws_mod
from orchestration.config import Settings
from orchestration.contracts import AgentStatus, SpawnRequest, TaskSpec
from orchestration.model import Model
from orchestration.orchestrator import Orchestrator
from orchestration.providers.anthropic import AnthropicModel
from tests.orchestration.gitutil import git, needs_views
from tests.orchestration.scripts import make_repo
from tests.orchestration.test_orchestrator import wait_until_final

pytestmark = [pytest.mark.anyio, needs_views()]

LATENCY_S = 0.1
WRITE = tool_use("write_file", path="src/app/n.py", content="N = 1\n")
READ = tool_use("read_file", path="src/app/n.py")


class _Spy:
    """What `prepare_commit` gave, and what each `PreparedCommit.finish` did."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.prepared: list[bool] = []
        self.finished: list[bool] = []
        prepare, finish_ = ws_mod.prepare_commit, ws_mod.PreparedCommit.finish

        def spy_prepare(*args: Any, **kwargs: Any) -> ws_mod.PreparedCommit | None:
            made = prepare(*args, **kwargs)
            self.prepared.append(made is not None)
            return made

        def spy_finish(made: ws_mod.PreparedCommit, message: str) -> ws_mod.WorkCommit | None:
            done = finish_(made, message)
            self.finished.append(done is not None)
            return done

        monkeypatch.setattr(ws_mod, "prepare_commit", spy_prepare)
        monkeypatch.setattr(ws_mod.PreparedCommit, "finish", spy_finish)


async def _run_one(tmp_path: Path, *steps: Any) -> tuple[Path, Any]:
    repo = make_repo(tmp_path / "repo")
    async with FakeAnthropic(by_turn(*steps), latency_s=LATENCY_S).serve() as fake:

        def factory(name: str) -> Model:
            return AnthropicModel(model=name, api_key="sk-test", base_url=fake.base_url)

        settings = Settings.model_validate(
            {"repo": repo, "sandbox": "none", "model": "claude-sonnet-5-5"}
        )
        async with Orchestrator(settings, factory) as orch:
            spawned = await orch.spawn(
                SpawnRequest(tasks=[TaskSpec(prompt="TASK", name="t", write_scope=["src/app"])])
            )
            with anyio.fail_after(60):
                status = await wait_until_final(orch, spawned.run_id)
    agent = status.runs[0].agents[0]
    assert agent.status is AgentStatus.SUCCEEDED, agent
    return repo, agent


def _subject(repo: Path, commit: str) -> str:
    return git(repo, "log", "-1", "--format=%s", commit).strip()


async def test_the_commit_made_ahead_is_the_agents_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = _Spy(monkeypatch)
    repo, agent = await _run_one(tmp_path, WRITE, READ, finish("wrote n"))
    # made during the call after the write; the read changed nothing, so it was used
    assert spy.prepared == [True] and spy.finished == [True]
    commit = agent.result.commit
    assert git(repo, "show", f"{commit}:src/app/n.py") == "N = 1\n"
    assert _subject(repo, commit) == "fanout: t: wrote n"
    assert [c.path for c in agent.result.changed_files] == ["src/app/n.py"]
    assert git(repo, "rev-parse", f"{commit}^").strip() == agent.base_commit


async def test_a_write_after_it_makes_the_commit_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = _Spy(monkeypatch)
    last = reply(
        ToolUse("write_file", {"path": "src/app/m.py", "content": "M = 2\n"}),
        ToolUse("finish", {"summary": "wrote both"}),
    )
    repo, agent = await _run_one(tmp_path, WRITE, last)
    assert spy.prepared == [True] and spy.finished == []  # stale: closed unused
    commit = agent.result.commit
    assert git(repo, "show", f"{commit}:src/app/m.py") == "M = 2\n"
    assert git(repo, "show", f"{commit}:src/app/n.py") == "N = 1\n"
    assert _subject(repo, commit) == "fanout: t: wrote both"


async def test_none_is_made_for_an_agent_that_ran_a_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = _Spy(monkeypatch)
    command = tool_use("run_command", command="true")
    repo, agent = await _run_one(tmp_path, command, WRITE, READ, finish("ran and wrote"))
    assert spy.prepared == [] and spy.finished == []
    assert git(repo, "show", f"{agent.result.commit}:src/app/n.py") == "N = 1\n"
