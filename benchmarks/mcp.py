"""`get_status` over stdio on a run of 64 agents (quick: 16) against the no-op `ping` tool of the
same server in the same session: the MCP surface's own overhead. Target: ratio <= 2."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import anyio
from mcp import Client

from mcp_server.demo import make_sample_repo, server_params, structured, wait_idle


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
            await wait_idle(client, run_id, 0, lambda _: None, timeout_s=300)
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
    status_p50, ping_p50 = _p50_ms(status_s), _p50_ms(ping_s)
    return {
        "mcp_agents": agents,
        "get_status_p50_ms": status_p50,
        "noop_p50_ms": ping_p50,
        "ratio": round(status_p50 / ping_p50, 2) if ping_p50 else 0.0,
    }


def run(quick: bool) -> dict[str, float | int]:
    agents, calls = (16, 30) if quick else (64, 200)
    figures = anyio.run(_measure, agents, calls)
    print(f"{'figure':<20}{'value':>12}")
    for key, value in figures.items():
        print(f"{key:<20}{value:>12}")
    return figures
