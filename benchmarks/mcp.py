"""`get_status` over stdio on a run of 64 agents (quick: 16) against the no-op `ping` tool of the
same server in the same run: the MCP surface's own overhead. Target: ratio <= 2.

The primary figures come from a raw JSON-RPC driver on the server's stdin/stdout: the server, the
transport, and the driver reading each answer line and parsing it (`json.loads`; for a 64-agent
status that parse alone is reported as `get_status_driver_parse_ms`, the median of timing it again
on the last answer). The server's own CPU time per call (from /proc, Linux) is reported alongside:
on a loaded machine the wall-clock times mostly measure waiting for a core, the CPU times do not.
The SDK `Client` figures are reported too: that client re-validates every structured result
against the tool's output schema with `jsonschema`, which for a large status costs more than the
server does."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from mcp import Client

from benchmarks.common import StdioRpc, process_cpu_s
from mcp_server.demo import make_sample_repo, server_params, structured, wait_settled


def _p50_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)


async def _measure(agents: int, calls: int) -> dict[str, float | int]:
    with tempfile.TemporaryDirectory(prefix="fanout-bench-mcp-") as tmp:
        repo = make_sample_repo(Path(tmp))
        params = server_params(repo, env={"FANOUT_SANDBOX": "none"})
        async with Client(params, mode="legacy") as client:
            tasks: list[dict[str, object]] = [
                {"name": f"reader-{i}", "prompt": f"look around ({i})", "write_scope": []}
                for i in range(agents)
            ]
            spawn = structured(
                await client.call_tool(
                    "spawn_subagents", {"tasks": tasks, "max_concurrency": min(agents, 16)}
                )
            )
            run_id = str(spawn["run_id"])
            await wait_settled(client, run_id, 0, lambda _: None, timeout_s=300)
            status_args = {"run_id": run_id}
            for _ in range(3):  # warm up both paths
                await client.call_tool("get_status", status_args)
                await client.call_tool("ping", {})
            status_s: list[float] = []
            ping_s: list[float] = []
            for _ in range(calls):
                t0 = time.perf_counter()
                result = await client.call_tool("get_status", status_args)
                status_s.append(time.perf_counter() - t0)
                assert not result.is_error
                t0 = time.perf_counter()
                await client.call_tool("ping", {})
                ping_s.append(time.perf_counter() - t0)
        raw = _raw(params.command, params.args, run_id, calls)
    status_p50, ping_p50 = _p50_ms(raw.status_s), _p50_ms(raw.ping_s)
    client_status, client_ping = _p50_ms(status_s), _p50_ms(ping_s)
    return {
        "mcp_agents": agents,
        "get_status_p50_ms": status_p50,
        "noop_p50_ms": ping_p50,
        "ratio": round(status_p50 / ping_p50, 2) if ping_p50 else 0.0,
        "get_status_server_cpu_ms": round(raw.status_cpu_s * 1000, 3),
        "noop_server_cpu_ms": round(raw.ping_cpu_s * 1000, 3),
        "cpu_ratio": round(raw.status_cpu_s / raw.ping_cpu_s, 2) if raw.ping_cpu_s else 0.0,
        "get_status_bytes": raw.status_bytes,
        "get_status_driver_parse_ms": _p50_ms(raw.status_parse_s),
        "get_status_sdk_client_p50_ms": client_status,
        "noop_sdk_client_p50_ms": client_ping,
    }


@dataclass
class RawTimes:
    """What the raw driver measured: per-call wall times, and the server's CPU time per call."""

    status_s: list[float]
    ping_s: list[float]
    status_cpu_s: float
    ping_cpu_s: float
    status_bytes: int
    status_parse_s: list[float]


def _raw(command: str, args: list[str], run_id: str, calls: int) -> RawTimes:
    """get_status and ping timed over the server's stdio with bare JSON-RPC lines: interleaved
    for the wall-clock times, then in two blocks for the server's CPU time per call."""
    rpc = StdioRpc([command, *args])
    request = rpc.request
    try:
        rpc.initialize()
        status_call = {"name": "get_status", "arguments": {"run_id": run_id}}
        ping_call: dict[str, Any] = {"name": "ping", "arguments": {}}
        for _ in range(3):
            request("tools/call", status_call)
            request("tools/call", ping_call)
        status_s: list[float] = []
        ping_s: list[float] = []
        for _ in range(calls):
            t0 = time.perf_counter()
            answer = request("tools/call", status_call)
            status_s.append(time.perf_counter() - t0)
            assert not answer["result"].get("isError"), answer
            t0 = time.perf_counter()
            request("tools/call", ping_call)
            ping_s.append(time.perf_counter() - t0)
        request("tools/call", status_call)
        status_line = rpc.last_line
        status_parse_s: list[float] = []
        for _ in range(calls):
            t0 = time.perf_counter()
            json.loads(status_line)
            status_parse_s.append(time.perf_counter() - t0)
        cpu: list[float] = []
        for call in (status_call, ping_call):
            before = process_cpu_s(rpc.proc.pid)
            for _ in range(calls):
                request("tools/call", call)
            cpu.append((process_cpu_s(rpc.proc.pid) - before) / calls)
        return RawTimes(status_s, ping_s, cpu[0], cpu[1], len(status_line.encode()), status_parse_s)
    finally:
        rpc.close()


def run(quick: bool) -> dict[str, float | int]:
    agents, calls = (16, 30) if quick else (64, 200)
    figures = anyio.run(_measure, agents, calls)
    print(f"{'figure':<32}{'value':>12}")
    for key, value in figures.items():
        print(f"{key:<32}{value:>12}")
    return figures
