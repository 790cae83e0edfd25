"""The subagent loop: model ⇄ subagent tools ⇄ tool bus, until finish or a bound is hit."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestration.caching import CacheTtl, PrefixWarmup
from orchestration.contracts import StopReason, TokenUsage
from orchestration.errors import ModelError
from orchestration.model import (
    Message,
    Model,
    ModelRequest,
    ModelResponse,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
    Usage,
    signals_start,
)
from orchestration.prompts import FINISH_TOOL, FIRST_MESSAGE
from orchestration.rate_gate import RateGate
from orchestration.retry import RetryPolicy, call_with_retry
from toolbus.audit import append_text
from toolbus.bus import AgentBus
from toolbus.toolspec import ToolOutcome, ToolSpec

READ_ONLY_TOOLS = frozenset({"read_file", "list_files", "search"})
FILE_TOOLS = READ_ONLY_TOOLS | {"write_file", "edit_file"}
"""The bus's own file tools: they take a moment, so a turn that calls only these (and finish) is
recorded once the next request is under way (see `AgentLoop._turns`)."""
CHARS_PER_TOKEN = 4

log = logging.getLogger(__name__)


MAX_RESULT_SUMMARY_CHARS = 20_000
"""The most of a summary (or of a final text without `finish`) an agent's result keeps."""
MAX_FOLLOW_UPS = 20
MAX_FOLLOW_UP_CHARS = 2_000


class FinishArgs(BaseModel):
    """The arguments of the `finish` tool. The result keeps the summary whole; answers show at
    most `SUMMARY_ANSWER_CHARS` of it (the finish tool's schema tells the model so)."""

    model_config = ConfigDict(extra="forbid")

    summary: str = Field(min_length=1, max_length=MAX_RESULT_SUMMARY_CHARS)
    follow_ups: list[Annotated[str, Field(max_length=MAX_FOLLOW_UP_CHARS)]] = Field(
        default_factory=list[str], max_length=MAX_FOLLOW_UPS
    )
    status: Literal["done", "failed"] = "done"


def bounded_final_text(text: str) -> str:
    """A final reply without `finish`, as the result keeps it: at most
    `MAX_RESULT_SUMMARY_CHARS`, cut with a note saying how much was left out."""
    text = text.strip()
    if len(text) <= MAX_RESULT_SUMMARY_CHARS:
        return text
    cut = MAX_RESULT_SUMMARY_CHARS - 80
    return f"{text[:cut]}\n[... {len(text) - cut} more characters of the final reply not kept]"


class Budget:
    """A run's shared token pool as the loop sees it: reserve before a turn, settle after."""

    def __init__(
        self,
        reserve: Callable[[int], bool],
        settle: Callable[[int, int], None],
        describe: Callable[[], str],
    ) -> None:
        self.reserve = reserve
        self.settle = settle
        self.describe = describe


@dataclass
class Progress:
    """What the loop has done so far; readable after a cancellation."""

    turns: int = 0
    tokens: TokenUsage = field(default_factory=TokenUsage)


@dataclass
class LoopOutcome:
    """How the loop ended."""

    stop_reason: StopReason
    summary: str = ""
    follow_ups: list[str] = field(default_factory=list[str])
    failed_by_model: bool = False
    error: str | None = None


def usage_to_tokens(usage: Usage) -> TokenUsage:
    return TokenUsage(
        input=usage.input_tokens,
        output=usage.output_tokens,
        cache_read=usage.cache_read_tokens,
        cache_write=usage.cache_write_tokens,
        cache_write_1h=usage.cache_write_1h_tokens,
    )


_PAYLOAD_ENCODER = json.JSONEncoder(default=str)
# (what `json.dumps(payload, default=str)` makes at every call)


class Transcript:
    """An agent's messages as JSON lines on disk, read on demand, never pushed to the client.

    Each write opens the file, appends and closes it: a running agent holds no file descriptor
    for it (a server may run hundreds of agents, and some systems allow a process 256).
    `batched`: lines are kept until `flush`, which the loop calls before each wait (a model
    call, tools, a retry's delay), so a turn's lines cost one write and none waits unwritten."""

    def __init__(self, path: Path | None, *, batched: bool = False) -> None:
        self.path = path
        self.batched = batched
        self._pending: list[str] = []

    def flush(self) -> None:
        """Write the lines kept so far."""
        if self._pending and self.path is not None:
            lines, self._pending = "".join(self._pending), []
            append_text(self.path, lines, parents=True)

    def touch(self) -> None:
        """Create the file (from a worker thread, for a loop whose appends are not batched);
        appends then only open it."""
        if self.path is not None:
            append_text(self.path, "", parents=True)

    def append(self, kind: str, payload: object) -> None:
        if self.path is not None:
            self.append_json(kind, _PAYLOAD_ENCODER.encode(payload))

    def append_json(self, kind: str, data: str) -> None:
        """`append` of a payload already serialized to JSON (`data`): the line is what
        `json.dumps({"ts": …, "kind": kind, "data": payload})` gives."""
        if self.path is None:
            return
        line = f'{{"ts": {time.time()!r}, "kind": {json.dumps(kind)}, "data": {data}}}\n'
        if self.batched:
            self._pending.append(line)
        else:
            append_text(self.path, line, parents=True)


@dataclass
class AgentLoop:
    """One agent's conversation with its model, every side effect through its bus."""

    model: Model
    model_name: str
    bus: AgentBus | None
    budget: Budget
    retry: RetryPolicy
    system_prefix: str
    system_task: str
    tools: Sequence[ToolSpec]
    max_turns: int
    max_output_tokens: int
    # After each turn: (progress, tokens reserved for the turn, tokens it used); it settles the
    # turn's budget reservation.
    on_turn: Callable[[Progress, int, int], None]
    transcript: Transcript
    progress: Progress = field(default_factory=Progress)
    messages: list[Message] = field(default_factory=list[Message])
    # When the loop starts before its workspace exists (`bus=None`): awaited once the first
    # answer is in, before anything is recorded of it or any tool runs; gives the bus.
    workspace_ready: Callable[[], Awaitable[AgentBus]] | None = None
    # The run's prompt-cache warm-up (its first request goes alone) and its prefix's lifetime.
    warmup: PrefixWarmup | None = None
    # The pace of the requests to its model's API, shared with the other agents calling it.
    rate_gate: RateGate | None = None
    cache_ttl: CacheTtl = "5m"
    # Work its owner does ahead while the model thinks (the runner prepares the agent's
    # commit): called once a call that follows a turn whose tools may have changed the
    # workspace has waited half as long as the call before it took, so that it runs after
    # the burst of other agents' requests and before the answer; not if the answer comes
    # first. It must be quick, and may fail: that is logged, and nothing else happens.
    while_waiting: Callable[[], None] | None = None
    # Whether a loop that ends (not by an exception) leaves its last turn's record to its
    # owner (`waiting_turn`), who records it in the same step as the agent's final state.
    owner_records_last_turn: bool = False
    # the size of `messages` serialized, and how many of them it counts
    _message_chars: int = field(default=0, init=False, repr=False)
    _counted: int = field(default=0, init=False, repr=False)
    _fixed_chars: int | None = field(default=None, init=False, repr=False)
    # (reservation, tokens used) of the last turn while its record waits (see `_turns`)
    _unrecorded: tuple[int, int] | None = field(default=None, init=False, repr=False)
    # whether a tool that may change the workspace ran since `while_waiting` last did
    _changed: bool = field(default=False, init=False, repr=False)
    _last_call_s: float | None = field(default=None, init=False, repr=False)

    def _estimate_reservation(self) -> int:
        self._count_messages()
        if self._fixed_chars is None:  # the prompt and the tools do not change during a loop
            self._fixed_chars = (
                len(self.system_prefix)
                + len(self.system_task)
                + sum(t.prompt_chars for t in self.tools)
            )
        chars = self._fixed_chars + self._message_chars
        # Upper bound: every input token billed as a cache write (×1.25), plus the full output.
        return int(chars / CHARS_PER_TOKEN * 1.25) + self.max_output_tokens

    async def run(self) -> LoopOutcome:
        """Run until finish, a final answer, or a bound; raises only on cancellation."""
        try:
            return await self._run()
        finally:
            self.transcript.flush()

    async def _run(self) -> LoopOutcome:
        if not self.messages:
            self.transcript.append("system", {"prefix_chars": len(self.system_prefix)})
            self.transcript.append("task", self.system_task)
            self._add(Message(role="user", content=[TextBlock(text=FIRST_MESSAGE)]))
        ended = False
        try:
            outcome = await self._turns()
            ended = True
            return outcome
        finally:
            if not (ended and self.owner_records_last_turn):
                self._record_turn()  # a turn whose record waited for the next request

    @property
    def waiting_turn(self) -> tuple[int, int] | None:
        """(reservation, tokens used) of the loop's last turn while its record waits: after
        the loop ended, left to its owner (`owner_records_last_turn`), which records it with
        the agent's final state and then says so (`last_turn_recorded`), or else records it
        on its own (`record_last_turn`)."""
        return self._unrecorded

    def last_turn_recorded(self) -> None:
        """The owner recorded the waiting turn with the agent's final state."""
        self._unrecorded = None

    def record_last_turn(self) -> None:
        """Record the loop's last turn if its record still waits (see `waiting_turn`)."""
        self._record_turn()

    def _record_turn(self) -> None:
        """Record the last turn and settle its reservation (`on_turn`), if not done yet."""
        if self._unrecorded is not None:
            reservation, used = self._unrecorded
            self._unrecorded = None
            self.on_turn(self.progress, reservation, used)

    async def _turns(self) -> LoopOutcome:
        while self.progress.turns < self.max_turns:
            reservation = self._estimate_reservation()
            if not self.budget.reserve(reservation):
                self._record_turn()  # the last turn's reservation, settled, may make room
                if not self.budget.reserve(reservation):
                    return LoopOutcome(
                        StopReason.BUDGET_EXHAUSTED,
                        error="the run's token budget cannot cover another turn "
                        f"({self.budget.describe()})",
                    )
            try:
                response = await self._complete()
            except ModelError as exc:
                self.budget.settle(reservation, 0)
                return LoopOutcome(StopReason.MODEL_ERROR, error=str(exc))
            except BaseException:
                self.budget.settle(reservation, 0)
                raise
            tokens = usage_to_tokens(response.usage)
            try:
                bus = await self._bus()
            except BaseException:
                self.budget.settle(reservation, tokens.billed_equivalent)
                raise
            self.progress.turns += 1
            self.progress.tokens = self.progress.tokens + tokens
            self._add(Message(role="assistant", content=list(response.content)))
            # The turn is recorded and its reservation settled in one step: before tools that
            # may take a while, else once the next request is under way (`_complete`), so that
            # in a burst of agents none of them waits for the others' records to send its own.
            self._unrecorded = (reservation, tokens.billed_equivalent)
            uses = [b for b in response.content if isinstance(b, ToolUseBlock)]
            if any(u.name not in FILE_TOOLS and u.name != FINISH_TOOL.name for u in uses):
                self._record_turn()

            if response.stop_reason in ("refusal", "model_context_window_exceeded"):
                return LoopOutcome(
                    StopReason.REFUSED,
                    error=f"the model stopped with stop_reason={response.stop_reason}",
                )
            if not uses:
                if response.stop_reason == "pause_turn":
                    continue
                text = "\n".join(b.text for b in response.content if isinstance(b, TextBlock))
                return LoopOutcome(StopReason.FINAL_ANSWER, summary=bounded_final_text(text))
            why = "\n".join(b.text for b in response.content if isinstance(b, TextBlock))
            self.transcript.flush()  # what the agent is about to do shows while it runs
            if any(u.name not in READ_ONLY_TOOLS for u in uses):
                self._changed = True
            results, finish = await self._run_tools(bus, uses, why)
            if finish is not None:
                return LoopOutcome(
                    StopReason.FINISHED,
                    summary=finish.summary,
                    follow_ups=finish.follow_ups,
                    failed_by_model=finish.status == "failed",
                )
            self._add(Message(role="user", content=list(results)))
        return LoopOutcome(
            StopReason.MAX_TURNS,
            error=f"stopped after max_turns={self.max_turns} without calling finish",
        )

    def _add(self, message: Message) -> None:
        """Append `message` to the history and the transcript, serialized once for both."""
        self._count_messages()
        dumped = message.model_dump_json()
        self.messages.append(message)
        self._message_chars += len(dumped)
        self._counted += 1
        self.transcript.append_json("message", dumped)

    def _count_messages(self) -> None:
        """Size the messages the loop was given (a resumed history) that are not counted yet."""
        if self._counted != len(self.messages):
            self._message_chars = sum(len(m.model_dump_json()) for m in self.messages)
            self._counted = len(self.messages)

    async def _bus(self) -> AgentBus:
        if self.bus is None:
            if self.workspace_ready is None:
                raise RuntimeError("an AgentLoop needs a bus or a workspace_ready callback")
            self.bus = await self.workspace_ready()
        return self.bus

    async def _complete(self) -> ModelResponse:
        """The model's answer to the history; the last turn's record (if it waits) is made
        once this request is under way."""
        self.transcript.flush()
        request = ModelRequest(
            model=self.model_name,
            system_prefix=self.system_prefix,
            system_task=self.system_task,
            tools=list(self.tools),
            messages=list(self.messages),
            max_tokens=self.max_output_tokens,
            cache_ttl=self.cache_ttl,
        )
        # Only the loop's first call takes part in the run's warm-up, and only with a model
        # that tells when its response begins (the API's prompt cache is behind no other).
        warmup, self.warmup = self.warmup, None
        model = self.model
        release = None
        if warmup is not None and signals_start(model):
            release = await warmup.before_first_call()
        first_sent = warmup.sent if warmup is not None else None

        async def send() -> ModelResponse:
            if release is None or not signals_start(model):
                return await model.complete(request)
            writer = release
            return await model.complete_signalled(request, lambda: writer(True), on_sent=first_sent)

        gate = self.rate_gate

        async def attempt() -> ModelResponse:
            try:
                # (a refusal for the rate limit paces the others before they are let go)
                return await (send() if gate is None else gate.call(send))
            finally:
                if release is not None and signals_start(model):
                    release(False)  # failed or cancelled: the others go on (no-op once begun)

        def note_retry(error: ModelError, delay_s: float) -> None:
            self.transcript.append("model_retry", {"error": str(error), "delay_s": delay_s})
            self.transcript.flush()

        # The turn's record and the work ahead are callbacks of the event loop, not tasks (a
        # task group costs more than either in a burst of agents; the server runs on asyncio,
        # anyio's default backend).
        loop = asyncio.get_running_loop()
        started = loop.time()
        recorded: list[bool] = []
        failed: list[Exception] = []

        def record() -> None:
            recorded.append(True)
            try:
                self._record_turn()
            except Exception as exc:  # raised below, once the call is over
                failed.append(exc)

        ahead = self.while_waiting if self._changed else None

        def work_ahead(work: Callable[[], None]) -> None:
            self._changed = False
            try:
                work()
            except Exception:
                log.warning("work ahead of a model's answer failed", exc_info=True)

        # the record runs at the call's first wait: its request is built, and on its way
        pending = loop.call_soon(record) if self._unrecorded is not None else None
        timer = (
            loop.call_later(self._last_call_s / 2, work_ahead, ahead)
            if ahead is not None and self._last_call_s is not None
            else None
        )
        answer: ModelResponse | None = None
        try:
            answer = await call_with_retry(attempt, self.retry, on_retry=note_retry)
        except Exception as exc:
            failed.insert(0, exc)
        finally:
            if timer is not None:
                timer.cancel()
            if pending is not None and not recorded:
                pending.cancel()  # (a call that never waited; cancelled: `_run` records it)
        if pending is not None and not recorded:
            record()
        if failed or answer is None:
            raise failed[0]
        self._last_call_s = loop.time() - started
        return answer

    async def _run_tools(
        self, bus: AgentBus, uses: list[ToolUseBlock], why: str = ""
    ) -> tuple[list[ToolResultBlock], FinishArgs | None]:
        """Run a turn's tool calls in order; consecutive reads concurrently, the rest one by one."""
        outcomes: dict[str, ToolOutcome] = {}
        finish: FinishArgs | None = None
        batch: list[ToolUseBlock] = []

        async def flush() -> None:
            if len(batch) == 1:
                await call_one(batch[0])  # (no task group for one call)
            elif batch:
                async with anyio.create_task_group() as tg:
                    for use in batch:
                        tg.start_soon(call_one, use)
            batch.clear()

        async def call_one(use: ToolUseBlock) -> None:
            outcomes[use.id] = await bus.call(use.name, use.input, why)

        finish_use: ToolUseBlock | None = None
        for use in uses:
            if use.name == FINISH_TOOL.name:
                finish_use = use
            elif use.name in READ_ONLY_TOOLS:
                batch.append(use)
            else:
                await flush()
                await call_one(use)
        await flush()
        if finish_use is not None:
            try:
                finish = FinishArgs.model_validate(finish_use.input)
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc']) or 'arguments'}: {e['msg']}"
                    for e in exc.errors()
                )
                outcomes[finish_use.id] = ToolOutcome(
                    content=f"finish refused: {problems}. Call finish with a non-empty summary.",
                    is_error=True,
                )
        results = [
            ToolResultBlock(
                tool_use_id=use.id,
                content=outcomes[use.id].content if use.id in outcomes else "finished",
                is_error=outcomes[use.id].is_error if use.id in outcomes else False,
            )
            for use in uses
        ]
        for r in results:
            self.transcript.append("tool_result", r.model_dump(mode="json"))
        return results, finish
