"""A server's history: does a repository with many finished runs make its next run dearer?

The state of a repository (`.git/fanout/state.db`) keeps every run, so a server that has served
for weeks holds hundreds of them, each merged and done with. Two repositories side by side, in
one process against the fake Messages API (no latency): one with `HISTORY` closed runs of two
agents (each driven to its end through the orchestrator and merged, as a client would), one
without. Figures:

- `status_ms_fresh` and `status_ms_history`: one `status()` poll of every run just after an
  event (the cursor moved, so nothing is answered from the last poll), least of `POLLS`.
- `cpu_ms_per_agent_fresh` and `cpu_ms_per_agent_history`: the CPU time per agent of a run of
  `AGENTS` agents (three turns each, `benchmarks.common.three_turns`), from spawn until every
  agent is final, long-polled as `drive` does; the two repositories alternate, `ROUNDS` rounds
  each, the least of each reported, and `history_cpu_ratio` is the second over the first.
  Target: `history_cpu_ratio` <= 1.2 (a run costs about the same whatever came before it).

`--quick` (CI): a shorter history and one round.
"""

from __future__ import annotations

import time
from pathlib import Path

import anyio

from benchmarks.common import (
    anthropic_factory,
    bench_settings,
    build_repo,
    drive,
    fake_in_process,
    scratch,
    self_cpu_s,
    table,
    tasks,
)
from orchestration.contracts import MergeRequest, SpawnRequest
from orchestration.heap import freeze_heap
from orchestration.orchestrator import Orchestrator
from orchestration.state import EventKind

HISTORY = 300
AGENTS = 16
ROUNDS = 3
POLLS = 20
RATIO_TARGET = 1.2


async def _closed_run(orch: Orchestrator, agents: int) -> None:
    """A run of `agents` driven to its end, then merged."""
    timing = await drive(orch, [SpawnRequest(tasks=tasks(agents), max_concurrency=agents)])
    if timing.failed:
        raise RuntimeError(f"{timing.failed} agents of a history run did not succeed")
    await orch.merge(MergeRequest(run_id=timing.spawned[0].run_id))


async def _status_ms(orch: Orchestrator) -> float:
    """The least time of a `status()` poll of every run just after an event."""
    ctx = await orch.context(None)
    best = float("inf")
    for n in range(POLLS):
        ctx.store.record_event(None, None, EventKind.NOTE, f"poll {n}")
        started = time.perf_counter()
        await orch.status()
        best = min(best, time.perf_counter() - started)
    return best * 1000


async def _round(orch: Orchestrator) -> float:
    """CPU ms per agent of one closed run of `AGENTS`."""
    cpu = self_cpu_s()
    await _closed_run(orch, AGENTS)
    return (self_cpu_s() - cpu) * 1000 / AGENTS


async def _measure(base_url: str, root: Path, history: int, rounds: int) -> dict[str, float]:
    fresh_repo, old_repo = root / "fresh", root / "history"
    build_repo(fresh_repo, 50)
    build_repo(old_repo, 50)
    factory = anthropic_factory(base_url)
    async with (
        Orchestrator(bench_settings(fresh_repo, AGENTS), factory) as fresh,
        Orchestrator(bench_settings(old_repo, AGENTS), factory) as old,
    ):
        await _closed_run(fresh, 2)  # imports, schemas, the SDK client: once, untimed
        for _ in range(history):
            await _closed_run(old, 2)
        freeze_heap()
        cpu_fresh: list[float] = []
        cpu_old: list[float] = []
        for _ in range(rounds):
            cpu_fresh.append(await _round(fresh))
            cpu_old.append(await _round(old))
        return {
            "status_ms_fresh": await _status_ms(fresh),
            "status_ms_history": await _status_ms(old),
            "cpu_ms_per_agent_fresh": min(cpu_fresh),
            "cpu_ms_per_agent_history": min(cpu_old),
            "runs_in_history": float(len((await old.status()).runs)),
            "runs_fresh": float(len((await fresh.status()).runs)),
        }


def run(quick: bool) -> dict[str, float | int]:
    history = 40 if quick else HISTORY
    rounds = 1 if quick else ROUNDS
    with scratch("bench-history-") as tmp, fake_in_process(latency_s=0.0) as fake:
        m = anyio.run(_measure, fake.base_url, Path(tmp), history, rounds)
    ratio = round(m["cpu_ms_per_agent_history"] / m["cpu_ms_per_agent_fresh"], 3)
    figures: dict[str, float | int] = {
        "status_ms_fresh": round(m["status_ms_fresh"], 3),
        "status_ms_history": round(m["status_ms_history"], 3),
        "cpu_ms_per_agent_fresh": round(m["cpu_ms_per_agent_fresh"], 2),
        "cpu_ms_per_agent_history": round(m["cpu_ms_per_agent_history"], 2),
        "history_cpu_ratio": ratio,
    }
    runs = int(m["runs_in_history"])
    table(
        [
            (
                "status_ms_fresh",
                figures["status_ms_fresh"],
                f"a status poll after an event, a repository with {int(m['runs_fresh'])} "
                "finished runs",
            ),
            (
                "status_ms_history",
                figures["status_ms_history"],
                f"the same with {runs} finished runs (closed: every agent merged)",
            ),
            (
                "cpu_ms_per_agent_fresh",
                figures["cpu_ms_per_agent_fresh"],
                f"a run of {AGENTS} agents, CPU per agent, least of {rounds} round(s)",
            ),
            (
                "cpu_ms_per_agent_history",
                figures["cpu_ms_per_agent_history"],
                "the same in the repository with that history, rounds alternating",
            ),
            ("history_cpu_ratio", ratio, f"the second over the first; target <= {RATIO_TARGET}"),
        ]
    )
    return figures
