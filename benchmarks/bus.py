"""The permission bus's own costs: a downstream MCP tool call through the bus, and an approval
answered at once by an eliciting client.

`mcp_call_overhead_ms`: a read-only tool of a downstream MCP server (a small server of the tests,
over stdio) called through an agent's bus — the permission policy, the read lease on the
server's connection in the repository's lease store, the audit record — minus the same call made
directly by an MCP client on its own connection; p50 of calls alternated side by side in one run.
Target <= 1.

`approval_roundtrip_ms`: a subagent's write that the policy asks about, answered at once by a
client that answers elicitations, over stdio, the server a subprocess as a user runs it: from
the agent's call to its result (the call's duration in the bus's audit log), p50, in the
2026-07-28 era (what Claude Code speaks) and in the handshake era. The client long-polls
`get_status` as the documented loop does; the pending approval wakes it, and the server raises
the elicitation within its next call. Beside it, `write_ms_p50`: the same writes allowed without
asking (the floor: the write and its audit record). Target <= 50.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio
from mcp import Client, StdioServerParameters
from mcp.client.context import ClientRequestContext
from mcp_types import ElicitRequestParams, ElicitResult, ErrorData

from benchmarks.common import scratch, table
from mcp_server.demo import SCRIPT_MARK, make_sample_repo, structured
from mcp_server.downstream import DownstreamServers, parse_downstream_config
from orchestration.config import Settings
from orchestration.gate import AgentGate
from orchestration.orchestrator import Orchestrator
from orchestration.registry import LeaseFence
from orchestration.runner import AgentRunner
from toolbus.audit import AuditLog
from toolbus.bus import AgentBus
from toolbus.resources import WriteScope
from toolbus.terminal import SandboxMode, Terminal, TerminalConfig

ROOT = Path(__file__).resolve().parents[1]


def _p50(samples: list[float]) -> float:
    return round(statistics.median(samples), 3)


async def _answer_at_once(
    context: ClientRequestContext, params: ElicitRequestParams
) -> ElicitResult | ErrorData:
    return ElicitResult(action="accept", content={"allow": True, "note": ""})


def _server(repo: Path, policy: dict[str, list[str]]) -> StdioServerParameters:
    env = {
        **os.environ,
        "FANOUT_SANDBOX": "none",
        "FANOUT_PERMISSIONS": json.dumps(policy),
        "PYTHONPATH": str(ROOT),
    }
    args = ["-m", "mcp_server.cli", "--repo", str(repo), "--model-provider", "demo"]
    return StdioServerParameters(command=sys.executable, args=args, env=env)


async def _writes(repo: Path, era: str, writes: int, asked: bool) -> list[float]:
    """The durations (ms) of an agent's `writes` writes, each asked about (and answered at once
    by the client) or allowed without asking."""
    calls = [
        ["write_file", {"path": f"bench/f{i}.lock", "content": f"{i}\n"}] for i in range(writes)
    ]
    task = {"name": "writer", "prompt": SCRIPT_MARK + json.dumps(calls), "write_scope": ["bench"]}
    policy = {"ask": ["write(*.lock)"]} if asked else {"allow": ["write"]}
    async with Client(
        _server(repo, policy),
        mode=era,  # type: ignore[arg-type]
        elicitation_callback=_answer_at_once,  # type: ignore[arg-type]
    ) as client:
        spawned = structured(await client.call_tool("spawn_subagents", {"tasks": [task]}))
        run_id, agent_id = str(spawned["run_id"]), str(spawned["agents"][0]["agent_id"])
        cursor = 0
        with anyio.fail_after(120):
            while True:
                answer = structured(
                    await client.call_tool(
                        "get_status", {"run_id": run_id, "since": cursor, "wait_s": 30}
                    )
                )
                cursor = int(answer["cursor"])
                states = {a["agent_id"]: a["status"] for a in answer["runs"][0]["agents"]}
                if states.get(agent_id) in ("succeeded", "failed"):
                    break
    audit = repo / ".git" / "fanout" / "audit" / f"{agent_id}.jsonl"
    records: list[dict[str, Any]] = [json.loads(line) for line in audit.read_text().splitlines()]
    durations = [float(r["duration_ms"]) for r in records if r["op"] == "write_file"]
    if len(durations) != writes or any(r["outcome"] != "ok" for r in records):
        raise RuntimeError(f"the agent's writes did not all succeed: {records}")
    if asked and not all("allowed by person" in (r.get("permission") or "") for r in records):
        raise RuntimeError(f"the writes were not answered by the eliciting client: {records}")
    return durations


async def _mcp_calls(root: Path, calls: int) -> tuple[list[float], list[float]]:
    """(through the bus, direct) durations in ms of the same read-only downstream call, made
    alternately: through an agent's bus (its own session, policy, read lease, audit), and by an
    MCP client on its own connection to a server of the same kind."""
    repo = _repo(root / "mcp")
    work = root / "mcp-work"
    work.mkdir()
    log = root / "mcp-calls.jsonl"
    server = StdioServerParameters(
        command=sys.executable,
        args=["-m", "tests.mcp_server.downstream_server", "--log", str(log)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=str(work),
    )
    config = parse_downstream_config(
        json.dumps(
            {"mcpServers": {"kv": {"command": server.command, "args": server.args,
                                   "env": server.env, "cwd": str(work)}}}
        )
    )  # fmt: skip
    through: list[float] = []
    direct: list[float] = []
    settings = Settings.from_env({}, repo=repo, sandbox="none")
    async with (
        DownstreamServers(config) as downstream,
        Orchestrator(settings, external=downstream) as orch,
        Client(server, mode=downstream.mode) as client,
    ):
        await client.call_tool("put", {"key": "k", "value": "v"})
        ctx = await orch.context(repo)
        tools = await downstream.list_tools(["kv"])
        session = downstream.session("bench", workspace=str(work))
        terminal = Terminal(work, TerminalConfig(sandbox=SandboxMode.NONE, home=root / "home"))
        bus = AgentBus(
            agent_id="bench",
            workspace=work,
            write_scope=WriteScope.of([]),
            fence=LeaseFence(ctx.leases, "bench"),
            audit=AuditLog(root / "audit.jsonl"),
            terminal=terminal,
            policy=AgentRunner.policy_of(settings.permissions, None, None),
            gate=AgentGate(ctx, "bench", "bench", 10.0),
            external=session,
            external_tools=tools,
        )
        for _ in range(3):  # both connections open and warm
            await bus.call("mcp__kv__get", {"key": "k"})
            await client.call_tool("get", {"key": "k"})
        for _ in range(calls):
            started = time.perf_counter()
            outcome = await bus.call("mcp__kv__get", {"key": "k"})
            through.append((time.perf_counter() - started) * 1000)
            if outcome.is_error or outcome.content != "v":
                raise RuntimeError(f"the call through the bus failed: {outcome}")
            started = time.perf_counter()
            result = await client.call_tool("get", {"key": "k"})
            direct.append((time.perf_counter() - started) * 1000)
            if result.is_error:
                raise RuntimeError(f"the direct call failed: {result}")
        await session.aclose()
        terminal.close()
    return through, direct


def _repo(root: Path) -> Path:
    root.mkdir(parents=True)
    return make_sample_repo(root)


def run(quick: bool) -> dict[str, float | int]:
    writes = 5 if quick else 30
    calls = 50 if quick else 400
    figures: dict[str, float | int] = {}
    rows: list[tuple[str, float | int, str]] = []
    note = " (quick)" if quick else ""
    with scratch("bench-bus-") as tmp:
        root = Path(tmp)

        async def approvals() -> None:
            floor = await _writes(_repo(root / "floor"), "auto", writes, asked=False)
            figures["write_ms_p50"] = _p50(floor)
            rows.append(("write_ms_p50", figures["write_ms_p50"], f"{writes} writes, no ask"))
            for era, key in (("auto", "approval_roundtrip_ms"), ("legacy", "approval_legacy_ms")):
                started = time.perf_counter()
                asked = await _writes(_repo(root / era), era, writes, asked=True)
                figures[key] = _p50(asked)
                era_name = "2026-07-28" if era == "auto" else "2025-11-25 (handshake)"
                rows.append(
                    (
                        key,
                        figures[key],
                        f"{writes} asked writes answered at once over stdio, {era_name} era, "
                        f"p50 (max {max(asked):.1f}; {time.perf_counter() - started:.1f} s)"
                        + ("; target <= 50" if era == "auto" else "")
                        + note,
                    )
                )

        async def mcp() -> None:
            through, direct = await _mcp_calls(root, calls)
            overhead = round(_p50(through) - _p50(direct), 3)
            figures["mcp_call_overhead_ms"] = overhead
            figures["mcp_call_direct_ms"] = _p50(direct)
            rows.append(
                (
                    "mcp_call_overhead_ms",
                    overhead,
                    f"a read-only downstream call through the bus ({_p50(through):.3f} ms p50) "
                    f"minus the same call by a client ({_p50(direct):.3f} ms), {calls} each, "
                    f"alternated; target <= 1{note}",
                )
            )

        anyio.run(mcp)
        anyio.run(approvals)
    table(rows)
    return figures
