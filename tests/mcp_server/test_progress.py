"""Progress to a client that asked for it: `merge_results` agent by agent, and none once the work
is done (a notification racing the result confuses some clients); a waiting `get_status` long-poll
every few seconds (clients reset their idle timeout on each)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from mcp import Client

from mcp_server import tools as tools_module
from mcp_server.demo import (
    demo_model_factory,
    make_sample_repo,
    structured,
)
from mcp_server.server import build_server
from orchestration.config import Settings
from orchestration.model import ModelRequest, ModelResponse
from orchestration.providers.function import FunctionModel
from orchestration.providers.scripted import reply_finish
from tests.mcp_server.servers import spawn_demo_settled

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_merge_reports_progress_and_none_after_the_result(tmp_path: Path, mode: str) -> None:
    repo = make_sample_repo(tmp_path)
    server = build_server(Settings.from_env({}, repo=repo, sandbox="none"), demo_model_factory())
    seen: list[tuple[float, float | None, str | None]] = []
    returned = False
    late: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        if returned:
            late.append(progress)
        seen.append((progress, total, message))

    async with Client(server, mode=mode) as client:
        run_id = str((await spawn_demo_settled(client))["run_id"])
        result = await client.call_tool(
            "merge_results", {"run_id": run_id}, progress_callback=on_progress
        )
        returned = True
        merged = structured(result)
        assert [a["outcome"] for a in merged["agents"]] == ["merged"] * 3
        # A round trip after the result: anything the server still had queued would arrive now.
        await client.call_tool("get_status", {"run_id": run_id})

    assert seen, "no progress notification during a three-agent merge"
    ids = {a["agent_id"] for a in merged["agents"]}
    for done, total, message in seen:
        assert total == 3
        assert 1 <= done < total, "progress for the last agent would race the result"
        assert message is not None and message.split(":")[0] in ids
        assert message.endswith(": merged")
    assert [p[0] for p in seen] == sorted(p[0] for p in seen)
    assert late == []


async def test_a_waiting_long_poll_keeps_the_client_alive_with_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claude Code resets its idle timeout on each progress notification: a long-poll that waits
    for a run sends them while it waits, and answers once the run needs the orchestrator."""
    monkeypatch.setattr(tools_module, "KEEP_ALIVE_S", 0.1)
    repo = make_sample_repo(tmp_path)
    release = anyio.Event()
    held = anyio.Event()

    async def reply(request: ModelRequest) -> ModelResponse:
        if not any(m.role == "assistant" for m in request.messages):
            held.set()
            await release.wait()
        return reply_finish("done")

    server = build_server(
        Settings.from_env({}, repo=repo, sandbox="none"),
        lambda _name: FunctionModel(reply, name="held"),
    )
    seen: list[str | None] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(message)
        if len(seen) == 3:
            release.set()  # the client has seen the poll alive: let the agent finish

    async with Client(server) as client:
        spawn = structured(
            await client.call_tool(
                "spawn_subagents", {"tasks": [{"prompt": "wait", "write_scope": ["docs/"]}]}
            )
        )
        with anyio.fail_after(30):
            await held.wait()
            status = structured(
                await client.call_tool(
                    "get_status",
                    {"run_id": spawn["run_id"], "since": 0, "wait_s": 60},
                    progress_callback=on_progress,
                )
            )
    run = status["runs"][0]
    assert run["settled"] and run["agents"][0]["status"] == "succeeded"
    assert len(seen) >= 3
    assert all(m is not None and m.startswith(f"waiting for run {spawn['run_id']}") for m in seen)
