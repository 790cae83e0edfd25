"""End to end over stdio: the server as a subprocess, its real `anthropic` client pointed at the
fake Messages API served from this test process: spawn -> status -> merge -> conflict -> rerun ->
merge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from fakeapi import (
    FakeAnthropic,
    FakeRequest,
    Reply,
    RequestRateLimit,
    by_key,
    by_turn,
    finish,
    text,
    tool_use,
)
from mcp_server.demo import (
    GREET_AGENT,
    GREET_RERUN,
    GREET_USER,
    make_sample_repo,
    structured,
    text_of,
    wait_settled,
)
from tests.mcp_server.servers import stdio_params

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def _greeting_script(request: FakeRequest) -> Reply:
    rerun = "# This is a re-run" in request.system_text
    turn = request.assistant_turns
    content = GREET_RERUN if rerun else GREET_AGENT
    steps = [tool_use("write_file", path="src/greet.py", content=content), finish("greeted")]
    return steps[turn] if turn < len(steps) else text("done")


def _mathx_script(request: FakeRequest) -> Reply:
    steps = [
        tool_use("write_file", path="src/mathx.py", content="def mul(a, b):\n    return a * b\n"),
        finish("mul"),
    ]
    turn = request.assistant_turns
    return steps[turn] if turn < len(steps) else text("done")


async def test_spawn_status_merge_conflict_rerun_merge_over_stdio(tmp_path: Path) -> None:
    repo = make_sample_repo(tmp_path)
    fake = FakeAnthropic(by_key({"[greeting]": _greeting_script, "[mathx]": _mathx_script}))
    async with fake.serve(), Client(stdio_params(repo, fake.base_url), mode="legacy") as client:
        spawn = structured(
            await client.call_tool(
                "spawn_subagents",
                {
                    "tasks": [
                        {
                            "name": "greeting",
                            "prompt": "[greeting] capitalise",
                            "write_scope": ["src/greet.py"],
                        },
                        {
                            "name": "mathx",
                            "prompt": "[mathx] add mul",
                            "write_scope": ["src/mathx.py"],
                        },
                    ]
                },
            )
        )
        run_id = spawn["run_id"]
        greeting = spawn["agents"][0]["agent_id"]
        (repo / "src/greet.py").write_text(GREET_USER)
        await anyio.run_process(["git", "commit", "-qam", "user edit"], cwd=repo)
        await wait_settled(client, run_id, 0, lambda _: None)
        merged = structured(await client.call_tool("merge_results", {"run_id": run_id}))
        outcomes = {a["name"]: a["outcome"] for a in merged["agents"]}
        assert outcomes == {"greeting": "conflicted", "mathx": "merged"}, text_of(
            await client.call_tool("get_status", {"run_id": run_id})
        )
        diff = await client.read_resource(f"fanout://agents/{greeting}/diff")
        diff_text = "".join(getattr(c, "text", "") for c in diff.contents)
        assert "src/greet.py" in diff_text and "<<<<<<<" in diff_text, diff_text
        rerun = structured(await client.call_tool("rerun_subagent", {"agent_id": greeting}))
        new_id = rerun["agent"]["agent_id"]
        await wait_settled(client, run_id, 0, lambda _: None)
        final = structured(
            await client.call_tool("merge_results", {"run_id": run_id, "agent_ids": [new_id]})
        )
        assert final["agents"][0]["outcome"] == "merged"
    assert (repo / "src/greet.py").read_text() == GREET_RERUN
    assert fake.requests, "the server's anthropic client reached the fake API"


async def test_a_rate_limited_fan_out_over_stdio_slows_down_and_says_why(tmp_path: Path) -> None:
    """The server's agents against an API that allows 2 requests a second (a bucket of 1), as a
    client sees it: every agent succeeds, and while the limit holds requests back, get_status's
    structured answer (what Claude Code's model reads) says so in its `server` line."""
    repo = make_sample_repo(tmp_path)
    limit = RequestRateLimit(120, burst=1)
    fake = FakeAnthropic(
        by_turn(tool_use("read_file", path="src/greet.py"), finish("read")), rate_limit=limit
    )
    tasks: list[dict[str, object]] = [
        {"name": f"r{i}", "prompt": f"read {i}", "write_scope": []} for i in range(6)
    ]
    async with fake.serve(), Client(stdio_params(repo, fake.base_url), mode="legacy") as client:
        spawn = structured(await client.call_tool("spawn_subagents", {"tasks": tasks}))
        run_id = str(spawn["run_id"])
        notes: set[str] = set()
        with anyio.fail_after(60):
            while True:  # (polled, as an impatient client would, to see the pace while it holds)
                status = structured(await client.call_tool("get_status", {"run_id": run_id}))
                server: dict[str, Any] = status.get("server") or {}
                if server.get("rate_limited"):
                    notes.add(str(server["rate_limited"]))
                if status["runs"][0]["settled"]:
                    break
                await anyio.sleep(0.1)
        agents = status["runs"][0]["agents"]
    assert [a["status"] for a in agents] == ["succeeded"] * 6, agents
    assert limit.refused > 0
    assert notes and all("rate limit (429) holds requests back" in n for n in notes)
