"""Nothing an agent's commands needed outlives its workspace: its HOME and its sandbox's files
go when it is merged or discarded (and at the next opening, after a crash); a terminal that made
its own HOME in the system's temporary directory leaves nothing there."""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import pytest

from orchestration.contracts import AgentStatus, MergeRequest, SpawnRequest, TaskSpec
from orchestration.orchestrator import Orchestrator
from tests.orchestration.scripts import Step, by_task, make_repo
from tests.orchestration.test_orchestrator import settings, wait_until_final
from toolbus.terminal import Terminal

pytestmark = pytest.mark.anyio

RUNS: list[Step] = [("run_command", {"command": "echo hi > out.txt; ls ~"})]


async def test_homes_go_with_the_workspace_on_merge_and_discard(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    model = by_task({"ONE": RUNS, "TWO": RUNS})
    homes = repo / ".git" / "fanout" / "homes"
    async with Orchestrator(settings(repo), lambda _n: model) as orch:
        spawned = await orch.spawn(
            SpawnRequest(
                tasks=[
                    TaskSpec(prompt="ONE", name="one", write_scope=["one"]),
                    TaskSpec(prompt="TWO", name="two", write_scope=["two"]),
                ]
            )
        )
        await wait_until_final(orch, spawned.run_id)
        one, two = (a.agent_id for a in spawned.agents)
        assert (homes / one).is_dir() and (homes / two).is_dir()  # made for their commands
        merged = await orch.merge(
            MergeRequest(run_id=spawned.run_id, agent_ids=[one], discard=[two])
        )
        status = await orch.status(run_id=spawned.run_id)
    assert {a.status for a in status.runs[0].agents} == {
        AgentStatus.MERGED,
        AgentStatus.DISCARDED,
    }, merged
    assert not (homes / one).exists() and not (homes / two).exists()


async def test_a_dead_servers_leftover_homes_go_at_the_next_opening(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    model = by_task({"ONE": RUNS})
    homes = repo / ".git" / "fanout" / "homes"
    async with Orchestrator(settings(repo), lambda _n: model) as orch:
        spawned = await orch.spawn(SpawnRequest(tasks=[TaskSpec(prompt="ONE", name="one")]))
        await wait_until_final(orch, spawned.run_id)
        await orch.merge(MergeRequest(run_id=spawned.run_id))
    agent_id = spawned.agents[0].agent_id
    # as a server killed between the merge and the removal would leave them
    (homes / agent_id / ".cache").mkdir(parents=True)
    (homes / f"{agent_id}.sandbox").mkdir()
    async with Orchestrator(settings(repo), lambda _n: model) as orch:
        await orch.status()
    assert not (homes / agent_id).exists() and not (homes / f"{agent_id}.sandbox").exists()


def test_a_terminal_without_a_home_leaves_nothing_in_the_temp_dir(tmp_path: Path) -> None:
    def mine() -> set[str]:
        return {p.name for p in Path(tempfile.gettempdir()).glob("fanout-home-*")}

    before = mine()
    closed = Terminal(tmp_path)
    made = mine() - before
    assert len(made) == 1
    closed.close()
    assert mine() - before == set()
    dropped = Terminal(tmp_path)  # never closed
    assert len(mine() - before) == 1
    del dropped
    gc.collect()
    assert mine() - before == set()
