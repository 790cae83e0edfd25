"""`ScriptedModel`: a `Model` that plays a list of steps in order (a dry run needs no API key).

A step is a `ModelResponse`, a function of the request returning one (sync or async), or an
exception to raise (e.g. `ModelRateLimited` to exercise retries: the retry takes the next step).
Several agents running at once share one model but not one script: `ScriptedModel.per_agent`
keys each script by a string found in the agent's `system_task` (its name or task text)::

    model = ScriptedModel.per_agent({
        "alpha": [reply_tool("write_file", path="a.py", content="A = 1\\n"), reply_finish("a")],
        "beta": [ModelOverloaded("busy"), reply_finish("nothing to do")],
    })
    ...
    model.assert_consumed()
"""

from __future__ import annotations

import inspect
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TypeAlias

from pydantic import JsonValue

from orchestration.errors import ModelFatalError
from orchestration.model import ModelRequest, ModelResponse, TextBlock, ToolUseBlock
from orchestration.providers.function import complete_response

Step: TypeAlias = (
    ModelResponse
    | BaseException
    | Callable[[ModelRequest], ModelResponse | Awaitable[ModelResponse]]
)

FINISH_TOOL_NAME = "finish"


class ScriptExhausted(ModelFatalError):
    """A scripted model was asked for more answers than its script holds (not retryable)."""


def _tool_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


def reply_text(text: str, *, stop_reason: str = "end_turn") -> ModelResponse:
    """A text answer that ends the turn."""
    return ModelResponse(content=[TextBlock(text=text)], stop_reason=stop_reason)


def reply_tool(name: str, /, **input: JsonValue) -> ModelResponse:
    """An answer calling one tool: `reply_tool("write_file", path="a.py", content="x")`."""
    return reply_tools((name, dict(input)))


def reply_tools(*calls: tuple[str, dict[str, JsonValue]], text: str = "") -> ModelResponse:
    """An answer calling several tools in one turn (parallel tool calls), after optional text."""
    blocks: list[TextBlock | ToolUseBlock] = [TextBlock(text=text)] if text else []
    blocks += [ToolUseBlock(id=_tool_id(), name=name, input=args) for name, args in calls]
    return ModelResponse(content=blocks, stop_reason="tool_use")


def reply_finish(
    summary: str, *, follow_ups: list[str] | None = None, status: str | None = None
) -> ModelResponse:
    """An answer calling the subagent's `finish` tool."""
    args: dict[str, JsonValue] = {"summary": summary}
    if follow_ups is not None:
        args["follow_ups"] = list[JsonValue](follow_ups)
    if status is not None:
        args["status"] = status
    return reply_tools((FINISH_TOOL_NAME, args))


async def _play(step: Step, request: ModelRequest) -> ModelResponse:
    if isinstance(step, BaseException):
        raise step
    if isinstance(step, ModelResponse):
        return complete_response(request, step)
    result = step(request)
    if inspect.isawaitable(result):
        result = await result
    return complete_response(request, result)


class ScriptedModel:
    """Plays `steps` in order, one per `complete` call, for this model instance. `requests`
    records what was asked; `assert_consumed()` fails if steps remain or the script overran."""

    def __init__(self, steps: Iterable[Step], *, name: str = "scripted") -> None:
        self._steps: deque[Step] = deque(steps)
        self._name = name
        self._played = 0
        self.overruns = 0
        self.requests: list[ModelRequest] = []

    @property
    def name(self) -> str:
        return self._name

    @property
    def remaining(self) -> int:
        return len(self._steps)

    def __repr__(self) -> str:
        return f"ScriptedModel({self._name!r}, played={self._played}, remaining={self.remaining})"

    async def complete(self, request: ModelRequest) -> ModelResponse:
        self.requests.append(request)
        if not self._steps:
            self.overruns += 1
            raise ScriptExhausted(
                f"scripted model {self._name!r} has no step left: it played {self._played} "
                f"step(s) and was asked once more (turn of {len(request.messages)} message(s))"
            )
        step = self._steps.popleft()
        self._played += 1
        return await _play(step, request)

    def assert_consumed(self) -> None:
        problems: list[str] = []
        if self._steps:
            problems.append(f"{len(self._steps)} step(s) not played")
        if self.overruns:
            problems.append(f"asked {self.overruns} time(s) past the end")
        if problems:
            raise AssertionError(
                f"scripted model {self._name!r}: {' and '.join(problems)} (played {self._played})"
            )

    @classmethod
    def per_agent(
        cls,
        scripts: Mapping[str, Iterable[Step]],
        *,
        default: Iterable[Step] | None = None,
        name: str = "scripted",
    ) -> KeyedScriptedModel:
        """One script per agent, chosen by a key found in the request's `system_task`."""
        return KeyedScriptedModel(scripts, default=default, name=name)


class KeyedScriptedModel:
    """Routes each request to the `ScriptedModel` whose key occurs in its `system_task` (the
    longest matching key wins), so concurrent agents each play their own script in order."""

    def __init__(
        self,
        scripts: Mapping[str, Iterable[Step]],
        *,
        default: Iterable[Step] | None = None,
        name: str = "scripted",
    ) -> None:
        self._name = name
        self.scripts = {key: ScriptedModel(steps, name=key) for key, steps in scripts.items()}
        self.default = ScriptedModel(default, name="default") if default is not None else None
        self._keys = sorted(self.scripts, key=len, reverse=True)

    @property
    def name(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"KeyedScriptedModel({self._name!r}, keys={sorted(self.scripts)})"

    def script_for(self, request: ModelRequest) -> ScriptedModel:
        for key in self._keys:
            if key in request.system_task:
                return self.scripts[key]
        if self.default is not None:
            return self.default
        raise ScriptExhausted(
            f"no script matches this agent's task (keys: {sorted(self.scripts)}); the task "
            f"begins {request.system_task[:80]!r}"
        )

    async def complete(self, request: ModelRequest) -> ModelResponse:
        return await self.script_for(request).complete(request)

    def assert_consumed(self) -> None:
        failures: list[str] = []
        for model in [*self.scripts.values(), *([self.default] if self.default else [])]:
            try:
                model.assert_consumed()
            except AssertionError as exc:
                failures.append(str(exc))
        if failures:
            raise AssertionError("; ".join(failures))
