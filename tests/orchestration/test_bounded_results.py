"""An agent's result is bounded, whatever its model answers: the orchestrator reads summaries."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
from pydantic import JsonValue

from orchestration.agent import MAX_FOLLOW_UPS, MAX_RESULT_SUMMARY_CHARS
from orchestration.contracts import AgentStatus, SpawnRequest, StopReason, TaskSpec
from orchestration.model import ModelRequest, ModelResponse
from orchestration.orchestrator import Orchestrator
from orchestration.prompts import FINISH_TOOL, SUMMARY_ANSWER_CHARS
from orchestration.providers.function import FunctionModel
from tests.orchestration.scripts import make_repo, text_reply, tool_reply, turn_index
from tests.orchestration.test_orchestrator import settings, wait_until_final

pytestmark = pytest.mark.anyio


async def test_a_final_text_without_finish_is_kept_bounded_and_flagged(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    huge = "words " * 40_000  # 240,000 characters, no finish

    async def reply(request: ModelRequest) -> ModelResponse:
        del request
        return text_reply(huge)

    async with Orchestrator(settings(repo), lambda _n: FunctionModel(reply)) as orch:
        spawned = await orch.spawn(SpawnRequest(tasks=[TaskSpec(prompt="TALK", write_scope=[])]))
        status = await wait_until_final(orch, spawned.run_id)
    agent = status.runs[0].agents[0]
    assert agent.result is not None
    assert agent.result.stop_reason is StopReason.FINAL_ANSWER
    assert len(agent.result.summary) <= MAX_RESULT_SUMMARY_CHARS
    assert agent.result.summary.endswith("more characters of the final reply not kept]")


async def test_finish_with_too_many_follow_ups_is_refused_and_the_agent_can_retry(
    tmp_path: Path,
) -> None:
    repo = make_repo(tmp_path / "repo")
    too_many: list[JsonValue] = [f"item {i}" for i in range(MAX_FOLLOW_UPS + 5)]
    told: list[str] = []

    async def reply(request: ModelRequest) -> ModelResponse:
        turn = turn_index(request)
        if turn == 0:
            return tool_reply("finish", {"summary": "done", "follow_ups": too_many}, turn)
        for message in request.messages:
            for block in message.content:
                if block.type == "tool_result":
                    told.append(block.content)
        return tool_reply("finish", {"summary": "done", "follow_ups": too_many[:3]}, turn)

    async with Orchestrator(settings(repo), lambda _n: FunctionModel(reply)) as orch:
        spawned = await orch.spawn(SpawnRequest(tasks=[TaskSpec(prompt="LIST", write_scope=[])]))
        status = await wait_until_final(orch, spawned.run_id)
    agent = status.runs[0].agents[0]
    assert agent.status is AgentStatus.SUCCEEDED
    assert agent.result is not None and agent.result.follow_ups == too_many[:3]
    assert any("finish refused" in text for text in told)


def test_the_finish_schema_tells_the_model_its_limits() -> None:
    props = cast(dict[str, Any], FINISH_TOOL.input_schema["properties"])
    assert props["summary"]["maxLength"] == SUMMARY_ANSWER_CHARS
    assert props["follow_ups"]["maxItems"] == MAX_FOLLOW_UPS
