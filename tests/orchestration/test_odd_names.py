"""Tool answers that name files whose names are not UTF-8 reach the model and the transcript
escaped, and the agent goes on: such a name held as text (a lone surrogate) cannot be encoded
as JSON, for the API or the transcript."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anyio
import pytest

from orchestration import planner
from orchestration.contracts import (
    AgentStatus,
    MergeOutcome,
    MergeRequest,
    SpawnRequest,
    TaskSpec,
)
from orchestration.model import ModelRequest, ToolResultBlock
from orchestration.orchestrator import Orchestrator
from orchestration.workspace.snapshots import Snapshot
from tests.orchestration.scripts import by_task, git, make_repo
from tests.orchestration.test_orchestrator import settings, wait_until_final

pytestmark = pytest.mark.anyio


def _repo_with_an_odd_name(root: Path) -> Path:
    repo = make_repo(root)
    fd = os.open(
        os.path.join(os.fsencode(repo), b"docs", b"bad\xffname.md"), os.O_WRONLY | os.O_CREAT
    )
    os.write(fd, b"needle\n")
    os.close(fd)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "a name that is not UTF-8")
    return repo


async def test_a_file_name_that_is_not_utf8_is_shown_escaped(tmp_path: Path) -> None:
    repo = _repo_with_an_odd_name(tmp_path / "repo")
    seen: list[ModelRequest] = []
    model = by_task(
        {
            "ODD": [
                ("list_files", {"path": "docs"}),
                ("search", {"pattern": "needle"}),
            ]
        },
        seen=seen,
    )
    async with Orchestrator(settings(repo), lambda _name: model) as orch:
        spawned = await orch.spawn(SpawnRequest(tasks=[TaskSpec(prompt="ODD look", name="odd")]))
        status = await wait_until_final(orch, spawned.run_id)
        agent = status.runs[0].agents[0]
        assert agent.status is AgentStatus.SUCCEEDED, agent.result
    transcript = (repo / ".git" / "fanout" / "transcripts" / f"{agent.agent_id}.jsonl").read_text(
        encoding="utf-8"
    )
    results = [
        block.content
        for request in seen
        for message in request.messages
        for block in message.content
        if isinstance(block, ToolResultBlock)
    ]
    # listed twice (its own answer, then the history of the next request) and found once
    assert sum("docs/bad\\udcffname.md" in text for text in results) >= 3, results
    lines = [json.loads(line) for line in transcript.splitlines()]
    assert [line["kind"] for line in lines].count("tool_result") == 3


@pytest.mark.parametrize("workspaces", ["auto", "worktree"])
async def test_a_file_an_agent_names_in_bytes_that_are_not_utf8_lands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workspaces: str
) -> None:
    """A command of the agent's makes a file whose name is not UTF-8 in its workspace (in a
    view libgit2 builds the commit's tree; in a worktree git does): it is committed, reported
    escaped, merged byte for byte, and every record and answer encodes."""
    monkeypatch.setenv("FANOUT_WORKSPACES", workspaces)
    repo = make_repo(tmp_path / "repo")
    make = "printf 'odd\\n' > \"$(printf 'src/app/caf\\351.txt')\""
    model = by_task({"ODD": [("run_command", {"command": make})]})
    async with Orchestrator(settings(repo), lambda _name: model) as orch:
        spawned = await orch.spawn(
            SpawnRequest(tasks=[TaskSpec(prompt="ODD make", name="odd", write_scope=["src/app"])])
        )
        status = await wait_until_final(orch, spawned.run_id)
        agent = status.runs[0].agents[0]
        assert agent.status is AgentStatus.SUCCEEDED, agent.result
        assert agent.result is not None and agent.result.dropped_files == []
        # (recorded and answered escaped: the records and the answers are JSON)
        assert [c.path for c in agent.result.changed_files] == ["src/app/caf\\xe9.txt"]
        status.model_dump_json()  # (the answer encodes)
        merged = await orch.merge(MergeRequest(run_id=spawned.run_id))
        assert [r.outcome for r in merged.agents] == [MergeOutcome.MERGED]
        merged.model_dump_json()
    landed = os.path.join(os.fsencode(repo), b"src", b"app", b"caf\xe9.txt")
    assert await anyio.Path(os.fsdecode(landed)).read_bytes() == b"odd\n"
    git(repo, "fsck", "--strict", "--no-progress")


def test_spawn_names_an_unresolved_conflict_whose_name_is_not_utf8_escaped() -> None:
    """`git status` gives such a name with the surrogates of its bytes; spawn's warning shows
    it as the other reports do (`\\xNN`), so that the answer is UTF-8 and JSON can carry it."""
    odd = os.fsdecode(b"caf\xe9.txt")
    names = [f"f{i}.txt" for i in range(5)]
    snap = Snapshot(
        base_commit="b" * 40,
        head_commit="h" * 40,
        branch_ref="refs/heads/main",
        dirty=True,
        unmerged=[odd, *names],
    )
    (warning,) = planner.base_warnings(snap)
    assert "in caf\\xe9.txt, f0.txt, f1.txt, f2.txt, f3.txt and 1 more: " in warning
    assert json.loads(json.dumps(warning, ensure_ascii=False).encode("utf-8")) == warning
