"""The join catches what a line merge misses: an agent that read a file another agent changed.

Agent A renames `util()` to `helper()` in src/lib/util.py; agent B reads src/lib/util.py and
writes src/app/core.py calling `util()`. Line by line both merge cleanly, and the head is broken.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from mcp_server.answers import status_answer, status_text
from orchestration.contracts import (
    AgentStatus,
    MergeOutcome,
    MergeRequest,
    SpawnRequest,
    StatusResult,
    TaskSpec,
)
from orchestration.model import ModelRequest
from orchestration.orchestrator import Orchestrator
from tests.orchestration.scripts import Gate, Step, by_task, git, make_repo
from tests.orchestration.test_orchestrator import settings, wait_until_final

pytestmark = pytest.mark.anyio

RENAME: list[Step] = [
    ("write_file", {"path": "src/lib/util.py", "content": "def helper():\n    return 2\n"}),
]
USE: list[Step] = [
    ("read_file", {"path": "src/lib/util.py"}),
    (
        "write_file",
        {
            "path": "src/app/core.py",
            "content": "from src.lib.util import util\n\n\ndef core():\n    return util()\n",
        },
    ),
]


def _tasks(first: str, second: str) -> list[TaskSpec]:
    scope = {"A-RENAME": ["src/lib"], "B-USE": ["src/app"]}
    return [TaskSpec(prompt=k, name=k[0].lower(), write_scope=scope[k]) for k in (first, second)]


async def test_the_reader_comes_back_stale_naming_the_path_and_the_writer(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    model = by_task({"A-RENAME": RENAME, "B-USE": USE})
    async with Orchestrator(settings(repo), lambda _n: model) as orch:
        # the reader listed first: it would land first, and neither would look stale
        spawned = await orch.spawn(SpawnRequest(tasks=_tasks("B-USE", "A-RENAME")))
        await wait_until_final(orch, spawned.run_id)
        dry = await orch.merge(MergeRequest(run_id=spawned.run_id, dry_run=True))
        merged = await orch.merge(MergeRequest(run_id=spawned.run_id))
        by_name = {a.name: a for a in merged.agents}
        status = await orch.status(run_id=spawned.run_id)
    assert [a.outcome for a in dry.agents] == [MergeOutcome.CLEAN, MergeOutcome.STALE]
    assert by_name["a"].outcome is MergeOutcome.MERGED  # the writer went first
    b = by_name["b"]
    assert b.outcome is MergeOutcome.STALE
    assert b.stale_reads == ["src/lib/util.py"]
    assert b.reason is not None and "src/lib/util.py (by a)" in b.reason
    assert "rerun_subagent" in b.reason
    # nothing of B landed; its branch is kept
    assert "util()" not in (repo / "src/app/core.py").read_text()
    assert git(repo, "rev-parse", "--verify", f"refs/heads/{b_branch(status, 'b')}")
    states = {a.name: a.status for a in status.runs[0].agents}
    assert states == {"a": AgentStatus.MERGED, "b": AgentStatus.STALE}
    assert status.runs[0].settled and "rerun_subagent" in status.runs[0].next


def b_branch(status: StatusResult, name: str) -> str:
    return next(a.branch or "" for a in status.runs[0].agents if a.name == name)


async def test_accept_stale_merges_it_anyway_and_says_so(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    model = by_task({"A-RENAME": RENAME, "B-USE": USE})
    async with Orchestrator(settings(repo), lambda _n: model) as orch:
        spawned = await orch.spawn(SpawnRequest(tasks=_tasks("A-RENAME", "B-USE")))
        await wait_until_final(orch, spawned.run_id)
        merged = await orch.merge(MergeRequest(run_id=spawned.run_id, accept_stale=True))
    assert [a.outcome for a in merged.agents] == [MergeOutcome.MERGED, MergeOutcome.MERGED]
    b = merged.agents[1]
    assert b.stale_reads == ["src/lib/util.py"] and "accept_stale" in (b.reason or "")
    assert "util()" in (repo / "src/app/core.py").read_text()


async def test_a_writer_after_a_merged_reader_is_caught(tmp_path: Path) -> None:
    """B (the reader) is merged alone first; A, which changes what B read, is then stale."""
    repo = make_repo(tmp_path / "repo")
    model = by_task({"A-RENAME": RENAME, "B-USE": USE})
    async with Orchestrator(settings(repo), lambda _n: model) as orch:
        spawned = await orch.spawn(SpawnRequest(tasks=_tasks("A-RENAME", "B-USE")))
        await wait_until_final(orch, spawned.run_id)
        ids = {a.name: a.agent_id for a in spawned.agents}
        first = await orch.merge(MergeRequest(run_id=spawned.run_id, agent_ids=[ids["b"]]))
        second = await orch.merge(MergeRequest(run_id=spawned.run_id, agent_ids=[ids["a"]]))
    assert first.agents[0].outcome is MergeOutcome.MERGED
    a = second.agents[0]
    assert a.outcome is MergeOutcome.STALE
    assert a.reason is not None and "which b read and was merged" in a.reason
    assert "def util" in (repo / "src/lib/util.py").read_text()


async def test_a_rerun_of_a_stale_agent_sees_the_new_version(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    seen: list[ModelRequest] = []
    model = by_task({"A-RENAME": RENAME, "B-USE": USE}, seen=seen)
    async with Orchestrator(settings(repo), lambda _n: model) as orch:
        spawned = await orch.spawn(SpawnRequest(tasks=_tasks("B-USE", "A-RENAME")))
        await wait_until_final(orch, spawned.run_id)
        merged = await orch.merge(MergeRequest(run_id=spawned.run_id))
        stale = next(a for a in merged.agents if a.outcome is MergeOutcome.STALE)
        await orch.rerun(stale.agent_id)
        await wait_until_final(orch, spawned.run_id)
    task = next(r.system_task for r in seen if "It read files that changed" in r.system_task)
    assert "def helper():" in task and "src/lib/util.py" in task


async def test_independent_agents_are_not_stale(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    model = by_task(
        {
            "A-RENAME": RENAME,
            "B-USE": [("read_file", {"path": "docs/guide.md"}), *USE[1:]],
        }
    )
    async with Orchestrator(settings(repo), lambda _n: model) as orch:
        spawned = await orch.spawn(SpawnRequest(tasks=_tasks("B-USE", "A-RENAME")))
        await wait_until_final(orch, spawned.run_id)
        merged = await orch.merge(MergeRequest(run_id=spawned.run_id))
    assert [a.outcome for a in merged.agents] == [MergeOutcome.MERGED, MergeOutcome.MERGED]


async def test_status_flags_a_running_reader_of_what_another_agent_changes(
    tmp_path: Path,
) -> None:
    repo = make_repo(tmp_path / "repo")
    gate = Gate({"B-USE": 2})  # b holds after it read util.py and wrote core.py
    model = by_task({"A-RENAME": RENAME, "B-USE": USE}, gate=gate)
    async with Orchestrator(settings(repo), lambda _n: model) as orch:
        spawned = await orch.spawn(SpawnRequest(tasks=_tasks("A-RENAME", "B-USE")))
        with anyio.fail_after(30):
            await gate.reached["B-USE"].wait()
            while True:
                status = await orch.status(run_id=spawned.run_id)
                views = {a.name: a for a in status.runs[0].agents}
                if views["a"].status is AgentStatus.SUCCEEDED:
                    break
                await anyio.sleep(0.05)
        b = views["b"]
        assert b.status is AgentStatus.RUNNING
        assert b.reads_changing == ["src/lib/util.py (by a)"]
        answer = status_text(status_answer(status))
        assert "read what another changes: src/lib/util.py (by a)" in answer
        assert views["a"].reads_changing == []
        gate.release["B-USE"].set()
        await wait_until_final(orch, spawned.run_id)
