"""`merge_results` reports progress to a client that asked for it, agent by agent, and sends none
once the work is done (a notification racing the result confuses some clients)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mcp import Client

from mcp_server.demo import (
    DEMO_TASKS,
    demo_model_factory,
    make_sample_repo,
    structured,
    wait_settled,
)
from mcp_server.server import build_server
from orchestration.config import Settings

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
        tasks = [
            {"name": key, "prompt": t.prompt, "write_scope": t.write_scope}
            for key, t in DEMO_TASKS.items()
        ]
        spawn = structured(await client.call_tool("spawn_subagents", {"tasks": tasks}))
        run_id = str(spawn["run_id"])
        await wait_settled(client, run_id, 0, lambda _: None)
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
