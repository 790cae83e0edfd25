"""One test per patch of MCP SDK internals (`mcp_server.sdk_patches`): the SDK still has what the
patch relies on, in the shape it expects, and the patch has its effect. After an SDK upgrade, a
failure here names the patch that broke."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Annotated, Any

import pytest
from mcp import Client
from mcp.server import runner
from mcp.server.lowlevel import Server as LowLevelServer
from mcp.server.mcpserver import AcceptedElicitation, Context, MCPServer, Resolve
from mcp.server.mcpserver import resolve as sdk_resolve
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools import Tool
from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase, FuncMetadata
from mcp_types import CallToolResult, ListRootsResult, TextContent
from pydantic import BaseModel, ConfigDict, ValidationError

from mcp_server import sdk_patches
from mcp_server.demo import demo_model_factory, make_sample_repo
from mcp_server.output_schema import simple_output_schema
from mcp_server.server import build_server
from orchestration.config import Settings

pytestmark = pytest.mark.anyio


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: int
    label: str | None = None


class _Part(BaseModel):
    name: str


class _Answer(BaseModel):
    total: int
    parts: list[_Part]
    note: str | None = None


resolver_calls: list[str] = []


def _resolve_roots(ctx: Context[Any, Any]) -> None:
    resolver_calls.append("roots")
    raise ToolError("the resolver ran")


async def _answer(
    request: _Request,
    ctx: Context[Any, Any],
    roots: Annotated[ListRootsResult | None, Resolve(_resolve_roots)] = None,
) -> Annotated[CallToolResult, _Answer]:
    answer = _Answer(total=request.count, parts=[_Part(name=str(roots))])
    return CallToolResult(
        content=[TextContent(type="text", text="t")], structured_content=answer.model_dump()
    )


def _tool() -> Tool:
    return Tool.from_function(_answer, name="answer", description="d")


def _context() -> Context[Any, Any]:
    return Context(mcp_server=MCPServer("t"))


def _structured(result: CallToolResult) -> dict[str, Any]:
    assert result.structured_content is not None, result
    return result.structured_content


# --- ACCEPTED_ANY ---------------------------------------------------------------------------


def test_accepted_any_is_the_class_the_sdk_wraps_resolved_values_in() -> None:
    accepted = sdk_resolve._accepted(1)  # pyright: ignore[reportPrivateUsage]
    assert type(accepted) is sdk_patches.ACCEPTED_ANY


def test_the_accepted_resolver_class_outlives_a_collection() -> None:
    # Pydantic caches `AcceptedElicitation[Any]` weakly: without the server's reference the class
    # is collected and the next tool call with a resolver builds it again.
    assert sdk_patches.ACCEPTED_ANY is AcceptedElicitation[Any]
    ref = weakref.ref(AcceptedElicitation[Any])
    gc.collect()
    assert ref() is not None
    assert AcceptedElicitation[Any] is ref()


# --- lowlevel_server ------------------------------------------------------------------------


def test_lowlevel_server_is_the_server_mcpserver_registers_its_handlers_on() -> None:
    lowlevel = sdk_patches.lowlevel_server(MCPServer("t"))
    assert isinstance(lowlevel, LowLevelServer)
    assert lowlevel.get_request_handler("tools/call") is not None
    # fanout adds `resources/subscribe` there (notify): MCPServer has none of its own to replace
    assert lowlevel.get_request_handler("resources/subscribe") is None


# --- take_request_model ---------------------------------------------------------------------


async def test_take_request_model_makes_the_request_fields_the_arguments() -> None:
    tool = _tool()
    assert set(FuncMetadata.model_fields) >= {"arg_model"}
    assert issubclass(tool.fn_metadata.arg_model, ArgModelBase)
    assert set(tool.parameters["properties"]) == {"request"}

    sdk_patches.take_request_model(tool, _Request)
    assert tool.parameters["title"] == "answerArguments"
    assert tool.parameters["additionalProperties"] is False
    assert set(tool.parameters["properties"]) == {"count", "label"}
    validated = tool.fn_metadata.validate_arguments({"count": 2})
    assert list(validated) == ["request"] and isinstance(validated["request"], _Request)
    with pytest.raises(ValidationError):
        tool.fn_metadata.validate_arguments({"count": 2, "unknown": 1})
    sdk_patches.skip_resolvers(tool, "roots")
    result = await tool.run({"count": 3}, _context(), convert_result=True)
    assert isinstance(result, CallToolResult) and _structured(result)["total"] == 3
    (listed,) = await MCPServer("t", tools=[tool]).list_tools()
    assert listed.input_schema == tool.parameters


# --- skip_resolvers -------------------------------------------------------------------------


async def test_skip_resolvers_runs_no_resolver_and_keeps_the_default() -> None:
    resolver_calls.clear()
    tool = _tool()
    assert set(tool.resolved_params) == {"roots"} and len(tool.resolver_plans) == 1
    with pytest.raises(ToolError):
        await tool.run({"request": {"count": 1}}, _context())
    assert resolver_calls == ["roots"]

    sdk_patches.skip_resolvers(tool, "roots")
    result = await tool.run({"request": {"count": 1}}, _context())
    assert isinstance(result, CallToolResult)
    assert _structured(result)["parts"] == [{"name": "None"}]
    assert resolver_calls == ["roots"]


# --- simplify_output_schema -----------------------------------------------------------------


async def test_simplify_output_schema_is_what_the_tool_publishes() -> None:
    tool = _tool()
    derived = tool.fn_metadata.output_schema
    assert derived is not None and "$defs" in derived
    sdk_patches.simplify_output_schema(tool)
    simple = simple_output_schema(derived)
    assert "$defs" not in simple
    assert tool.output_schema == simple
    (listed,) = await MCPServer("t", tools=[tool]).list_tools()
    assert listed.output_schema == simple


# --- pass_structured_output -----------------------------------------------------------------


def test_pass_structured_output_publishes_the_schema_without_validating() -> None:
    off_schema = CallToolResult(
        content=[TextContent(type="text", text="t")], structured_content={"total": "many"}
    )
    tool = _tool()
    assert tool.fn_metadata.output_model is _Answer
    with pytest.raises(ValidationError):
        tool.fn_metadata.convert_result(off_schema)

    sdk_patches.pass_structured_output(tool)
    assert tool.fn_metadata.convert_result(off_schema) is off_schema
    assert tool.output_schema is not None and "total" in tool.output_schema["properties"]


# --- answer_tool_calls_on_the_wire ----------------------------------------------------------


def test_a_tool_result_reaches_the_sdk_in_its_wire_form() -> None:
    structured: dict[str, Any] = {"runs": [{"a": None, "b": [1, {"c": "d"}]}], "cursor": 3}
    result = CallToolResult(
        content=[TextContent(type="text", text="t")], structured_content=structured
    )
    wire = sdk_patches.wire_result(result)
    assert wire == result.model_dump(by_alias=True, mode="json", exclude_none=True)
    assert wire["structuredContent"] is structured
    bare = CallToolResult(content=[TextContent(type="text", text="t")], is_error=True)
    assert sdk_patches.wire_result(bare) == bare.model_dump(
        by_alias=True, mode="json", exclude_none=True
    )


def test_the_sdk_dumps_a_model_as_the_wire_form_and_copies_a_mapping() -> None:
    result = CallToolResult(
        content=[TextContent(type="text", text="t")], structured_content={"a": [1, None]}
    )
    wire = sdk_patches.wire_result(result)
    assert runner._dump_result(result) == wire  # pyright: ignore[reportPrivateUsage]
    copied = runner._dump_result(wire)  # pyright: ignore[reportPrivateUsage]
    assert copied == wire and copied is not wire


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_the_sdk_does_not_dump_a_structured_result_whole(
    tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the SDK's own pass (the protocol version's validation and dump) is the only one over the
    # structured content
    whole: list[str] = []
    real_dump = CallToolResult.model_dump

    def recording_dump(self: CallToolResult, **kwargs: Any) -> dict[str, Any]:
        if self.structured_content is not None and not kwargs.get("exclude"):
            whole.append(repr(kwargs))
        return real_dump(self, **kwargs)

    monkeypatch.setattr(CallToolResult, "model_dump", recording_dump)
    repo = make_sample_repo(tmp_path)
    settings = Settings.from_env({}, repo=repo, sandbox="none")
    async with Client(build_server(settings, demo_model_factory()), mode=mode) as client:
        status = await client.call_tool("get_status", {})
        ping = await client.call_tool("ping", {})
    assert _structured(status)["runs"] == [] and _structured(ping)["ok"] is True
    assert whole == []
