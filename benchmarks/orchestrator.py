"""What the orchestrator reads: a real MCP client (the SDK's `Client` over stdio) runs the loop the
README teaches — `spawn_subagents`, then `get_status(run_id, since=cursor, wait_s)` until the run
needs it, then `merge_results` — on 16 and 64 agents with disjoint write scopes, against the fake
Messages API through the real `anthropic` client in the server.

Each agent takes four turns (read_file, write_file, run_command, finish with a 300-character
summary); agent i's requests take 0.1 + 0.15 * (i % 8) s at the fake, so agents finish at eight
different times. Figures: the bytes the client receives across spawn, every get_status and the
merge, per agent — the structured content as compact JSON (what a client such as Claude Code puts
in its model's context) and the text content, apart — and the number of get_status calls.
Targets: <= 800 bytes per agent each, <= 3 get_status calls.

The waves case: 4 agents, two pairs sharing a write scope, so the second of each pair waits until
the first is merged. `waves_loop_ended` is 1 when the loop ends by itself within its bound with
every agent merged, else 0. Target: 1.

`--quick` (CI): 16 agents at a fifth of the latencies, then the waves case with a shorter bound;
the 64-agent keys are absent.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import anyio
from mcp import Client, StdioServerParameters
from mcp_types import CallToolResult, TextContent

from benchmarks.common import PROJECT_ROOT, build_repo, fake_in_process, scratch
from fakeapi import FakeRequest, Reply, finish, text, tool_use

LATENCY_CLASSES = 8
SUMMARY_CHARS = 300
JSON_TARGET = 800  # bytes per agent, structured content and text alike
CALLS_TARGET = 3
ACTIVE = frozenset({"queued", "waiting", "running"})
# the fake reads an agent's script from its task: "BENCH-AGENT-<n> WRITE <path> LATENCY-MS <ms>"
TASK_TAG = re.compile(r"BENCH-AGENT-(\d+) WRITE (\S+) LATENCY-MS (\d+)")


# --------------------------------------------------------------------------- the fake's script


def four_turns(request: FakeRequest) -> Reply:
    """read_file → write_file (the path of the task) → run_command → finish, each answered after
    the task's latency. Module-level: the fake runs in a child process."""
    found = TASK_TAG.search(f"{request.system_text}\n{request.first_user_text}")
    if found is None:
        return text("not a benchmark task")
    n, path, latency = found.group(1), found.group(2), int(found.group(3)) / 1000
    turn = request.assistant_turns
    if turn == 0:
        answer = tool_use("read_file", path="README.md")
    elif turn == 1:
        answer = tool_use("write_file", path=path, content=f"agent {n}\n")
    elif turn == 2:
        answer = tool_use("run_command", command=f"wc -c {path}")
    elif turn == 3:
        summary = f"agent {n}: read README.md, wrote {path}, counted it. "
        answer = finish(summary.ljust(SUMMARY_CHARS, "."))
    else:
        answer = text("done")
    return replace(answer, latency_s=latency)


def _task(n: int, scope: str, path: str, latency_s: float) -> dict[str, Any]:
    prompt = f"BENCH-AGENT-{n} WRITE {path} LATENCY-MS {round(latency_s * 1000)}"
    return {"name": f"agent-{n}", "prompt": prompt, "write_scope": [scope]}


def disjoint_tasks(agents: int, scale: float) -> list[dict[str, Any]]:
    """One scope per agent; agent i in latency class i % 8."""
    return [
        _task(i, f"work/a{i}/", f"work/a{i}/out.txt", scale * (0.1 + 0.15 * (i % LATENCY_CLASSES)))
        for i in range(agents)
    ]


def wave_tasks(scale: float) -> list[dict[str, Any]]:
    """Two pairs, each pair sharing a scope: the second of a pair waits for the first's merge."""
    return [_task(i, f"work/p{i // 2}/", f"work/p{i // 2}/a{i}.txt", scale * 0.1) for i in range(4)]


# --------------------------------------------------------------------------- the answer


@dataclass
class StatusRead:
    """What the loop needs of a `get_status` answer."""

    cursor: int
    settled: bool | None
    """The run-level `settled` flag; None when the answer has none (then the loop waits for no
    agent queued, waiting or running)."""
    next: str
    statuses: dict[str, str]
    """agent_id -> status, for the agents the answer lists (all, or those changed since)."""
    by_status: dict[str, int] | None
    """The run's totals by status, when the answer has them."""


def read_status(sc: dict[str, Any]) -> StatusRead:
    """The one place that knows the shape of a `get_status` answer: `settled` and `next` are
    taken from the run (`runs[0]`) or else from the top level."""
    runs = cast(list[dict[str, Any]], sc.get("runs") or [{}])
    run = runs[0]
    settled = run.get("settled", sc.get("settled"))
    step = run.get("next", sc.get("next", ""))
    agents = cast(list[dict[str, Any]], run.get("agents") or [])
    totals = run.get("totals")
    by_status = cast(dict[str, Any], totals).get("by_status") if isinstance(totals, dict) else None
    return StatusRead(
        cursor=int(sc["cursor"]),
        settled=settled if isinstance(settled, bool) else None,
        next=step if isinstance(step, str) else json.dumps(step),
        statuses={str(a["agent_id"]): str(a["status"]) for a in agents if "agent_id" in a},
        by_status=cast(dict[str, int], by_status) if isinstance(by_status, dict) else None,
    )


# --------------------------------------------------------------------------- the loop


@dataclass
class Received:
    """Bytes the client received, per kind, and the calls made."""

    json_bytes: int = 0
    text_bytes: int = 0
    status_calls: int = 0
    merge_calls: int = 0

    def add(self, result: CallToolResult) -> dict[str, Any]:
        """Count an answer; its structured content (an error raises)."""
        texts = [c.text for c in result.content if isinstance(c, TextContent)]
        self.text_bytes += sum(len(t.encode()) for t in texts)
        if result.is_error or result.structured_content is None:
            raise RuntimeError(f"tool error: {' '.join(texts)[:500]}")
        sc = dict(result.structured_content)
        self.json_bytes += len(json.dumps(sc, separators=(",", ":")).encode())
        return sc


@dataclass
class LoopOutcome:
    received: Received
    ended: bool  # the loop decided it was done (not stopped by its bound)
    agents: int
    merged: set[str] = field(default_factory=set[str])
    wall_s: float = 0.0


def _pending(read: StatusRead, known: dict[str, str]) -> int:
    """Agents queued, waiting or running: from the run's totals, else from every status seen."""
    if read.by_status is not None:
        return sum(n for status, n in read.by_status.items() if status in ACTIVE)
    return sum(1 for status in known.values() if status in ACTIVE)


async def documented_loop(
    client: Client, tasks: list[dict[str, Any]], max_concurrency: int, bound_s: float
) -> LoopOutcome:
    """spawn, then long-poll get_status and merge as the answer says, within `bound_s`.

    With a run-level `settled`: poll until settled; if `next` names `merge_results`, merge; stop
    once no agent is queued, waiting or running (else poll again: the next wave). Without it
    (the older answer): poll until no agent is queued, waiting or running, then merge once."""
    received = Received()
    started = time.perf_counter()
    deadline = started + bound_s
    spawned = received.add(
        await client.call_tool(
            "spawn_subagents", {"tasks": tasks, "max_concurrency": max_concurrency}
        )
    )
    run_id = str(spawned["run_id"])
    known = {str(a["agent_id"]): str(a["status"]) for a in spawned["agents"]}
    outcome = LoopOutcome(received, ended=False, agents=len(known))

    async def merge() -> int:
        answer = received.add(await client.call_tool("merge_results", {"run_id": run_id}))
        received.merge_calls += 1
        done = {str(a["agent_id"]) for a in answer["agents"] if a.get("outcome") == "merged"}
        outcome.merged |= done
        for agent_id in done:
            known[agent_id] = "merged"
        return len(done)

    cursor = 0
    while (remaining := deadline - time.perf_counter()) > 0:
        # wait_s covers what is left of the bound: the server answers when the run needs us
        args = {"run_id": run_id, "since": cursor, "wait_s": max(1, int(remaining))}
        read = read_status(received.add(await client.call_tool("get_status", args)))
        received.status_calls += 1
        cursor = read.cursor
        known.update(read.statuses)
        pending = _pending(read, known)
        if read.settled is None:
            if pending:
                continue
            await merge()
            outcome.ended = True
            break
        if not read.settled:
            continue
        merged_now = await merge() if "merge_results" in read.next else 0
        if not pending:
            outcome.ended = True
            break
        if not merged_now:
            break  # settled, agents wait, and nothing to merge: the loop cannot go on
    outcome.wall_s = time.perf_counter() - started
    return outcome


# --------------------------------------------------------------------------- a case


def _server(repo: Path, base_url: str, wait_cap_s: float) -> StdioServerParameters:
    """This checkout's stdio server on `repo`, its model calls going to the fake."""
    env = {
        **os.environ,
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": "bench",
        "FANOUT_SANDBOX": "none",
        "FANOUT_MODEL_PROVIDER": "anthropic",
        "FANOUT_STATUS_WAIT_CAP_S": str(wait_cap_s),
        "PYTHONPATH": str(PROJECT_ROOT),
    }
    return StdioServerParameters(
        command=sys.executable, args=["-m", "mcp_server.cli", "--repo", str(repo)], env=env
    )


async def _case(
    base_url: str, tasks: list[dict[str, Any]], max_concurrency: int, bound_s: float
) -> LoopOutcome:
    with scratch("fanout-bench-orchestrator-") as tmp:
        repo = Path(tmp) / "repo"
        build_repo(repo, 20)
        async with Client(_server(repo, base_url, bound_s + 60)) as client:
            return await documented_loop(client, tasks, max_concurrency, bound_s)


def _fan_out(base_url: str, agents: int, scale: float, bound_s: float) -> dict[str, float | int]:
    outcome = anyio.run(_case, base_url, disjoint_tasks(agents, scale), agents, bound_s)
    got = outcome.received
    per_json, per_text = got.json_bytes / agents, got.text_bytes / agents
    print(
        f"{agents} agents: {per_json:.0f} B/agent JSON (target <= {JSON_TARGET}), "
        f"{per_text:.0f} B/agent text (target <= {JSON_TARGET}), "
        f"{got.status_calls} get_status calls (target <= {CALLS_TARGET}), "
        f"{got.merge_calls} merge(s), {len(outcome.merged)}/{agents} merged, "
        f"loop ended by itself: {'yes' if outcome.ended else 'no'}, {outcome.wall_s:.1f} s",
        flush=True,
    )
    return {
        f"orchestrator_json_bytes_per_agent_{agents}": round(per_json, 1),
        f"orchestrator_text_bytes_per_agent_{agents}": round(per_text, 1),
        f"status_calls_{agents}": got.status_calls,
        f"merge_calls_{agents}": got.merge_calls,
        f"merged_{agents}": len(outcome.merged),
        f"orchestrator_wall_s_{agents}": round(outcome.wall_s, 2),
    }


def _waves(base_url: str, scale: float, bound_s: float) -> dict[str, float | int]:
    outcome = anyio.run(_case, base_url, wave_tasks(scale), 4, bound_s)
    ended = int(outcome.ended and len(outcome.merged) == outcome.agents)
    how = "ended by itself" if outcome.ended else f"stopped at its {bound_s:.0f} s bound"
    print(
        f"waves (4 agents, two pairs sharing a scope): waves_loop_ended {ended} (target 1); "
        f"the loop {how} after {outcome.wall_s:.1f} s, {outcome.received.status_calls} "
        f"get_status calls, {len(outcome.merged)}/{outcome.agents} merged",
        flush=True,
    )
    return {
        "waves_loop_ended": ended,
        "waves_status_calls": outcome.received.status_calls,
        "waves_merged": len(outcome.merged),
        "waves_wall_s": round(outcome.wall_s, 2),
    }


def run(quick: bool) -> dict[str, float | int]:
    # the bounds stop a loop that would not end by itself (the waves case on the older answer)
    scale, sizes = (0.2, (16,)) if quick else (1.0, (16, 64))
    fan_out_bound_s, waves_bound_s = (60.0, 20.0) if quick else (240.0, 60.0)
    figures: dict[str, float | int] = {}
    with fake_in_process(four_turns) as fake:
        for agents in sizes:
            figures.update(_fan_out(fake.base_url, agents, scale, fan_out_bound_s))
        figures.update(_waves(fake.base_url, scale, waves_bound_s))
    if quick:
        print("(quick: latencies at a fifth, 16 agents only: the _64 keys are absent)")
    return figures
