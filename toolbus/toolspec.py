"""The shape of a tool offered to a subagent's model, and of a tool call's outcome."""

from __future__ import annotations

import functools
import json

from pydantic import BaseModel, ConfigDict, JsonValue, field_validator

from toolbus.audit import printable


class ToolSpec(BaseModel):
    """A tool as the model sees it: name, description, JSON schema of its input."""

    model_config = ConfigDict(frozen=True)

    name: str
    description: str
    input_schema: dict[str, JsonValue]

    @functools.cached_property
    def prompt_chars(self) -> int:
        """Its description and input schema's size in characters (the spec is frozen: counted
        once, however many agents are offered it)."""
        return len(self.description) + len(json.dumps(self.input_schema))


class ToolOutcome(BaseModel):
    """What a tool call returns to the model: text, and whether it is an error to act on."""

    content: str
    is_error: bool = False

    @field_validator("content")
    @classmethod
    def _encodable(cls, text: str) -> str:
        """Lone surrogates escaped (a file name that is not UTF-8, as git lists it, or an
        error naming one): the answer must encode as JSON, for the API and the transcript."""
        return printable(text)
