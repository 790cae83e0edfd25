"""Tools of downstream MCP servers as the bus sees them.

The bus never speaks MCP itself (it imports no `mcp`): the server process implements
`ExternalTools` with the MCP SDK and hands it down. The bus offers each allowed tool to a subagent
as `mcp__<server>__<tool>`, puts every call under the permission policy and a lease on the
server's connection (`mcp:<server>`: read for tools annotated read-only, write for the others),
and audits it like any other call.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Protocol

from pydantic import BaseModel, ConfigDict, JsonValue

from toolbus.errors import ToolbusError
from toolbus.toolspec import ToolOutcome, ToolSpec

__all__ = [
    "MAX_SERVER_NAME",
    "SERVER_NAME",
    "ExternalServerError",
    "ExternalSession",
    "ExternalTool",
    "ExternalTools",
    "connection_lease",
    "external_name",
    "split_external_name",
]

SERVER_NAME = re.compile(r"^[A-Za-z0-9-]+(?:_[A-Za-z0-9-]+)*$")
"""What a downstream server may be called (with at most `MAX_SERVER_NAME` characters): it becomes
part of tool names (`mcp__<server>__<tool>`, so no `__` and no `_` at either end) and of lease
names."""
MAX_SERVER_NAME = 40

PREFIX = "mcp__"


class ExternalServerError(ToolbusError):
    """A downstream MCP server failed, exited, timed out or does not exist (the message says
    whether to retry)."""


class ExternalTool(BaseModel):
    """One tool of a downstream server, with the annotations that decide its lease and policy.

    MCP's defaults apply when the server gives no annotations: not read-only, destructive."""

    model_config = ConfigDict(frozen=True)

    server: str
    tool: str
    description: str = ""
    input_schema: dict[str, JsonValue]
    read_only: bool = False
    destructive: bool = True

    @property
    def name(self) -> str:
        return external_name(self.server, self.tool)

    def spec(self) -> ToolSpec:
        """The tool as a subagent's model sees it."""
        kind = "read-only" if self.read_only else "changes state"
        if not self.read_only and self.destructive:
            kind = "may destroy data"
        head = f"[MCP server {self.server!r}; {kind}] "
        return ToolSpec(
            name=self.name, description=head + self.description, input_schema=self.input_schema
        )


class ExternalSession(Protocol):
    """One agent's connections to the downstream servers (opened on first use, its own)."""

    async def call_tool(
        self, server: str, tool: str, arguments: Mapping[str, JsonValue]
    ) -> ToolOutcome:
        """Call the tool; its text is bounded like a file read. Raises `ExternalServerError`
        when the server cannot answer (it is reconnected with backoff on a later call)."""
        ...

    async def read_resource(self, server: str, uri: str) -> ToolOutcome:
        """Read one resource of the server as bounded text; raises `ExternalServerError`."""
        ...

    async def aclose(self) -> None:
        """Close this agent's connections (never another agent's)."""
        ...


class ExternalTools(Protocol):
    """The downstream servers this process may connect to (from its configuration)."""

    def servers(self) -> list[str]:
        """The configured server names, sorted."""
        ...

    async def list_tools(self, servers: Sequence[str]) -> list[ExternalTool]:
        """The tools of these servers, listed once and cached (stable order: by server, then by
        tool name). Raises `ExternalServerError` naming a server that is not configured or
        cannot be listed."""
        ...

    def session(self, agent_id: str, workspace: str | None = None) -> ExternalSession:
        """A new session for one agent whose workspace is `workspace` (its stdio servers are
        told it; they do not start there unless configured to)."""
        ...

    async def aclose(self) -> None:
        """Close every session and listing connection."""
        ...


def external_name(server: str, tool: str) -> str:
    return f"{PREFIX}{server}__{tool}"


def split_external_name(name: str) -> tuple[str, str] | None:
    """(server, tool) of an `mcp__<server>__<tool>` name; None for any other name."""
    if not name.startswith(PREFIX):
        return None
    server, sep, tool = name[len(PREFIX) :].partition("__")
    if not sep or not server or not tool:
        return None
    return server, tool


def connection_lease(server: str) -> str:
    """The named lease resource of a downstream server's connection."""
    return f"mcp:{server}"
