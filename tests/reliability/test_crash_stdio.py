"""A crash of the stdio MCP server, the way a user meets one: the server (with the real
`anthropic` client, against the fake API) is killed with SIGKILL while an agent waits for the
model, and the MCP client starts a new server at once, as clients do. The new server must show
the agent `interrupted` with the work it had written (not `running` for ever: the killed server's
heartbeat is still fresh), and rerun and merge it over the same MCP surface."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
from pathlib import Path

import anyio
import pytest
from mcp import Client

from fakeapi import FakeAnthropic, FakeRequest, Reply, by_key, finish, tool_use
from mcp_server.demo import make_sample_repo, structured, text_of, wait_settled
from tests.mcp_server.servers import stdio_params
from tests.reliability.conftest import Ledger

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

G_STDIO = "G5i crash of the stdio server: the next one shows its agent interrupted at once"
SLOW = "def slow() -> int:\n    return 1\n"


def _slow_script(request: FakeRequest) -> Reply:
    if "# This is a re-run" in request.system_text:
        return finish("completed what the interrupted attempt left")
    if request.assistant_turns == 0:
        return tool_use("write_file", path="src/slow.py", content=SLOW)
    # the second turn never comes back before the server is killed
    stalled = finish("too late")
    return Reply(stalled.content, latency_s=600.0)


def _server_pids(repo: Path) -> list[int]:
    db = sqlite3.connect(repo / ".git" / "fanout" / "state.db")
    try:
        return [int(row[0]) for row in db.execute("SELECT pid FROM servers")]
    finally:
        db.close()


async def test_a_killed_stdio_server_restarted_at_once(tmp_path: Path, ledger: Ledger) -> None:
    repo = make_sample_repo(tmp_path)
    fake = FakeAnthropic(by_key({"[slow]": _slow_script}))
    async with fake.serve():
        params = stdio_params(repo, fake.base_url)
        client = Client(params, mode="legacy")
        await client.__aenter__()
        try:
            spawn = structured(
                await client.call_tool(
                    "spawn_subagents",
                    {"tasks": [{"prompt": "[slow]", "write_scope": ["src/slow.py"]}]},
                )
            )
            run_id, agent_id = spawn["run_id"], spawn["agents"][0]["agent_id"]
            with anyio.fail_after(60):  # it has written, and its second turn waits for the model
                await fake.wait_for_requests(2)
            killed = _server_pids(repo)
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
        finally:
            # the client sees its server vanish: whatever its exit raises is not under test
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)
        assert len(killed) == 1

        async with Client(params, mode="legacy") as client:
            status = structured(await client.call_tool("get_status", {"run_id": run_id}))
            agent = status["runs"][0]["agents"][0]
            shown = agent["status"]
            ledger.record(
                G_STDIO,
                "status right after the restart",
                shown == "interrupted",
                f"{agent_id} shows {shown}",
            )
            assert shown == "interrupted", text_of(
                await client.call_tool("get_status", {"run_id": run_id})
            )
            assert agent["files"] == 1  # its written work, committed on its branch
            detail = structured(
                await client.call_tool("get_status", {"run_id": run_id, "detail": [agent_id]})
            )["detail"][0]["agent"]
            assert [c["path"] for c in detail["result"]["changed_files"]] == ["src/slow.py"]
            rerun = structured(await client.call_tool("rerun_subagent", {"agent_id": agent_id}))
            await wait_settled(client, run_id, 0, lambda _: None)
            merged = structured(await client.call_tool("merge_results", {"run_id": run_id}))
            outcomes = {a["agent_id"]: a["outcome"] for a in merged["agents"]}
            ok = outcomes == {rerun["agent"]["agent_id"]: "merged"}
            ledger.record(G_STDIO, "rerun resumes the work and merges", ok, f"{outcomes}")
            assert ok, outcomes
    assert (repo / "src/slow.py").read_text() == SLOW
