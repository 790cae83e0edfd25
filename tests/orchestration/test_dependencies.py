"""Declared dependencies: a task waits until the tasks it depends on are merged, then starts
from the head that contains them; unknown names and cycles are refused at spawn; a failed
dependency stops its dependents."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from orchestration.contracts import (
    AgentStatus,
    MergeOutcome,
    MergeRequest,
    SpawnRequest,
    StatusResult,
    TaskSpec,
)
from orchestration.errors import InvalidRequest
from orchestration.model import ModelRequest, ToolResultBlock
from orchestration.orchestrator import Orchestrator
from orchestration.state import AgentRecord, StateStore
from tests.orchestration.scripts import Step, by_task, make_repo
from tests.orchestration.test_orchestrator import settings

pytestmark = pytest.mark.anyio

RENAME: list[Step] = [
    ("write_file", {"path": "src/lib/util.py", "content": "def helper():\n    return 2\n"}),
]
READ_UTIL: list[Step] = [("read_file", {"path": "src/lib/util.py"})]


async def _settled(orch: Orchestrator, run_id: str) -> StatusResult:
    cursor = 0
    with anyio.fail_after(30):
        while True:
            status = await orch.status(run_id=run_id, since=cursor, wait_s=5)
            cursor = status.cursor
            if status.runs[0].settled:
                return status


async def test_a_dependent_starts_from_its_dependencys_merged_head(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    seen: list[ModelRequest] = []
    model = by_task({"A-RENAME": RENAME, "B-USE": READ_UTIL}, seen=seen)
    tasks = [
        TaskSpec(prompt="B-USE", name="b", write_scope=["src/app"], depends_on=["a"]),
        TaskSpec(prompt="A-RENAME", name="a", write_scope=["src/lib"]),
    ]
    async with Orchestrator(settings(repo), lambda _n: model) as orch:
        spawned = await orch.spawn(SpawnRequest(tasks=tasks))
        ids = {a.name: a.agent_id for a in spawned.agents}
        assert spawned.agents[0].depends_on == [ids["a"]]
        # the loop ends while b waits: a must be merged by the orchestrator first
        waiting = await _settled(orch, spawned.run_id)
        states = {a.name: a.status for a in waiting.runs[0].agents}
        assert states == {"a": AgentStatus.SUCCEEDED, "b": AgentStatus.WAITING}
        b_view = next(a for a in waiting.runs[0].agents if a.name == "b")
        assert "depends_on" in (b_view.status_reason or "")
        assert "merge_results" in waiting.runs[0].next
        assert not any("B-USE" in r.system_task for r in seen)  # b has not started
        merged = await orch.merge(MergeRequest(run_id=spawned.run_id))
        assert [a.outcome for a in merged.agents] == [MergeOutcome.MERGED]
        done = await _settled(orch, spawned.run_id)
        states = {a.name: a.status for a in done.runs[0].agents}
    assert states == {"a": AgentStatus.MERGED, "b": AgentStatus.SUCCEEDED}
    results = [
        block.content
        for r in seen
        if "B-USE" in r.system_task
        for m in r.messages
        for block in m.content
        if isinstance(block, ToolResultBlock)
    ]
    assert any("def helper" in text for text in results)  # b saw a's change


async def test_a_dependent_on_an_earlier_run_reads_only_that_runs_agents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # waiting reads the dependency's run at each change, not every agent the repository had
    repo = make_repo(tmp_path / "repo")
    seen: list[ModelRequest] = []
    model = by_task({"A-RENAME": RENAME, "B-USE": READ_UTIL, "OTHER": []}, seen=seen)
    async with Orchestrator(settings(repo), lambda _n: model) as orch:
        other = await orch.spawn(SpawnRequest(tasks=[TaskSpec(prompt="OTHER", write_scope=[])]))
        first = await orch.spawn(
            SpawnRequest(tasks=[TaskSpec(prompt="A-RENAME", name="a", write_scope=["src/lib"])])
        )
        await _settled(orch, other.run_id)
        await _settled(orch, first.run_id)

        def whole_history(_store: StateStore) -> list[AgentRecord]:
            raise AssertionError("every agent of the repository was read")

        monkeypatch.setattr(StateStore, "all_agents", whole_history)
        a_id = first.agents[0].agent_id
        second = await orch.spawn(
            SpawnRequest(
                tasks=[
                    TaskSpec(prompt="B-USE", name="b", write_scope=["src/app"], depends_on=[a_id])
                ]
            )
        )
        waiting = await _settled(orch, second.run_id)
        assert [a.status for a in waiting.runs[0].agents] == [AgentStatus.WAITING]
        merged = await orch.merge(MergeRequest(run_id=first.run_id))
        assert [a.outcome for a in merged.agents] == [MergeOutcome.MERGED]
        done = await _settled(orch, second.run_id)
    assert [a.status for a in done.runs[0].agents] == [AgentStatus.SUCCEEDED]
    assert any("B-USE" in r.system_task for r in seen)


async def test_unknown_dependencies_and_cycles_are_refused(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    async with Orchestrator(settings(repo), lambda _n: by_task({})) as orch:
        with pytest.raises(InvalidRequest, match=r"b -> 'nope'"):
            await orch.spawn(
                SpawnRequest(
                    tasks=[
                        TaskSpec(prompt="A", name="a"),
                        TaskSpec(prompt="B", name="b", depends_on=["nope"]),
                    ]
                )
            )
        with pytest.raises(InvalidRequest, match=r"cycle.*a -> c -> b -> a|cycle.*a -> b"):
            await orch.spawn(
                SpawnRequest(
                    tasks=[
                        TaskSpec(prompt="A", name="a", depends_on=["c"]),
                        TaskSpec(prompt="B", name="b", depends_on=["a"]),
                        TaskSpec(prompt="C", name="c", depends_on=["b"]),
                    ]
                )
            )
        status = await orch.status()
    assert status.runs == []  # nothing was created


async def test_a_failed_dependency_stops_its_dependents(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    model = by_task(
        {
            "A-FAILS": [("finish", {"summary": "cannot", "status": "failed"})],
            "B-USE": READ_UTIL,
        }
    )
    tasks = [
        TaskSpec(prompt="A-FAILS", name="a", write_scope=["src/lib"]),
        TaskSpec(prompt="B-USE", name="b", write_scope=["src/app"], depends_on=["a"]),
    ]
    async with Orchestrator(settings(repo), lambda _n: model) as orch:
        spawned = await orch.spawn(SpawnRequest(tasks=tasks))
        done = await _settled(orch, spawned.run_id)
    by_name = {a.name: a for a in done.runs[0].agents}
    assert by_name["a"].status is AgentStatus.FAILED
    b = by_name["b"]
    assert b.status is AgentStatus.CANCELLED
    assert "its dependency a" in (b.status_reason or "") and "failed" in (b.status_reason or "")
