"""The MCP surface through a real MCP client, in memory, in both protocol eras."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, MCPError
from mcp_types import CallToolResult, TextContent, TextResourceContents

from mcp_server.demo import DEMO_TASKS, demo_model_factory, make_sample_repo
from mcp_server.server import FanoutServer, build_server
from orchestration.config import Settings

pytestmark = pytest.mark.anyio

ERAS = ["legacy", "auto"]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_sample_repo(tmp_path)


def _server(repo: Path | None, **overrides: Any) -> FanoutServer:
    settings = Settings.from_env({}, repo=repo, sandbox="none", **overrides)
    return build_server(settings, demo_model_factory())


@pytest.fixture(params=ERAS)
async def client(request: pytest.FixtureRequest, repo: Path) -> AsyncGenerator[Client]:
    async with Client(_server(repo), mode=request.param) as c:
        yield c


def _text(result: CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, TextContent))


def _error(result: CallToolResult) -> str:
    assert result.is_error, result
    text = _text(result)
    assert "Traceback" not in text
    return text


async def test_tools_are_listed_with_schemas_and_annotations(client: Client) -> None:
    tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == {
        "spawn_subagents",
        "get_status",
        "merge_results",
        "cancel_subagents",
        "rerun_subagent",
        "answer_approval",
        "ping",
    }
    spawn = tools["spawn_subagents"]
    assert spawn.input_schema["required"] == ["tasks"]
    assert spawn.input_schema["additionalProperties"] is False
    assert spawn.output_schema is not None and "run_id" in spawn.output_schema["properties"]
    assert "get_status" in (spawn.description or "") and "write_scope" in (spawn.description or "")
    assert spawn.annotations is not None
    assert spawn.annotations.read_only_hint is False
    assert spawn.annotations.open_world_hint is False
    status = tools["get_status"].annotations
    assert status is not None and status.read_only_hint and status.idempotent_hint
    for name in ("merge_results", "cancel_subagents"):
        annotations = tools[name].annotations
        assert annotations is not None and annotations.destructive_hint
    assert tools["merge_results"].input_schema["required"] == ["run_id"]
    assert tools["rerun_subagent"].input_schema["required"] == ["agent_id"]


async def test_ping_answers_structured(client: Client) -> None:
    result = await client.call_tool("ping", {})
    assert not result.is_error
    assert result.structured_content == {"ok": True, "server": "fanout", "version": "0.1.0"}


async def test_get_status_with_no_runs(client: Client) -> None:
    result = await client.call_tool("get_status", {})
    assert not result.is_error, _text(result)
    assert result.structured_content is not None
    assert result.structured_content["runs"] == []
    assert "no runs yet" in _text(result)


@pytest.mark.parametrize(
    ("tool", "arguments", "expected"),
    [
        ("spawn_subagents", {"tasks": [{"prompt": "x"}], "bogus": 1}, "bogus: unknown field"),
        ("spawn_subagents", {"tasks": [{"prompt": "x", "colour": "red"}]}, "tasks[0].colour"),
        ("spawn_subagents", {"tasks": [{"prompt": "   "}]}, "tasks[0].prompt: prompt must not"),
        (
            "spawn_subagents",
            {"tasks": [{"prompt": "x", "write_scope": ["../x"]}]},
            "tasks[0].write_scope",
        ),
        ("spawn_subagents", {}, "tasks: required field is missing"),
        ("spawn_subagents", {"tasks": []}, "tasks:"),
        ("get_status", {"wait_s": -1}, "wait_s:"),
        ("get_status", {"run_id": "r-nope"}, "not found: no run 'r-nope'"),
        ("merge_results", {"run_id": "r-nope"}, "not found"),
        ("merge_results", {}, "run_id: required field is missing"),
        ("cancel_subagents", {"run_id": "r-nope"}, "not found"),
        ("rerun_subagent", {"agent_id": "r-nope-a1"}, "not found"),
        ("rerun_subagent", {"agent_id": "x", "extra": True}, "extra: unknown field"),
        ("no_such_tool", {}, "no_such_tool"),
    ],
)
async def test_bad_input_is_a_clear_tool_error(
    client: Client, tool: str, arguments: dict[str, Any], expected: str
) -> None:
    result = await client.call_tool(tool, arguments)
    text = _error(result)
    assert expected in text, text


@pytest.mark.parametrize("mode", ERAS)
async def test_not_a_repository_is_an_error_at_the_first_call(tmp_path: Path, mode: str) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    async with Client(_server(plain), mode=mode) as client:
        text = _error(await client.call_tool("get_status", {}))
        assert "is not a git repository" in text
        assert not (await client.call_tool("ping", {})).is_error


async def test_plan_fanout_prompt(client: Client) -> None:
    prompts = (await client.list_prompts()).prompts
    assert [p.name for p in prompts] == ["plan_fanout"]
    assert [a.name for a in prompts[0].arguments or []] == ["goal"]
    result = await client.get_prompt("plan_fanout", {"goal": "add type hints everywhere"})
    text = "".join(m.content.text for m in result.messages if isinstance(m.content, TextContent))
    assert "add type hints everywhere" in text
    for word in ("write_scope", "spawn_subagents", "get_status", "merge_results", "rerun_subagent"):
        assert word in text


async def test_plan_fanout_refuses_a_blank_goal(client: Client) -> None:
    with pytest.raises(MCPError):
        await client.get_prompt("plan_fanout", {"goal": "  "})


async def test_resources_listed(client: Client) -> None:
    resources = {str(r.uri) for r in (await client.list_resources()).resources}
    assert resources == {"fanout://runs", "fanout://leases"}
    templates = {
        t.uri_template for t in (await client.list_resource_templates()).resource_templates
    }
    assert templates == {
        "fanout://runs/{run_id}",
        "fanout://runs/{run_id}/files/{+path}",
        "fanout://agents/{agent_id}/result",
        "fanout://agents/{agent_id}/diff",
        "fanout://agents/{agent_id}/transcript",
    }
    runs = await client.read_resource("fanout://runs")
    first = runs.contents[0]
    assert isinstance(first, TextResourceContents) and json.loads(first.text) == []
    leases = await client.read_resource("fanout://leases")
    first = leases.contents[0]
    assert isinstance(first, TextResourceContents) and json.loads(first.text) == []


async def test_unknown_run_resource_is_an_error(client: Client) -> None:
    with pytest.raises(MCPError) as info:
        await client.read_resource("fanout://runs/r-nope")
    assert "no run 'r-nope'" in str(info.value)
    with pytest.raises(MCPError):
        await client.read_resource("fanout://agents/r-nope-a1/diff")


def _structured(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, _text(result)
    assert result.structured_content is not None
    return dict(result.structured_content)


async def _wait_idle(client: Client, run_id: str) -> dict[str, Any]:
    cursor = 0
    with anyio.fail_after(30):
        while True:
            status = _structured(
                await client.call_tool(
                    "get_status", {"run_id": run_id, "since": cursor, "wait_s": 5}
                )
            )
            cursor = status["cursor"]
            run = status["runs"][0]
            if run["settled"]:
                return run


@pytest.mark.parametrize("mode", ERAS)
async def test_spawn_status_merge_and_resources(repo: Path, mode: str) -> None:
    async with Client(_server(repo), mode=mode) as client:
        tasks = [
            {"name": key, "prompt": t.prompt, "write_scope": t.write_scope}
            for key, t in DEMO_TASKS.items()
            if key != "greeting"
        ]
        spawn = _structured(
            await client.call_tool(
                "spawn_subagents",
                {"tasks": tasks, "shared_context": {"plan": "p", "files": ["README.md"]}},
            )
        )
        run_id = spawn["run_id"]
        assert [a["name"] for a in spawn["agents"]] == ["mathx", "docs"]
        run = await _wait_idle(client, run_id)
        assert {a["status"] for a in run["agents"]} == {"succeeded"}
        agent_id = run["agents"][0]["agent_id"]

        snapshot = await client.read_resource(f"fanout://runs/{run_id}")
        first = snapshot.contents[0]
        assert isinstance(first, TextResourceContents)
        data = json.loads(first.text)
        assert data["plan"] == "p"
        assert {f["path"] for f in data["files"]} >= {"README.md", "src/greet.py"}
        file = await client.read_resource(f"fanout://runs/{run_id}/files/src/greet.py")
        first = file.contents[0]
        assert isinstance(first, TextResourceContents) and "def greet" in first.text
        diff = await client.read_resource(f"fanout://agents/{agent_id}/diff")
        first = diff.contents[0]
        assert isinstance(first, TextResourceContents) and "def mul" in first.text
        result = await client.read_resource(f"fanout://agents/{agent_id}/result")
        first = result.contents[0]
        assert isinstance(first, TextResourceContents)
        record = json.loads(first.text)
        assert record["status"] == "succeeded"
        # get_status shows one compact line per agent, which agrees with the whole result in
        # the resource; detail=[id] adds the full record
        shown = run["agents"][0]
        assert set(shown) <= {
            "agent_id",
            "name",
            "status",
            "summary",
            "files",
            "added",
            "removed",
            "tokens",
            "flags",
        }
        whole = record["result"]
        assert whole["status"] == shown["status"] == "succeeded"
        assert shown["files"] == len(whole["changed_files"])
        assert shown["added"] == sum(c["lines_added"] for c in whole["changed_files"])
        assert shown["tokens"] == sum(whole["tokens"].values())
        assert shown["summary"] == whole["summary"].strip().splitlines()[0][:120]
        detailed = _structured(
            await client.call_tool("get_status", {"run_id": run_id, "detail": [agent_id]})
        )
        item = detailed["detail"][0]
        assert item["result_resource"] == f"fanout://agents/{agent_id}/result"
        assert item["agent"]["result"]["summary"] == whole["summary"]
        assert item["agent"]["turns"] == whole["turns"] > 0
        transcript = await client.read_resource(f"fanout://agents/{agent_id}/transcript")
        first = transcript.contents[0]
        assert isinstance(first, TextResourceContents) and "write_file" in first.text

        dry = _structured(
            await client.call_tool("merge_results", {"run_id": run_id, "dry_run": True})
        )
        assert {a["outcome"] for a in dry["agents"]} == {"clean"}
        merged = _structured(await client.call_tool("merge_results", {"run_id": run_id}))
        assert {a["outcome"] for a in merged["agents"]} == {"merged"}
        assert (repo / "docs/usage.md").exists()
