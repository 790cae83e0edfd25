"""The model seam: the `Model` protocol and the provider-neutral messages it exchanges.

Providers (Anthropic, FunctionModel, ScriptedModel) implement `Model`; they raise
`orchestration.errors.ModelError` subclasses and do no retries (see `orchestration.retry`)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Annotated, Literal, Protocol, TypeGuard, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator

from toolbus.toolspec import ToolSpec


def estimate_tokens(text: str) -> int:
    """A cheap token estimate for cost estimates: ceil(characters / 4)."""
    return math.ceil(len(text) / 4)


class TextBlock(BaseModel):
    """Text from the model (or from the user)."""

    type: Literal["text"] = "text"
    text: str


class ToolUseBlock(BaseModel):
    """A tool call asked for by the model."""

    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, JsonValue] = Field(default_factory=dict[str, JsonValue])


class ToolResultBlock(BaseModel):
    """The outcome of a tool call, sent back in the next user message."""

    type: Literal["tool_result"] = "tool_result"
    tool_use_id: str
    content: str
    is_error: bool = False


ContentBlock = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]
ResponseBlock = Annotated[TextBlock | ToolUseBlock, Field(discriminator="type")]


class Message(BaseModel):
    """One turn of the conversation."""

    role: Literal["user", "assistant"]
    content: list[ContentBlock]


class Usage(BaseModel):
    """Tokens of one or more model calls; `cache_write_tokens` are cache creation tokens, of
    which `cache_write_1h_tokens` were written with the one-hour lifetime."""

    model_config = ConfigDict(frozen=True)

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cache_read_tokens=self.cache_read_tokens + other.cache_read_tokens,
            cache_write_tokens=self.cache_write_tokens + other.cache_write_tokens,
            cache_write_1h_tokens=self.cache_write_1h_tokens + other.cache_write_1h_tokens,
        )

    @property
    def total(self) -> int:
        return (
            self.input_tokens
            + self.output_tokens
            + self.cache_read_tokens
            + self.cache_write_tokens
        )


class ModelRequest(BaseModel):
    """One call: `system_prefix` and `tools` are shared across a run (cached, for `cache_ttl`);
    `system_task` is the agent's own instructions."""

    model: str
    system_prefix: str
    system_task: str
    tools: list[ToolSpec] = Field(default_factory=list[ToolSpec])
    messages: list[Message]
    max_tokens: int = Field(gt=0)
    cache_ttl: Literal["5m", "1h"] = "5m"


class ModelResponse(BaseModel):
    """The model's answer. `stop_reason` defaults to `tool_use` when a tool is called, else
    `end_turn`; other values (`max_tokens`, `pause_turn`, `refusal`,
    `model_context_window_exceeded`, …) are passed through for the loop to decide."""

    content: list[ResponseBlock]
    stop_reason: str = ""
    usage: Usage = Field(default_factory=Usage)
    model: str = ""

    @model_validator(mode="after")
    def _default_stop_reason(self) -> ModelResponse:
        if not self.stop_reason:
            self.stop_reason = "tool_use" if self.tool_uses else "end_turn"
        return self

    @property
    def tool_uses(self) -> list[ToolUseBlock]:
        return [b for b in self.content if isinstance(b, ToolUseBlock)]

    @property
    def text(self) -> str:
        return "".join(b.text for b in self.content if isinstance(b, TextBlock))


class Model(Protocol):
    """Anything that answers a `ModelRequest`."""

    @property
    def name(self) -> str: ...

    async def complete(self, request: ModelRequest) -> ModelResponse: ...


@runtime_checkable
class StartSignallingModel(Model, Protocol):
    """A model that can tell when its response begins (the API streams it), which is when what
    the request wrote to the prompt cache becomes readable for other requests."""

    async def complete_signalled(
        self,
        request: ModelRequest,
        on_start: Callable[[], None],
        *,
        on_sent: Callable[[], None] | None = None,
    ) -> ModelResponse:
        """`complete`, calling `on_start` when the response begins and `on_sent` (if given)
        when the request is handed to the HTTP client."""
        ...


_SIGNALLING: dict[type, bool] = {}


def signals_start(model: Model) -> TypeGuard[StartSignallingModel]:
    """Whether `model` is a `StartSignallingModel`, decided once per class: a check against a
    runtime protocol looks up each of its members, and a run asks it of every agent."""
    kind = type(model)
    known = _SIGNALLING.get(kind)
    if known is None:
        known = _SIGNALLING[kind] = isinstance(model, StartSignallingModel)
    return known


def _dump(value: BaseModel | list[BaseModel]) -> str:
    if isinstance(value, list):
        return json.dumps([v.model_dump(mode="json") for v in value])
    return value.model_dump_json()


def estimate_request_tokens(request: ModelRequest) -> int:
    """Estimated input tokens of a request (system, tools and messages as JSON)."""
    return estimate_tokens(
        request.system_prefix
        + request.system_task
        + _dump(list[BaseModel](request.tools))
        + _dump(list[BaseModel](request.messages))
    )


def estimate_usage(request: ModelRequest, response: ModelResponse) -> Usage:
    """Usage from text sizes, for models that do not report it (no cache accounting)."""
    return Usage(
        input_tokens=estimate_request_tokens(request),
        output_tokens=max(1, estimate_tokens(_dump(list[BaseModel](response.content)))),
    )
