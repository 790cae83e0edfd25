"""Names of downstream MCP tools: what a server may be called, and how a tool name splits."""

from __future__ import annotations

from pydantic import JsonValue

from toolbus.external import SERVER_NAME, ExternalTool, external_name, split_external_name


def test_server_names_cannot_make_a_tool_name_ambiguous() -> None:
    for good in ("db", "my-db", "my_db", "a1_b2-c3"):
        assert SERVER_NAME.fullmatch(good), good
    for bad in ("", "a__b", "_db", "db_", "a b", "a.b", "mcp:x"):
        assert not SERVER_NAME.fullmatch(bad), bad


def test_a_namespaced_name_splits_back_into_server_and_tool() -> None:
    assert external_name("my_db", "get__all") == "mcp__my_db__get__all"
    assert split_external_name("mcp__my_db__get__all") == ("my_db", "get__all")
    assert split_external_name("read_file") is None
    assert split_external_name("mcp__db") is None
    assert split_external_name("mcp____x") is None


def test_a_tools_spec_says_what_it_may_do() -> None:
    schema: dict[str, JsonValue] = {"type": "object"}
    read = ExternalTool(server="db", tool="get", input_schema=schema, read_only=True)
    drop = ExternalTool(server="db", tool="drop", input_schema=schema)
    put = ExternalTool(server="db", tool="put", input_schema=schema, destructive=False)
    assert read.spec().name == "mcp__db__get"
    assert "read-only" in read.spec().description
    assert "may destroy data" in drop.spec().description
    assert "changes state" in put.spec().description
