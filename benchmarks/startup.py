"""A fresh server's first run, as a user meets it: `fanout-mcp` started over stdio with the real
`anthropic` client pointed at the fake Messages API (200 ms per request), driven by bare
JSON-RPC lines.

Figures: `startup_initialize_s` (process start until `initialize` is answered),
`first_spawn_s` (how long the first `spawn_subagents` call takes, sent `PAUSE_S` after the
handshake, about what a person or an orchestrating model takes to decide on a first plan) and
`first_run_s` (from that call until `get_status` long-polling sees its 4 agents final; each agent
makes 3 model calls, so 0.6 s is its ideal). The best of `ROUNDS` fresh server processes is
reported; `--quick` runs one.

The first spawn is where a server used to import the `anthropic` SDK, on its event loop (about
2 s); the server now does that in a background thread at start (`orchestration.heap`).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import StdioRpc, build_repo, fake_in_process, scratch, table

AGENTS = 4
LATENCY_S = 0.2
PAUSE_S = 2.0
ROUNDS = 3


def _tool(rpc: StdioRpc, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """A tool's structured content; a JSON-RPC or tool error raises."""
    answer = rpc.request("tools/call", {"name": name, "arguments": arguments})
    if "error" in answer:
        raise RuntimeError(f"{name} failed: {answer['error']}")
    result: dict[str, Any] = answer["result"]
    if result.get("isError"):
        raise RuntimeError(f"{name} failed: {result['content']}")
    return result["structuredContent"]


def _one(repo: Path, base_url: str) -> tuple[float, float, float, int]:
    """(initialize_s, first_spawn_s, first_run_s, agents not succeeded) of one fresh server."""
    build_repo(repo, 50)
    env = {
        **os.environ,
        "FANOUT_SANDBOX": "none",
        "ANTHROPIC_API_KEY": "bench",
        "ANTHROPIC_BASE_URL": base_url,
    }
    env.pop("FANOUT_MODEL_PROVIDER", None)
    started = time.perf_counter()
    rpc = StdioRpc([sys.executable, "-m", "mcp_server.cli", "--repo", str(repo)], env)
    try:
        rpc.initialize()
        initialize_s = time.perf_counter() - started
        time.sleep(PAUSE_S)
        tasks = [
            {
                "name": f"a{n}",
                "prompt": f"BENCH-AGENT-{n}: write work/a{n}/out.txt, read it back, then finish.",
                "write_scope": [f"work/a{n}"],
            }
            for n in range(1, AGENTS + 1)
        ]
        t0 = time.perf_counter()
        spawned = _tool(rpc, "spawn_subagents", {"tasks": tasks})
        spawn_s = time.perf_counter() - t0
        run_id = str(spawned["run_id"])
        cursor: int | None = None
        while True:
            args: dict[str, Any] = {"run_id": run_id, "wait_s": 10}
            if cursor is not None:
                args["since"] = cursor
            status = _tool(rpc, "get_status", args)
            cursor = int(status["cursor"])
            agents = status["runs"][0]["agents"]
            if not any(a["status"] in ("queued", "waiting", "running") for a in agents):
                break
            if time.perf_counter() - t0 > 120:
                raise RuntimeError("the first run did not finish within 120 s")
        run_s = time.perf_counter() - t0
        failed = sum(1 for a in agents if a["status"] != "succeeded")
        return initialize_s, spawn_s, run_s, failed
    finally:
        rpc.close()


def run(quick: bool) -> dict[str, float | int]:
    rounds = 1 if quick else ROUNDS
    results: list[tuple[float, float, float, int]] = []
    with scratch("bench-startup-") as tmp, fake_in_process(latency_s=LATENCY_S) as fake:
        for r in range(rounds):
            results.append(_one(Path(tmp) / f"repo-{r}", fake.base_url))
    figures: dict[str, float | int] = {
        "startup_initialize_s": round(min(r[0] for r in results), 3),
        "first_spawn_s": round(min(r[1] for r in results), 3),
        "first_run_s": round(min(r[2] for r in results), 3),
        "first_run_failed": sum(r[3] for r in results),
    }
    note = f"best of {rounds} fresh server(s)"
    table(
        [
            ("startup_initialize_s", figures["startup_initialize_s"], f"{note}: until initialize"),
            (
                "first_spawn_s",
                figures["first_spawn_s"],
                f"the first spawn_subagents call, {PAUSE_S:.0f} s after the handshake",
            ),
            (
                "first_run_s",
                figures["first_run_s"],
                f"{AGENTS} agents x 3 model calls of {LATENCY_S * 1000:.0f} ms, until all final "
                "(ideal 0.6 s)",
            ),
            ("first_run_failed", figures["first_run_failed"], "agents not succeeded, all rounds"),
        ]
    )
    return figures
