"""Every patch of MCP SDK internals, in one module.

fanout builds its tools with the SDK's `Tool.from_function`, then adjusts what the SDK derived
from the function (argument model, resolvers, output schema and model), holds a class the SDK
only caches weakly, and wraps the low-level `tools/call` handler. Each function says what it
patches and why; `tests/mcp_server/test_sdk_patches.py` checks, per patch, that the SDK still has
the shape the patch relies on and that the patch has its effect, so that an SDK upgrade shows at
once which patch broke.
"""

from __future__ import annotations

from typing import Any, TypeVar

from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server as LowLevelServer
from mcp.server.mcpserver import AcceptedElicitation, MCPServer
from mcp.server.mcpserver.resolve import build_resolver_plans
from mcp.server.mcpserver.tools import Tool
from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase
from mcp_types import CallToolResult
from pydantic import BaseModel, ConfigDict

from mcp_server.output_schema import simple_output_schema

M = TypeVar("M", bound=BaseModel)

ACCEPTED_ANY = AcceptedElicitation[Any]
"""The class the SDK wraps every resolver's value in (`resolve._accepted`). Pydantic keeps a
parametrized generic class only weakly, so without this reference it is collected between two
calls and rebuilt on every call of a tool that takes `roots`."""


def lowlevel_server(server: MCPServer[Any]) -> LowLevelServer[Any]:
    """The low-level server under `server` (MCPServer's private `_lowlevel_server`).

    MCPServer has no public way to wrap a request handler it registered (`tools/call`) or to add
    one it lacks (`resources/subscribe`); the low-level server has both."""
    return server._lowlevel_server  # pyright: ignore[reportPrivateUsage]


def strict_args(request_model: type[M], tool_name: str) -> type[ArgModelBase]:
    """An argument model with the request model's fields that refuses unknown fields, and hands
    the tool function the validated request as `request`."""

    class Args(request_model, ArgModelBase):  # type: ignore[misc, valid-type]
        model_config = ConfigDict(
            extra="forbid", arbitrary_types_allowed=True, title=f"{tool_name}Arguments"
        )

        def model_dump_one_level(self) -> dict[str, Any]:
            return {"request": self}

    Args.__name__ = f"{tool_name}Arguments"
    return Args  # pyright: ignore[reportUnknownVariableType]


def take_request_model(tool: Tool, request_model: type[BaseModel]) -> None:
    """Make the tool's arguments the fields of `request_model` (`fn_metadata.arg_model` and the
    published `parameters`), unknown fields refused.

    The SDK builds the argument model from the function's parameters, one field each and unknown
    fields ignored; a fanout tool takes one request model, a contract whose fields are the tool's
    arguments, and receives it validated as its `request` parameter."""
    args = strict_args(request_model, tool.name)
    tool.fn_metadata.arg_model = args
    tool.parameters = args.model_json_schema(by_alias=True)


def skip_resolvers(tool: Tool, *names: str) -> None:
    """Drop the named `Resolve(...)` parameters from the tool's `resolved_params` (and their
    plans): the SDK no longer runs those resolvers on a call, and the parameters keep their
    defaults."""
    kept = {k: v for k, v in tool.resolved_params.items() if k not in names}
    tool.resolved_params = kept
    tool.resolver_plans = build_resolver_plans(kept, set()) if kept else {}


def simplify_output_schema(tool: Tool) -> None:
    """Publish the tool's output schema (`fn_metadata.output_schema`, which the SDK derived from
    the return annotation) as `simple_output_schema` makes it, cheaper for clients to validate
    against. Done before anything reads `Tool.output_schema`, which the SDK caches."""
    meta = tool.fn_metadata
    assert meta.output_schema is not None, f"{tool.name} must declare its structured output"
    meta.output_schema = simple_output_schema(meta.output_schema)


def pass_structured_output(tool: Tool) -> None:
    """Clear the tool's `fn_metadata.output_model`: the SDK keeps publishing the output schema
    but no longer validates each returned `CallToolResult`'s structured content against it.

    For a tool whose structured content is the dump of its typed answer model, which matches
    the schema by construction."""
    tool.fn_metadata.output_model = None


def wire_result(result: CallToolResult) -> dict[str, Any]:
    """The result's wire form, its structured content passed on as it is (already JSON data)."""
    wire = result.model_dump(
        by_alias=True, mode="json", exclude_none=True, exclude={"structured_content"}
    )
    if result.structured_content is not None:
        wire["structuredContent"] = result.structured_content
    return wire


def answer_tool_calls_on_the_wire(server: MCPServer[Any]) -> None:
    """Wrap the low-level `tools/call` handler so that it hands the SDK each result in its wire
    form (`wire_result`).

    The SDK's runner dumps a returned model whole (`runner._dump_result`), then validates and
    dumps that dump again for the protocol version: the first pass over a large structured
    content produces nothing the second does not. A mapping is only copied before the second
    pass, which still shapes the answer."""
    lowlevel = lowlevel_server(server)
    entry = lowlevel.get_request_handler("tools/call")
    assert entry is not None, "the SDK registers tools/call"
    handler = entry.handler

    async def call_tool(ctx: ServerRequestContext[Any, Any], params: Any) -> Any:
        result = await handler(ctx, params)
        return wire_result(result) if isinstance(result, CallToolResult) else result

    lowlevel.add_request_handler("tools/call", entry.params_type, call_tool)
