"""What a fake handler answers: a reply (text and tool_use blocks, a stop reason) or a fault."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from pydantic import JsonValue


def new_id(prefix: str) -> str:
    """An id in the API's style (`toolu_…`, `msg_…`)."""
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class Text:
    """A text block."""

    text: str


@dataclass(frozen=True)
class ToolUse:
    """A tool_use block; the id is generated when the reply is served unless given."""

    name: str
    input: dict[str, JsonValue] = field(default_factory=dict[str, JsonValue])
    id: str | None = None


Block = Text | ToolUse


@dataclass(frozen=True)
class Reply:
    """A successful answer. `stop_reason` defaults to `tool_use` when a tool is called, else
    `end_turn`; `latency_s` is added to the server's per-request latency."""

    content: tuple[Block, ...]
    stop_reason: str | None = None
    latency_s: float = 0.0
    output_tokens: int | None = None

    @property
    def effective_stop_reason(self) -> str:
        if self.stop_reason is not None:
            return self.stop_reason
        return "tool_use" if any(isinstance(b, ToolUse) for b in self.content) else "end_turn"


def reply(*blocks: str | Block, stop_reason: str | None = None, latency_s: float = 0.0) -> Reply:
    """A reply from blocks; a bare string is a text block."""
    content = tuple(Text(b) if isinstance(b, str) else b for b in blocks)
    return Reply(content, stop_reason=stop_reason, latency_s=latency_s)


def text(body: str, *, stop_reason: str | None = None, latency_s: float = 0.0) -> Reply:
    """A reply of one text block (ends the turn by default)."""
    return reply(body, stop_reason=stop_reason, latency_s=latency_s)


def tool_use(name: str, /, **input: JsonValue) -> Reply:
    """A reply calling one tool: `tool_use("write_file", path="a.py", content="x = 1\\n")`."""
    return Reply((ToolUse(name, dict(input)),))


def finish(summary: str, /, **extra: JsonValue) -> Reply:
    """A reply calling the subagent's `finish` tool."""
    return tool_use("finish", summary=summary, **extra)
