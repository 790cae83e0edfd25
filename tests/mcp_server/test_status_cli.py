"""`fanout-mcp status` prints runs, agents (status, turns, tokens, changed files) and leases from
the durable state: while a server runs an agent, and after the server stopped."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import anyio
import pytest
from mcp import Client

from mcp_server.demo import make_sample_repo, structured, wait_settled
from mcp_server.server import build_server
from orchestration.config import Settings
from orchestration.contracts import AgentStatus
from orchestration.model import Model, ModelRequest, ModelResponse
from orchestration.providers.function import FunctionModel
from orchestration.providers.scripted import reply_finish, reply_text, reply_tool
from orchestration.state import AgentRecord, RunRecord, SharedSnapshot, StateStore
from tests.orchestration.scripts import add_server, exited_pid

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
MUL = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n"
TOKENS = re.compile(r"\b\d+/\d+/\d+/\d+\b")


async def _status_cli(repo: Path) -> str:
    """`fanout-mcp status --repo <repo>` in a separate process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with anyio.fail_after(60):
        done = await anyio.run_process(
            [sys.executable, "-m", "mcp_server.cli", "status", "--repo", str(repo)],
            env=env,
            check=False,
        )
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, err
    return out


def _row(out: str, agent_id: str) -> str:
    rows = [line for line in out.splitlines() if line.startswith(f"{agent_id}  mathx ")]
    assert len(rows) == 1, out
    return rows[0]


async def test_status_while_running_and_after_the_server_stopped(tmp_path: Path) -> None:
    repo = make_sample_repo(tmp_path)
    release = anyio.Event()
    second = anyio.Event()  # its first turn is recorded and its second waits

    async def reply(request: ModelRequest) -> ModelResponse:
        turn = sum(1 for m in request.messages if m.role == "assistant")
        if turn == 0:
            return reply_tool("write_file", path="src/mathx.py", content=MUL)
        if turn == 1:
            second.set()
            await release.wait()  # hold the agent running until the CLI has looked
            return reply_finish("added mul")
        return reply_text("done")

    def factory(name: str) -> Model:
        return FunctionModel(reply, name="held")

    server = build_server(Settings.from_env({}, repo=repo, sandbox="none"), factory)
    async with Client(server, mode="legacy") as client:
        spawn = structured(
            await client.call_tool(
                "spawn_subagents",
                {"tasks": [{"name": "mathx", "prompt": "add mul", "write_scope": ["src/"]}]},
            )
        )
        run_id = str(spawn["run_id"])
        agent_id = str(spawn["agents"][0]["agent_id"])
        with anyio.fail_after(60):
            await second.wait()

        live = await _status_cli(repo)
        assert f"repository {repo.resolve()}" in live
        # the CLI enters a namespace of its own, as the server does, and tries a mount there
        assert re.search(r"\nworkspaces: (copy-on-write views|git worktrees: no copy-on-)", live)
        assert f"run {run_id}" in live
        row = _row(live, agent_id)
        assert " mathx " in row and " running " in row, row
        assert TOKENS.search(row), row
        assert "\nleases\n" in live, live
        lease = re.compile(rf"^{agent_id}\s+src/?\s+write\s+\d+\s+\d+s$", re.MULTILINE)
        assert lease.search(live), live

        release.set()
        await wait_settled(client, run_id, 0, lambda _: None)

    after = await _status_cli(repo)
    row = _row(after, agent_id)
    assert " succeeded " in row, after
    assert re.search(r"\b2/\d+\b", row), row  # turns: 2 of max
    assert TOKENS.search(row) and "src/mathx.py" in row
    # Leases of the finished, unmerged agent stay until merged (or they expire, server gone).
    assert "\nleases\n" in after or "no leases held" in after


async def test_status_without_state(tmp_path: Path) -> None:
    repo = make_sample_repo(tmp_path)
    assert "no fanout state in" in await _status_cli(repo)


async def test_status_says_which_active_agents_lost_their_server(tmp_path: Path) -> None:
    """After a crash and before any server reopened the repository, the durable state still says
    `running`: the report says that agent's server is gone and what happens next."""
    repo = make_sample_repo(tmp_path)
    store = StateStore(repo / ".git" / "fanout")
    ghost, alive = "ghost-server", "live-server"
    run = RunRecord(
        run_id="r1",
        repo=str(repo),
        created_at=time.time(),
        base_commit="0" * 40,
        head_commit="0" * 40,
        branch_ref="refs/heads/main",
        snapshot_dirty=False,
        shared=SharedSnapshot(base_commit="0" * 40),
        max_concurrency=2,
        budget_tokens=1000,
        model="m",
        owner=ghost,
    )
    agents = [
        AgentRecord(
            agent_id=f"r1-a{i}",
            run_id="r1",
            index=i,
            name=f"t{i}",
            prompt="p",
            write_scope=None,
            model="m",
            max_turns=3,
            base_commit="0" * 40,
            owner=owner,
            status=AgentStatus.RUNNING,
        )
        for i, owner in ((1, ghost), (2, alive))
    ]
    store.create_run(run, agents)
    add_server(store, ghost, await exited_pid())
    add_server(store, alive, os.getpid())
    store.close()
    out = await _status_cli(repo)
    notes = [line for line in out.splitlines() if "server is gone" in line]
    assert notes == [
        "r1-a1: shown active, but its server is gone; the next fanout-mcp server on this "
        "repository marks it interrupted (rerun_subagent resumes it)"
    ], out
