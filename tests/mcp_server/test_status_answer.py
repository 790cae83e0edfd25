"""The get_status answer: each agent's part is built once while its view is unchanged, and the
answer is exactly the dump of the status (structured content) and its table (text)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp_types import CallToolResult, TextContent

from mcp_server import status_table
from mcp_server.demo import DEMO_TASKS, demo_model_factory, make_sample_repo
from mcp_server.server import build_server, wire_result
from mcp_server.status_answer import StatusAnswers
from orchestration.config import Settings
from orchestration.contracts import (
    AgentStatus,
    AgentView,
    LeaseView,
    RunTotals,
    RunView,
    StatusResult,
    TokenUsage,
)

pytestmark = pytest.mark.anyio


def _view(agent_id: str, status: AgentStatus, leases: list[LeaseView] | None = None) -> AgentView:
    return AgentView(
        agent_id=agent_id,
        run_id="r1",
        name=agent_id,
        status=status,
        turns=1,
        max_turns=40,
        tokens=TokenUsage(input=10, output=2),
        write_scope=["src"],
        leases=leases or [],
        changed_files=["src/a.py"],
        model="m",
        base_commit="b" * 40,
    )


def _status(*views: AgentView, cursor: int = 1) -> StatusResult:
    totals = RunTotals(
        agents=len(views),
        by_status={"running": len(views)},
        tokens=TokenUsage(),
        budget_tokens=100,
        budget_used=1,
        budget_remaining=99,
    )
    run = RunView(
        run_id="r1",
        repo="/repo",
        created_at=1.0,
        base_commit="b" * 40,
        max_concurrency=4,
        totals=totals,
        agents=list(views),
    )
    return StatusResult(cursor=cursor, changed=True, runs=[run], workspace_disk_bytes=0)


def test_the_answer_is_the_status_dump_and_table_and_reuses_unchanged_agents() -> None:
    answers = StatusAnswers()
    a, b = _view("r1-a1", AgentStatus.RUNNING), _view("r1-a2", AgentStatus.RUNNING)
    first = _status(a, b)
    structured = answers.structured(first)
    # the same JSON, key order included
    assert json.dumps(structured) == json.dumps(first.model_dump(mode="json"))
    assert answers.text(first) == status_table.status_text(first)

    lease = LeaseView(resource="src", mode="write", token=7, expires_in_s=29.5)
    b2 = _view("r1-a2", AgentStatus.SUCCEEDED, [lease])  # a new view: the agent changed
    second = _status(a, b2, cursor=2)
    again = answers.structured(second)
    assert json.dumps(again) == json.dumps(second.model_dump(mode="json"))
    assert answers.text(second) == status_table.status_text(second)
    assert again["runs"][0]["agents"][0] is structured["runs"][0]["agents"][0]
    assert again["runs"][0]["agents"][1]["status"] == "succeeded"
    assert again["runs"][0]["agents"][1]["leases"][0]["token"] == 7
    assert "succeeded" in answers.text(second)


def _structured(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, result
    assert result.structured_content is not None
    return dict(result.structured_content)


def _text(result: CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, TextContent))


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_status_over_the_client_follows_changes_and_is_not_shared(
    tmp_path: Path, mode: str
) -> None:
    repo = make_sample_repo(tmp_path)
    settings = Settings.from_env({}, repo=repo, sandbox="none")
    async with Client(build_server(settings, demo_model_factory()), mode=mode) as client:
        tasks = [
            {"name": key, "prompt": t.prompt, "write_scope": t.write_scope}
            for key, t in DEMO_TASKS.items()
            if key != "greeting"
        ]
        spawned = _structured(await client.call_tool("spawn_subagents", {"tasks": tasks}))
        run_id = spawned["run_id"]
        cursor = 0
        with anyio.fail_after(30):
            while True:
                status = _structured(
                    await client.call_tool(
                        "get_status", {"run_id": run_id, "since": cursor, "wait_s": 5}
                    )
                )
                cursor = status["cursor"]
                agents = status["runs"][0]["agents"]
                if not any(a["status"] in ("queued", "waiting", "running") for a in agents):
                    break
        first = await client.call_tool("get_status", {"run_id": run_id})
        body = _structured(first)
        # (held leases' expiry moves between two answers)
        assert [(a["agent_id"], a["status"]) for a in body["runs"][0]["agents"]] == [
            (a["agent_id"], a["status"]) for a in agents
        ]
        assert StatusResult.model_validate(body).model_dump(mode="json") == body
        assert _text(first) == status_table.status_text(StatusResult.model_validate(body))
        # what a client does with its answer does not reach the next answer
        body["runs"][0]["agents"][0]["status"] = "tampered"
        assert first.structured_content is not None
        first.structured_content["runs"][0]["agents"][0]["name"] = "tampered"
        again = _structured(await client.call_tool("get_status", {"run_id": run_id}))
        assert {a["status"] for a in again["runs"][0]["agents"]} == {"succeeded"}
        assert "tampered" not in json.dumps(again)

        await client.call_tool("merge_results", {"run_id": run_id})
        merged = _structured(await client.call_tool("get_status", {"run_id": run_id}))
        assert {a["status"] for a in merged["runs"][0]["agents"]} == {"merged"}
        assert merged["cursor"] > again["cursor"]


def test_an_unchanged_run_table_is_not_rendered_again(monkeypatch: pytest.MonkeyPatch) -> None:
    rendered: list[int] = []
    real_table = status_table.table

    def counting_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
        rendered.append(len(rows))
        return real_table(headers, rows)

    monkeypatch.setattr(status_table, "table", counting_table)
    answers = StatusAnswers()
    a, b = _view("r1-a1", AgentStatus.RUNNING), _view("r1-a2", AgentStatus.RUNNING)
    assert answers.text(_status(a, b)) == status_table.status_text(_status(a, b))
    rendered.clear()
    assert "cursor 2" in answers.text(_status(a, b, cursor=2))
    assert rendered == []
    b2 = _view("r1-a2", AgentStatus.FAILED)
    text = answers.text(_status(a, b2, cursor=3))
    assert rendered == [2]
    assert text == status_table.status_text(_status(a, b2, cursor=3)) and "failed" in text
    assert answers.text(_status(a, cursor=4)) == status_table.status_text(_status(a, cursor=4))


def test_a_tool_result_reaches_the_sdk_in_its_wire_form() -> None:
    structured: dict[str, Any] = {"runs": [{"a": None, "b": [1, {"c": "d"}]}], "cursor": 3}
    result = CallToolResult(
        content=[TextContent(type="text", text="t")], structured_content=structured
    )
    wire = wire_result(result)
    assert wire == result.model_dump(by_alias=True, mode="json", exclude_none=True)
    assert wire["structuredContent"] is structured
    bare = CallToolResult(content=[TextContent(type="text", text="t")], is_error=True)
    assert wire_result(bare) == bare.model_dump(by_alias=True, mode="json", exclude_none=True)


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


def test_the_same_status_object_gets_the_same_answer_a_new_one_is_built_again() -> None:
    answers = StatusAnswers()
    a = _view("r1-a1", AgentStatus.RUNNING)
    first = _status(a)
    structured, text = answers.answer(first)
    assert json.dumps(structured) == json.dumps(first.model_dump(mode="json"))
    assert text == status_table.status_text(first)
    again = answers.answer(first)
    assert again[0] is structured and again[1] is text

    # an equal but new status (the orchestrator made it because something changed) is built
    # again; the unchanged agent's part is still shared
    second = _status(a, cursor=2)
    structured2, text2 = answers.answer(second)
    assert structured2 is not structured and structured2["cursor"] == 2
    assert structured2["runs"][0]["agents"][0] is structured["runs"][0]["agents"][0]
    assert text2 == status_table.status_text(second)
