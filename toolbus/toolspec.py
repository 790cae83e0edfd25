"""The shape of a tool offered to a subagent's model, and of a tool call's outcome."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, JsonValue


class ToolSpec(BaseModel):
    """A tool as the model sees it: name, description, JSON schema of its input."""

    model_config = ConfigDict(frozen=True)

    name: str
    description: str
    input_schema: dict[str, JsonValue]


class ToolOutcome(BaseModel):
    """What a tool call returns to the model: text, and whether it is an error to act on."""

    content: str
    is_error: bool = False
