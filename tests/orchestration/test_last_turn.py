"""An agent's last turn is recorded with its final state, in one step: the same record a turn
gets (turns, tokens, files read, the first call's input), its reservation of the budget
settled; if the final state cannot be written, the turn is recorded on its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestration.agent import usage_to_tokens
from orchestration.contracts import AgentStatus, SpawnRequest, TaskSpec
from orchestration.model import (
    ModelRequest,
    ModelResponse,
    ResponseBlock,
    ToolUseBlock,
    Usage,
)
from orchestration.orchestrator import Orchestrator
from orchestration.providers.function import FunctionModel
from orchestration.state import StateStore
from tests.orchestration.scripts import make_repo, turn_index
from tests.orchestration.test_orchestrator import settings, wait_until_final

pytestmark = pytest.mark.anyio

USAGE = Usage(input_tokens=100, output_tokens=20, cache_read_tokens=7)


def _reads_then_finishes(turns: int) -> FunctionModel:
    """Each turn reads README.md; the last one also calls finish, in the same answer."""

    async def reply(request: ModelRequest) -> ModelResponse:
        n = turn_index(request)
        uses: list[ResponseBlock] = [
            ToolUseBlock(id=f"toolu_{n}_r", name="read_file", input={"path": "README.md"})
        ]
        if n == turns - 1:
            uses.append(ToolUseBlock(id=f"toolu_{n}_f", name="finish", input={"summary": "ok"}))
        return ModelResponse(content=uses, stop_reason="tool_use", usage=USAGE, model="m")

    return FunctionModel(reply)


async def _run(repo: Path, turns: int) -> tuple[StateStore, str]:
    model = _reads_then_finishes(turns)
    async with Orchestrator(settings(repo), lambda _n: model) as orch:
        spawned = await orch.spawn(SpawnRequest(tasks=[TaskSpec(prompt="read", name="r")]))
        final = await wait_until_final(orch, spawned.run_id)
    assert [a.status for a in final.runs[0].agents] == [AgentStatus.SUCCEEDED]
    return StateStore(repo / ".git" / "fanout"), spawned.run_id


@pytest.mark.parametrize("turns", [1, 3])
async def test_the_last_turn_is_recorded_in_the_final_step(tmp_path: Path, turns: int) -> None:
    store, run_id = await _run(make_repo(tmp_path / "repo"), turns)
    kinds = [e.kind for e in store.events(run_id=run_id) if e.agent_id is not None]
    # every turn but the last has its own record; the last is in the final one
    assert kinds == ["leased", "running", *["turn"] * (turns - 1), "succeeded"]
    (agent,) = store.agents(run_id)
    assert agent.turns == turns
    assert agent.tokens.input == 100 * turns and agent.tokens.output == 20 * turns
    assert agent.read_files == ["README.md"]
    assert agent.first_input_tokens == 107  # the first call's: input and cache reads
    _total, used, reserved = store.budget(run_id)
    assert reserved == 0  # every reservation settled, the last one with the final state
    assert used == turns * usage_to_tokens(USAGE).billed_equivalent > 0
    store.close()


async def test_a_final_step_that_fails_leaves_the_turn_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failed: list[str] = []
    mark_final = StateStore.mark_final

    def fail_with_the_turn(self: StateStore, *args: object, **kwargs: object) -> object:
        if kwargs.get("last_turn") is not None:
            failed.append("mark_final")
            raise OSError("disk full")
        return mark_final(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(StateStore, "mark_final", fail_with_the_turn)
    repo = make_repo(tmp_path / "repo")
    model = _reads_then_finishes(2)
    async with Orchestrator(settings(repo), lambda _n: model) as orch:
        spawned = await orch.spawn(SpawnRequest(tasks=[TaskSpec(prompt="read", name="r")]))
        final = await wait_until_final(orch, spawned.run_id)
    assert failed == ["mark_final"]
    # the failure is recorded as ours; the turn on its own, its reservation settled
    assert [a.status for a in final.runs[0].agents] == [AgentStatus.FAILED]
    store = StateStore(repo / ".git" / "fanout")
    kinds = [e.kind for e in store.events(run_id=spawned.run_id) if e.agent_id is not None]
    assert kinds == ["leased", "running", "turn", "turn", "failed"]
    (agent,) = store.agents(spawned.run_id)
    assert agent.turns == 2 and agent.read_files == ["README.md"]
    assert store.budget(spawned.run_id)[2] == 0
    store.close()
