"""The transcript's lines, and the loop's history size kept as it grows."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, cast

import anyio
import anyio.lowlevel
import pytest

from orchestration import agent as agent_module
from orchestration.agent import AgentLoop, Budget, Transcript
from orchestration.model import (
    Message,
    ModelRequest,
    ModelResponse,
    ResponseBlock,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
    Usage,
)
from orchestration.retry import RetryPolicy
from tests.orchestration.scripts import tool_loop
from toolbus.bus import AgentBus
from toolbus.toolspec import ToolOutcome


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_lines_land_in_order_and_no_descriptor_stays_open(tmp_path: Path) -> None:
    path = tmp_path / "transcripts" / "a1.jsonl"
    transcript = Transcript(path)
    transcript.append("early", {"n": 1})  # before touch: the file is made by the append
    transcript.touch()
    before = _open_descriptors()
    transcript.append("open", ["x", 2])
    transcript.append_json("message", '{"role":"user","content":[]}')
    assert _open_descriptors() == before
    records = _lines(path)
    assert [r["kind"] for r in records] == ["early", "open", "message"]
    assert records[2]["data"] == {"role": "user", "content": []}
    assert all(isinstance(r["ts"], float) for r in records)


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_transcript_without_a_path_writes_nothing(tmp_path: Path) -> None:
    transcript = Transcript(None)
    transcript.touch()
    transcript.append("kind", {"a": 1})
    transcript.append_json("message", "{}")
    assert list(tmp_path.iterdir()) == []


class _Answers:
    """A model that answers with text, so that the loop ends after one turn."""

    name = "test-model"

    async def complete(self, request: ModelRequest) -> ModelResponse:
        return ModelResponse(
            content=[TextBlock(text="done, nothing to change")],
            stop_reason="end_turn",
            usage=Usage(input_tokens=10, output_tokens=5),
        )


def _loop(path: Path, messages: list[Message], reserved: list[int]) -> AgentLoop:
    def reserve(amount: int) -> bool:
        reserved.append(amount)
        return True

    async def no_workspace() -> AgentBus:
        return cast(AgentBus, object())  # a final answer runs no tool

    return AgentLoop(
        model=_Answers(),
        model_name="test-model",
        bus=None,
        workspace_ready=no_workspace,
        budget=Budget(reserve, lambda reserved, used: None, lambda: "unlimited"),
        retry=RetryPolicy(max_attempts=1),
        system_prefix="prefix " * 50,
        system_task="task",
        tools=[],
        max_turns=3,
        max_output_tokens=1000,
        on_turn=lambda progress, reserved, used: None,
        transcript=Transcript(path),
        messages=messages,
    )


def test_a_resumed_history_is_sized_and_the_transcript_holds_each_new_message(
    tmp_path: Path,
) -> None:
    resumed = [
        Message(role="user", content=[TextBlock(text="start")]),
        Message(
            role="assistant",
            content=[ToolUseBlock(id="t1", name="read_file", input={"path": "README.md"})],
        ),
        Message(
            role="user", content=[ToolResultBlock(tool_use_id="t1", content="# readme\n" * 40)]
        ),
    ]
    path = tmp_path / "a1.jsonl"
    reserved: list[int] = []
    loop = _loop(path, list(resumed), reserved)
    loop.transcript.touch()
    outcome = anyio.run(loop.run)
    assert outcome.summary == "done, nothing to change"
    assert len(loop.messages) == 4

    # The first reservation sized the whole resumed history; the one after the turn sizes it
    # with the answer added, as a loop built afresh on the same history does.
    fresh: list[int] = []
    assert reserved[0] == _loop(tmp_path / "x.jsonl", list(resumed), fresh)._estimate_reservation()  # pyright: ignore[reportPrivateUsage]
    again = _loop(tmp_path / "y.jsonl", list(loop.messages), fresh)
    assert loop._estimate_reservation() == again._estimate_reservation()  # pyright: ignore[reportPrivateUsage]
    assert loop._estimate_reservation() > reserved[0]  # pyright: ignore[reportPrivateUsage]

    # Only the message this loop added is in its transcript, exactly as the model sent it.
    messages = [r["data"] for r in _lines(path) if r["kind"] == "message"]
    assert messages == [loop.messages[-1].model_dump(mode="json")]


class _TwoTurns:
    """Asks for two tool calls, then answers; at its second call the transcript on disk must
    already hold the first turn's tool results and the message that carries them."""

    name = "test-model"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: list[list[str]] = []

    async def complete(self, request: ModelRequest) -> ModelResponse:
        self.seen.append([r["kind"] for r in _lines(self.path)])
        if len(self.seen) == 1:
            uses: list[ResponseBlock] = [
                ToolUseBlock(id=f"t{n}", name="write_file", input={"n": n}) for n in (1, 2)
            ]
            return ModelResponse(
                content=uses, stop_reason="tool_use", usage=Usage(input_tokens=10, output_tokens=5)
            )
        return ModelResponse(
            content=[TextBlock(text="done")],
            stop_reason="end_turn",
            usage=Usage(input_tokens=10, output_tokens=5),
        )


class _Tools:
    """Runs any call; each sees what the transcript on disk holds when it starts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: list[list[str]] = []

    async def call(self, name: str, args: dict[str, Any], why: str = "") -> ToolOutcome:
        self.seen.append([r["kind"] for r in _lines(self.path)])
        await anyio.lowlevel.checkpoint()
        return ToolOutcome(content=f"{name} ok")


def test_a_batched_transcript_writes_a_turn_at_once_and_nothing_waits_unwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a1.jsonl"
    writes: list[int] = []
    real = agent_module.append_text

    def counted(target: Path, text: str, *, fsync: bool = False, parents: bool = False) -> None:
        writes.append(text.count("\n"))
        real(target, text, fsync=fsync, parents=parents)

    monkeypatch.setattr(agent_module, "append_text", counted)
    model, tools = _TwoTurns(path), _Tools(path)
    loop = tool_loop(model, tools, transcript=Transcript(path, batched=True))
    outcome = anyio.run(loop.run)
    assert outcome.summary == "done"
    start = ["system", "task", "message"]
    assert model.seen[0] == start  # on disk before the first call
    assert tools.seen[0] == tools.seen[1] == [*start, "message"]  # the call's request, too
    assert model.seen[1] == [*start, "message", "tool_result", "tool_result", "message"]
    kinds = [r["kind"] for r in _lines(path)]
    assert kinds == [*model.seen[1], "message"]  # the answer, written as the loop ended
    assert writes == [3, 1, 3, 1]  # one write per wait, not one per line
