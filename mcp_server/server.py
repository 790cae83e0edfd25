"""The MCP server: five orchestration tools, a health check, resources and a prompt.

One `Orchestrator` per server process, opened in the lifespan; on shutdown its running agents
become `interrupted`. Tool inputs and outputs are the contracts models: each tool publishes an
`outputSchema`, answers `structuredContent` plus a short text table, and refuses unknown fields.
The tools are declared in `tools`, the resources in `resources`, the prompt in `prompts`, the
patches of SDK internals in `sdk_patches`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Iterable
from contextlib import asynccontextmanager
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from mcp.server.subscriptions import InMemorySubscriptionBus
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, InputRequiredResult
from pydantic.networks import AnyUrl

from mcp_server import sdk_patches
from mcp_server.app import App
from mcp_server.errors import resource_error, tool_error
from mcp_server.prompts import register_prompts
from mcp_server.resources import register_resources
from mcp_server.tools import sdk_tools
from orchestration.config import Settings
from orchestration.orchestrator import ModelFactory

log = logging.getLogger("fanout.mcp")

SERVER_NAME = "fanout"
VERSION = "0.1.0"

INSTRUCTIONS = """\
fanout runs a team of parallel subagents on this git repository. Each subagent works in its own
isolated copy, from one pinned base commit, and may only write inside its write_scope. Fan out
when a goal splits into large, independent chunks (e.g. one module each); for a small change do
it yourself. Flow: spawn_subagents (returns at once) -> get_status(run_id, since=cursor,
wait_s=600), which answers once the run needs you (`settled`) with one line per agent and `next`
-> do `next` (usually merge_results; waiting agents start after it) -> poll again until `next`
says nothing is left. Read an agent's diff or detail only when its line gives a reason. Never
merge an agent's work by hand."""


def build_server(settings: Settings, model_factory: ModelFactory | None = None) -> FanoutServer:
    """The MCP server for these settings (the model factory defaults to the Anthropic API)."""
    app = App(settings, model_factory)
    return FanoutServer(app)


class FanoutServer(MCPServer[App]):
    """MCPServer with fanout's tools, resources and prompt, and the one error translation."""

    def __init__(self, app: App) -> None:
        self.app = app
        bus = InMemorySubscriptionBus()
        app.notifier.bus = bus

        @asynccontextmanager
        async def lifespan(_: MCPServer[App]) -> AsyncGenerator[App]:
            async with app.running():
                yield app

        super().__init__(
            SERVER_NAME,
            title="fanout: parallel subagents",
            version=VERSION,
            instructions=INSTRUCTIONS,
            lifespan=lifespan,
            subscriptions=bus,
            tools=sdk_tools(app),
            log_level="WARNING",
        )
        register_resources(self, app)
        register_prompts(self)
        app.notifier.install_legacy_subscribe(sdk_patches.lowlevel_server(self))
        sdk_patches.answer_tool_calls_on_the_wire(self)

    # --- the one translation of errors ------------------------------------------------------

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[App, Any] | None = None
    ) -> CallToolResult | InputRequiredResult:
        try:
            return await super().call_tool(name, arguments, context)
        except MCPError:
            raise
        except Exception as exc:
            raise tool_error(exc, name) from None

    async def read_resource(
        self, uri: AnyUrl | str, context: Context[App, Any] | None = None
    ) -> Iterable[Any] | InputRequiredResult:
        try:
            return await super().read_resource(uri, context)
        except MCPError:
            raise
        except ResourceError as exc:
            if exc.__cause__ is None:
                raise
            raise resource_error(exc, str(uri)) from None


__all__ = ["App", "FanoutServer", "ToolError", "build_server"]
