"""When the loop records a turn: once the next request is under way when the turn called only
the bus's file tools, before the tools otherwise, and at the end in any case; the budget's
reservation of a turn whose record waits never refuses the next one."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel

from orchestration.agent import Budget, LoopOutcome, Progress
from orchestration.contracts import StopReason
from orchestration.model import (
    ModelRequest,
    ModelResponse,
    ResponseBlock,
    TextBlock,
    ToolUseBlock,
    Usage,
)
from tests.orchestration.scripts import tool_loop
from toolbus.toolspec import ToolOutcome

Events = list[tuple[str, object]]


class _Scripted:
    """Answers with each turn's tool calls in order, then with a final text."""

    name = "test-model"

    def __init__(self, turns: list[list[str]], events: Events) -> None:
        self.turns = turns
        self.events = events
        self.calls = 0

    async def complete(self, request: ModelRequest) -> ModelResponse:
        self.calls += 1
        self.events.append(("call", self.calls))
        await anyio.lowlevel.checkpoint()  # the request is on its way
        usage = Usage(input_tokens=10, output_tokens=5)
        if self.calls > len(self.turns):
            return ModelResponse(
                content=[TextBlock(text="done")], stop_reason="end_turn", usage=usage
            )
        uses: list[ResponseBlock] = [
            ToolUseBlock(id=f"t{self.calls}-{i}", name=name, input={})
            for i, name in enumerate(self.turns[self.calls - 1])
        ]
        return ModelResponse(content=uses, stop_reason="tool_use", usage=usage)


class _Tools:
    def __init__(self, events: Events) -> None:
        self.events = events

    async def call(self, name: str, args: dict[str, Any], why: str = "") -> ToolOutcome:
        self.events.append(("tool", name))
        await anyio.lowlevel.checkpoint()
        return ToolOutcome(content=f"{name} ok")


class _OneAtATime:
    """A pool that holds one reservation at a time: the next is refused until the last is
    settled."""

    def __init__(self, events: Events) -> None:
        self.events = events
        self.reserved = 0

    def reserve(self, amount: int) -> bool:
        if self.reserved:
            self.events.append(("refused", amount))
            return False
        self.reserved = amount
        return True

    def settle(self, reserved: int, used: int) -> None:
        self.reserved = 0


def _run(turns: list[list[str]], *, full_pool: bool = True) -> tuple[LoopOutcome, Events]:
    """The loop over those turns; with `full_pool`, a pool of one reservation at a time."""
    events: Events = []
    pool = _OneAtATime(events)

    def on_turn(progress: Progress, reserved: int, used: int) -> None:
        events.append(("turn", progress.turns))
        pool.settle(reserved, used)

    loop = tool_loop(
        _Scripted(turns, events),
        _Tools(events),
        budget=Budget(pool.reserve, pool.settle, lambda: "one at a time") if full_pool else None,
        on_turn=on_turn,
        max_turns=10,
    )
    return anyio.run(loop.run), events


def test_a_turn_of_file_tools_is_recorded_once_the_next_request_is_under_way() -> None:
    outcome, events = _run([["write_file"], ["read_file", "edit_file"]])
    assert outcome.stop_reason == StopReason.FINAL_ANSWER
    assert events == [
        ("call", 1),
        ("tool", "write_file"),
        ("refused", events[2][1]),  # turn 1's reservation still held: recorded, then reserved
        ("turn", 1),
        ("call", 2),
        ("tool", "read_file"),
        ("tool", "edit_file"),
        ("refused", events[7][1]),
        ("turn", 2),
        ("call", 3),
        ("turn", 3),
    ]


def test_without_a_full_pool_the_record_follows_the_request() -> None:
    outcome, events = _run([["write_file"], ["search"]], full_pool=False)
    assert outcome.summary == "done"
    assert events == [
        ("call", 1),
        ("tool", "write_file"),
        ("call", 2),
        ("turn", 1),
        ("tool", "search"),
        ("call", 3),
        ("turn", 2),
        ("turn", 3),
    ]


def test_a_turn_that_runs_a_command_is_recorded_before_it() -> None:
    outcome, events = _run([["run_command"]])
    assert outcome.summary == "done"
    assert events == [("call", 1), ("turn", 1), ("tool", "run_command"), ("call", 2), ("turn", 2)]


class _Timed(_Scripted):
    """`_Scripted`, each call taking its time from `durations`."""

    def __init__(self, turns: list[list[str]], events: Events, durations: list[float]) -> None:
        super().__init__(turns, events)
        self.durations = durations

    async def complete(self, request: ModelRequest) -> ModelResponse:
        answer = await super().complete(request)
        await anyio.sleep(self.durations[self.calls - 1])
        self.events.append(("answer", self.calls))
        return answer


def _run_ahead(turns: list[list[str]], durations: list[float]) -> Events:
    events: Events = []
    loop = tool_loop(_Timed(turns, events, durations), _Tools(events), max_turns=10)
    loop.while_waiting = lambda: events.append(("ahead", None))
    anyio.run(loop.run)
    return [e for e in events if e[0] in ("call", "ahead", "answer")]


def test_work_ahead_runs_during_a_call_that_follows_a_change() -> None:
    events = _run_ahead(
        [["write_file"], ["read_file"], ["edit_file", "read_file"]], [0.05, 0.1, 0.1, 0.1]
    )
    # not during the first call (no change yet) nor after a turn of reads; once per change,
    # half the last call's time into the next
    assert events == [
        ("call", 1),
        ("answer", 1),
        ("call", 2),
        ("ahead", None),
        ("answer", 2),
        ("call", 3),
        ("answer", 3),
        ("call", 4),
        ("ahead", None),
        ("answer", 4),
    ]


def test_work_ahead_waits_for_a_change_and_a_call_that_lasts() -> None:
    # the second call answers before half of the first one's time: nothing is done ahead then,
    # and the change is still to be worked on during the next call
    events = _run_ahead([["write_file"], ["read_file"]], [0.2, 0.01, 0.05])
    assert events == [
        ("call", 1),
        ("answer", 1),
        ("call", 2),
        ("answer", 2),
        ("call", 3),
        ("ahead", None),
        ("answer", 3),
    ]
