"""Downstream MCP tools through the bus, in a run: a real downstream server over stdio, one
session per agent; read-only calls of several agents overlap, write calls never do (from the
server's own log); a destructive tool under `ask` waits for the person's answer."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, cast

import anyio
import pytest
from mcp import Client

from fakeapi import FakeAnthropic, FakeRequest, Reply, by_key, finish, text, tool_use
from mcp_server.demo import make_sample_repo, structured, wait_settled
from mcp_server.downstream import DownstreamConfig, DownstreamServers, parse_downstream_config
from orchestration.contracts import SpawnRequest, StatusResult, TaskSpec
from orchestration.errors import InvalidRequest
from orchestration.orchestrator import Orchestrator
from tests.mcp_server.servers import stdio_params
from tests.orchestration.scripts import Gate, Step, by_task, make_repo
from tests.orchestration.test_orchestrator import settings, wait_until_final

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]


def _config(log: Path) -> DownstreamConfig:
    return _parse(
        {
            "mcpServers": {
                "kv": {
                    "command": sys.executable,
                    "args": ["-m", "tests.mcp_server.downstream_server", "--log", str(log)],
                    "env": {"PYTHONPATH": str(ROOT)},
                }
            }
        }
    )


def _parse(data: dict[str, Any]) -> DownstreamConfig:
    return parse_downstream_config(json.dumps(data))


def _log(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def _overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


async def test_read_only_calls_overlap_and_write_calls_never_do(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    log = tmp_path / "calls.jsonl"
    warm: Step = ("mcp__kv__get", {"key": "nothing"})  # the session's server starts here
    scripts: dict[str, list[Step]] = {
        f"READ-{i}": [warm, ("mcp__kv__slow_get", {"key": "k", "ms": 600})] for i in range(3)
    }
    scripts |= {
        f"WRITE-{i}": [warm, ("mcp__kv__slow_put", {"key": "k", "value": str(i), "ms": 200})]
        for i in range(3)
    }
    # every agent is held before its second call until all six servers have started, so that
    # the three reads are issued together; the writers go once the reads are done, together
    readers = [key for key in scripts if key.startswith("READ")]
    started = Gate(dict.fromkeys(scripts, 1))
    read = Gate(dict.fromkeys(readers, 2))

    async def gate(key: str, turn: int) -> None:
        await started(key, turn)
        await read(key, turn)

    model = by_task(scripts, gate=gate)
    async with (
        DownstreamServers(_config(log)) as downstream,
        Orchestrator(settings(repo), lambda _n: model, external=downstream) as orch,
    ):
        tasks = [TaskSpec(prompt=key, name=key.lower(), write_scope=[]) for key in scripts]
        spawned = await orch.spawn(SpawnRequest(tasks=tasks))
        assert "mcp__kv__slow_get" in spawned.mcp_tools
        with anyio.fail_after(60):
            for key in scripts:
                await started.reached[key].wait()
            for key in readers:
                started.release[key].set()
            for key in readers:
                await read.reached[key].wait()
        for key in scripts:
            started.release[key].set()
        for key in readers:
            read.release[key].set()
        done = await wait_until_final(orch, spawned.run_id)
    assert all(a.status.value == "succeeded" for a in done.runs[0].agents), done
    calls = _log(log)
    reads = [c for c in calls if c["tool"] == "slow_get"]
    writes = [c for c in calls if c["tool"] == "slow_put"]
    assert len(reads) == 3 and len(writes) == 3
    assert len({c["pid"] for c in reads + writes}) == 6  # a session (a process) per agent
    assert all(_overlap(a, b) for i, a in enumerate(reads) for b in reads[i + 1 :]), reads
    for write in writes:
        others = [c for c in calls if c is not write and c["tool"] in ("slow_get", "slow_put")]
        assert not any(_overlap(write, other) for other in others), (write, others)


def _waiting(status: StatusResult) -> bool:
    return any(a.approval is not None for a in status.runs[0].agents)


async def test_a_destructive_tool_waits_for_the_answer(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    log = tmp_path / "calls.jsonl"
    model = by_task({"DROP": [("mcp__kv__drop", {"key": "k"})]})
    async with (
        DownstreamServers(_config(log)) as downstream,
        Orchestrator(settings(repo), lambda _n: model, external=downstream) as orch,
    ):
        task = TaskSpec(prompt="DROP", name="drop", write_scope=[])
        spawned = await orch.spawn(SpawnRequest(tasks=[task], mcp_servers=["kv"]))
        assert "MCP destructive ask" in spawned.permissions
        cursor = 0
        with anyio.fail_after(30):
            while True:
                status = await orch.status(run_id=spawned.run_id, since=cursor, wait_s=5)
                cursor = status.cursor
                if _waiting(status):
                    break
        approval = status.runs[0].agents[0].approval
        assert approval is not None and approval.subject == "mcp__kv__drop"
        assert approval.rule == "default"
        assert not log.exists() or not [c for c in _log(log) if c["tool"] == "drop"]
        answered_at = approval.requested_at
        await orch.answer_approval(approval.approval_id, True, None, by="tool")
        await wait_until_final(orch, spawned.run_id)
    drops = [c for c in _log(log) if c["tool"] == "drop"]
    assert len(drops) == 1 and drops[0]["start"] > answered_at


async def test_an_unknown_or_failing_server_is_refused_at_spawn(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    broken = _parse({"mcpServers": {"gone": {"command": str(tmp_path / "no-such-server")}}})
    model = by_task({})
    async with (
        DownstreamServers(broken) as downstream,
        Orchestrator(settings(repo), lambda _n: model, external=downstream) as orch,
    ):
        task = TaskSpec(prompt="x", write_scope=[])
        with pytest.raises(InvalidRequest, match="not configured; the servers are: gone"):
            await orch.spawn(SpawnRequest(tasks=[task], mcp_servers=["other"]))
        with pytest.raises(InvalidRequest, match="gone"):
            await orch.spawn(SpawnRequest(tasks=[task]))
        spawned = await orch.spawn(SpawnRequest(tasks=[task], mcp_servers=[]))
        assert spawned.mcp_tools == []


async def test_a_configured_server_is_used_by_agents_over_stdio(tmp_path: Path) -> None:
    # the real server process, its real anthropic client on the fake Messages API, the
    # downstream server named by FANOUT_MCP_CONFIG, a real MCP client over stdio
    repo = make_sample_repo(tmp_path)
    log = tmp_path / "calls.jsonl"
    config = tmp_path / "mcp.json"
    entry = {
        "command": sys.executable,
        "args": ["-m", "tests.mcp_server.downstream_server", "--log", str(log)],
        "env": {"PYTHONPATH": str(ROOT)},
    }
    config.write_text(json.dumps({"mcpServers": {"kv": entry}}))

    def script(request: FakeRequest) -> Reply:
        steps = [
            tool_use("mcp__kv__put", key="k", value="v"),
            tool_use("mcp__kv__get", key="k"),
            finish("stored and read back"),
        ]
        turn = request.assistant_turns
        return steps[turn] if turn < len(steps) else text("done")

    fake = FakeAnthropic(by_key({"[kv]": script}))
    async with fake.serve():
        params = stdio_params(repo, fake.base_url)
        assert params.env is not None
        params.env["FANOUT_MCP_CONFIG"] = str(config)
        async with Client(params, mode="auto") as client:
            task: dict[str, Any] = {"name": "kv", "prompt": "[kv] store k", "write_scope": []}
            spawn = structured(await client.call_tool("spawn_subagents", {"tasks": [task]}))
            assert "mcp__kv__put" in spawn["mcp_tools"]
            await wait_settled(client, str(spawn["run_id"]), 0, lambda _: None, timeout_s=60)
            detail = structured(
                await client.call_tool("get_status", {"detail": [spawn["agents"][0]["agent_id"]]})
            )
    agent = detail["detail"][0]["agent"]
    assert agent["status"] == "succeeded", agent
    first = cast(dict[str, Any], fake.requests[0].body)
    tools_offered = {str(t["name"]) for t in first["tools"]}
    assert {"mcp__kv__get", "mcp__kv__put", "read_mcp_resource"} <= tools_offered
    last = cast(dict[str, Any], fake.requests[-1].body)
    blocks: list[dict[str, Any]] = [
        block for message in last["messages"] for block in message["content"]
    ]
    results = [block.get("content") for block in blocks if block.get("type") == "tool_result"]
    assert "v" in str(results[-1])
    assert [c["tool"] for c in _log(log)] == ["put", "get"]
    # its store is in the agent's workspace it was told, registered as a git work tree for it
    assert [c["git"] for c in _log(log)] == [True, True]


async def test_a_launcher_never_runs_what_the_agent_planted_in_its_workspace(
    tmp_path: Path,
) -> None:
    """A launcher that runs what it finds in its working directory, as `npx` runs a package an
    agent planted in `node_modules` (with this server's environment and its secrets): the
    server does not start in the agent's workspace, so the agent's file is never found. It is
    told the workspace instead (`{workspace}` in its arguments, `FANOUT_WORKSPACE`)."""
    repo = make_repo(tmp_path / "repo")
    marker = tmp_path / "planted-code-ran"
    log = tmp_path / "calls.jsonl"
    told = tmp_path / "told"
    launcher = 'if [ -x ./launch ]; then exec ./launch; fi; printf %s "$1" > "$0"; shift; exec "$@"'
    config = _parse(
        {
            "mcpServers": {
                "kv": {
                    "command": "sh",
                    "args": [
                        *("-c", launcher, str(told), "{workspace}", sys.executable),
                        *("-m", "tests.mcp_server.downstream_server", "--log", str(log)),
                    ],
                    "env": {"PYTHONPATH": str(ROOT)},
                }
            }
        }
    )
    plant = f"printf '#!/bin/sh\\ntouch {marker}\\n' > launch && chmod +x launch"
    scripts: dict[str, list[Step]] = {
        "PLANT": [("run_command", {"command": plant}), ("mcp__kv__get", {"key": "x"})]
    }
    model = by_task(scripts)
    async with (
        DownstreamServers(config) as downstream,
        Orchestrator(settings(repo), lambda _name: model, external=downstream) as orch,
    ):
        spawned = await orch.spawn(
            SpawnRequest(tasks=[TaskSpec(prompt="PLANT", name="p", write_scope=None)])
        )
        await wait_until_final(orch, spawned.run_id)
    assert not marker.exists()
    calls = _log(log)
    assert [c["tool"] for c in calls] == ["get"]
    workspace = told.read_text()
    assert "/.git/fanout/" in workspace and workspace.startswith(str(repo))
    assert calls[0]["cwd"] != workspace
    assert calls[0]["git"]  # its store, in the workspace it was told, is in a git work tree


async def test_a_module_the_agent_planted_does_not_start_as_its_server(tmp_path: Path) -> None:
    # the server runs outside the sandbox: `python -m` must not import what the agent's
    # command wrote in its workspace (PYTHONSAFEPATH, and it does not start there)
    repo = make_repo(tmp_path / "repo")
    marker = tmp_path / "planted-code-ran"
    payload = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    plant = (
        "mkdir -p tests/mcp_server && : > tests/__init__.py && : > tests/mcp_server/__init__.py"
        f" && cat > tests/mcp_server/downstream_server.py <<'PY'\n{payload}PY\n"
    )
    scripts: dict[str, list[Step]] = {
        "PLANT": [("run_command", {"command": plant}), ("mcp__kv__get", {"key": "x"})]
    }
    model = by_task(scripts)
    async with (
        DownstreamServers(_config(tmp_path / "calls.jsonl")) as downstream,
        Orchestrator(settings(repo), lambda _name: model, external=downstream) as orch,
    ):
        spawned = await orch.spawn(
            SpawnRequest(tasks=[TaskSpec(prompt="PLANT", name="p", write_scope=None)])
        )
        await wait_until_final(orch, spawned.run_id)
    assert not marker.exists()
    assert (tmp_path / "calls.jsonl").exists()  # the configured server answered the call
