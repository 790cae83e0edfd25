"""A Messages API request as a fake's handler sees it: the parsed body plus convenient views."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from pydantic import JsonValue


@dataclass(frozen=True)
class ToolResult:
    """A `tool_result` block sent back by the client."""

    tool_use_id: str
    content: str
    is_error: bool = False


def content_text(content: Any) -> str:
    """The text of a message's or tool result's content (a string or a list of blocks)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    parts: list[str] = []
    for block in cast(list[Any], content):
        if isinstance(block, dict):
            typed = cast(dict[str, Any], block)
            if typed.get("type") == "text" and isinstance(typed.get("text"), str):
                parts.append(typed["text"])
    return "".join(parts)


def _dicts(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        return []
    return [cast(dict[str, Any], v) for v in cast(list[Any], value) if isinstance(v, dict)]


@dataclass(frozen=True)
class FakeRequest:
    """One `POST /v1/messages` request: its JSON body, headers of interest and log position."""

    body: dict[str, JsonValue]
    headers: dict[str, str] = field(default_factory=dict[str, str])
    index: int = 0

    @property
    def _raw(self) -> dict[str, Any]:
        return cast(dict[str, Any], self.body)

    @property
    def model(self) -> str:
        return str(self._raw.get("model", ""))

    @property
    def stream(self) -> bool:
        return self._raw.get("stream") is True

    @property
    def max_tokens(self) -> int:
        value = self._raw.get("max_tokens", 0)
        return value if isinstance(value, int) else 0

    @property
    def system_text(self) -> str:
        """The whole system prompt as one string (blocks joined with a newline)."""
        system = self._raw.get("system")
        if isinstance(system, str):
            return system
        return "\n".join(b["text"] for b in _dicts(system) if isinstance(b.get("text"), str))

    @property
    def messages(self) -> list[dict[str, Any]]:
        return _dicts(self._raw.get("messages"))

    @property
    def tool_names(self) -> list[str]:
        return [str(t.get("name")) for t in _dicts(self._raw.get("tools"))]

    @property
    def assistant_turns(self) -> int:
        """How many assistant turns the conversation already holds (the script position)."""
        return sum(1 for m in self.messages if m.get("role") == "assistant")

    @property
    def first_user_text(self) -> str:
        for message in self.messages:
            if message.get("role") == "user":
                return content_text(message.get("content"))
        return ""

    @property
    def last_user_text(self) -> str:
        for message in reversed(self.messages):
            if message.get("role") == "user":
                return content_text(message.get("content"))
        return ""

    @property
    def tool_results(self) -> list[ToolResult]:
        """The tool results in the last user message (answers to the previous tool calls)."""
        for message in reversed(self.messages):
            if message.get("role") != "user":
                continue
            results: list[ToolResult] = []
            for block in _dicts(message.get("content")):
                if block.get("type") == "tool_result":
                    inner = block.get("content", "")
                    results.append(
                        ToolResult(
                            tool_use_id=str(block.get("tool_use_id", "")),
                            content=content_text(inner),
                            is_error=block.get("is_error") is True,
                        )
                    )
            return results
        return []
