"""Spawn latency on a large repository: 16 agents on a 10,000-file repository, from `spawn` until
`get_status` shows every agent running, against 16 x `git worktree add` by hand (one after the
other, the same repository, the same run).

Figures: `spawn_s_16` (seconds, the median of the rounds), `spawn_over_git_16` (the median of the
per-round ratios; target <= 1.2), and the parts beside them. The agents' model blocks until the
measurement is over (`FunctionModel`), so no turn competes with the worktrees being created.
The two phases alternate which goes first (creating files gets slower as the disk fills), over
four rounds. `--quick`: a 1,000-file repository, one round.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import anyio

from benchmarks.common import (
    bench_settings,
    build_repo,
    drive,
    scratch,
    table,
    tasks,
)
from orchestration.contracts import SpawnRequest
from orchestration.model import ModelRequest, ModelResponse, ToolUseBlock, Usage
from orchestration.orchestrator import Orchestrator
from orchestration.providers.function import FunctionModel
from orchestration.workspace import run_git

AGENTS = 16
# 160,000 files per phase: on a slow disk (a heavily churned one) a phase can take minutes, by
# hand as by the product; allow far more
PHASE_TIMEOUT_S = 1800.0


def _by_hand(repo: Path, base: str, round_no: int, count: int = AGENTS) -> float:
    """`count` x `git worktree add -b` one after the other. They are left in place: deleting
    thousands of files just before the next round creates as many would slow that round down
    (ext4 skips recently freed inodes when it allocates), so nothing is deleted until the end."""
    root = repo.parent / f"by-hand-{round_no}"
    started = time.perf_counter()
    for i in range(count):
        run_git(
            repo,
            "worktree",
            "add",
            "--quiet",
            "-b",
            f"hand/{round_no}/{i}",
            str(root / str(i)),
            base,
        )
    return time.perf_counter() - started


def _gated_model(gate: anyio.Event) -> FunctionModel:
    async def reply(request: ModelRequest) -> ModelResponse:
        await gate.wait()
        return ModelResponse(
            content=[ToolUseBlock(id="toolu_finish", name="finish", input={"summary": "done"})],
            stop_reason="tool_use",
            usage=Usage(input_tokens=10, output_tokens=5),
            model="bench",
        )

    return FunctionModel(reply)


async def _orchestrated(repo: Path, round_no: int) -> tuple[float, float, int]:
    """(until all running, spawn() alone, failed agents) for one run of 16. Each round's agents
    write scopes of their own: the previous round's agents are not merged, so they still hold
    their scopes, and agents on the same scopes would wait for them (as designed)."""
    gate = anyio.Event()
    model = _gated_model(gate)
    async with Orchestrator(bench_settings(repo, AGENTS), lambda _name: model) as orch:
        await orch.status()  # the repository is open, as in a running server
        timing = await drive(
            orch,
            [SpawnRequest(tasks=tasks(AGENTS, start=100 * round_no), max_concurrency=AGENTS)],
            until_running=True,
            timeout_s=PHASE_TIMEOUT_S,
        )
        gate.set()
        final = await drive_rest(orch, timing.spawned[0].run_id)
    return timing.all_running_s, timing.spawn_s, final


async def drive_rest(orch: Orchestrator, run_id: str) -> int:
    """Wait for the run's agents to end; the number that did not succeed."""
    cursor: int | None = None
    with anyio.fail_after(PHASE_TIMEOUT_S):
        while True:
            status = await orch.status(run_id=run_id, since=cursor, wait_s=10)
            cursor = status.cursor
            agents = status.runs[0].agents
            if not any(a.status.active for a in agents):
                return sum(1 for a in agents if a.status.value != "succeeded")


def run(quick: bool) -> dict[str, float | int]:
    files, rounds = (1_000, 1) if quick else (10_000, 4)
    note = f"{files} files, {AGENTS} agents" + (" (quick)" if quick else "")
    hand: list[float] = []
    orch: list[float] = []
    spawn_only: list[float] = []
    failed = 0
    with scratch("bench-spawn-") as tmp:
        repo = Path(tmp) / "repo"
        base = build_repo(repo, files)
        run_git(repo, "status", "--porcelain")  # warm the index and the page cache
        _by_hand(repo, base, 0, count=1)  # warm-up (git, the object store), not counted
        for round_no in range(1, rounds + 1):
            # the two alternate which goes first, so neither always meets a fuller disk
            if round_no % 2:
                hand.append(_by_hand(repo, base, round_no))
            all_running, spawn_s, bad = anyio.run(_orchestrated, repo, round_no)
            if not round_no % 2:
                hand.append(_by_hand(repo, base, round_no))
            orch.append(all_running)
            spawn_only.append(spawn_s)
            failed += bad
    ratios = [o / h for o, h in zip(orch, hand, strict=True)]
    figures: dict[str, float | int] = {
        "spawn_s_16": round(statistics.median(orch), 3),
        "spawn_over_git_16": round(statistics.median(ratios), 3),
        "spawn_git_by_hand_s_16": round(statistics.median(hand), 3),
        "spawn_call_s_16": round(statistics.median(spawn_only), 3),
        "spawn_failed_16": failed,
    }
    table(
        [
            (
                "spawn_s_16",
                figures["spawn_s_16"],
                f"{note}: spawn -> all running, median of {rounds}",
            ),
            (
                "spawn_over_git_16",
                figures["spawn_over_git_16"],
                "target <= 1.2; per round: " + ", ".join(f"{r:.2f}" for r in ratios),
            ),
            (
                "spawn_git_by_hand_s_16",
                figures["spawn_git_by_hand_s_16"],
                "16 x git worktree add, sequential; per round: "
                + ", ".join(f"{h:.2f}" for h in hand),
            ),
            (
                "spawn_call_s_16",
                figures["spawn_call_s_16"],
                "spawn() alone (returns before the worktrees)",
            ),
            ("spawn_failed_16", failed, f"agents not succeeded, over {rounds} round(s)"),
        ]
    )
    return figures
