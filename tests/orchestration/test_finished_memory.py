"""What a finished agent leaves in memory until it is merged: its runtime (its leases' fence,
its audit) stays, its loop (its messages, its bus) goes as soon as the agent ends, freed by
reference counting, not at the cycle collector's next full pass."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import anyio
import pytest

from orchestration import runner
from orchestration.agent import AgentLoop
from orchestration.contracts import SpawnRequest, TaskSpec
from orchestration.orchestrator import Orchestrator
from tests.orchestration.scripts import Step, by_task, make_repo
from tests.orchestration.test_orchestrator import settings, wait_until_final

pytestmark = pytest.mark.anyio

WRITES: list[Step] = [
    ("write_file", {"path": "one/a.txt", "content": "a\n"}),
    ("read_file", {"path": "one/a.txt"}),
]


async def test_a_finished_agents_loop_is_freed_before_it_is_merged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loops: list[weakref.ref[AgentLoop]] = []

    def recorded(**fields: Any) -> AgentLoop:
        loop = AgentLoop(**fields)
        loops.append(weakref.ref(loop))
        return loop

    monkeypatch.setattr(runner, "AgentLoop", recorded)
    repo = make_repo(tmp_path / "repo")
    model = by_task({"ONE": WRITES})
    gc.disable()
    try:
        async with Orchestrator(settings(repo), lambda _n: model) as orch:
            spawned = await orch.spawn(
                SpawnRequest(tasks=[TaskSpec(prompt="ONE", name="one", write_scope=["one"])])
            )
            await wait_until_final(orch, spawned.run_id)
            assert len(loops) == 1
            for _ in range(1000):  # (its task ends just after its final state)
                if loops[0]() is None:
                    break
                await anyio.sleep(0.01)
            assert loops[0]() is None
            status = await orch.status(run_id=spawned.run_id)
            assert status.runs[0].agents[0].changed_files == ["one/a.txt"]
    finally:
        gc.enable()
