"""Fan-out makespan: N agents x 3 turns against the fake Messages API at 200 ms per request, on a
small repository, concurrency N, through the real `anthropic` client (`AnthropicModel`).

Figures: `makespan_over_ideal_16`, `makespan_over_ideal_64` — the makespan (from just before
`spawn`, the repository already open as in a running server, until `get_status` long-polling
sees every agent final) over the ideal 3 x 200 ms.
Targets: <= 1.2 and <= 1.5. The fake runs in a child process so that its event loop does not
share this process's GIL with the orchestrator. `--quick`: 4 and 8 agents, reported under the
same keys (noted as quick in the table).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import anyio

from benchmarks.common import (
    anthropic_factory,
    bench_settings,
    build_repo,
    drive,
    fake_in_process,
    orchestrator,
    table,
    tasks,
)
from orchestration.contracts import SpawnRequest

LATENCY_S = 0.2
TURNS = 3
IDEAL_S = TURNS * LATENCY_S
SMALL_REPO_FILES = 50


async def _one(base_url: str, agents: int, root: Path) -> tuple[float, int, float]:
    """(makespan_s, failed agents, spawn_s) of one run of `agents` in a fresh repository."""
    repo = root / f"repo-{agents}"
    build_repo(repo, SMALL_REPO_FILES)
    async with orchestrator(bench_settings(repo, agents), anthropic_factory(base_url)) as orch:
        await orch.status()  # the repository is open (state, leases) as in a running server
        timing = await drive(orch, [SpawnRequest(tasks=tasks(agents), max_concurrency=agents)])
    return timing.makespan_s, timing.failed, timing.spawn_s


async def _measure(
    sizes: tuple[int, int], base_url: str, root: Path
) -> list[tuple[float, int, float]]:
    await _one(base_url, 2, root / "warm-up")  # imports, SDK client, pydantic schemas: once
    return [await _one(base_url, n, root) for n in sizes]


def run(quick: bool) -> dict[str, float | int]:
    sizes = (4, 8) if quick else (16, 64)
    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp,
        fake_in_process(latency_s=LATENCY_S) as fake,
    ):
        results = anyio.run(_measure, sizes, fake.base_url, Path(tmp))
    figures: dict[str, float | int] = {}
    rows: list[tuple[str, float | int, str]] = []
    note = " (quick)" if quick else ""
    for key, n, (makespan, failed, spawn_s) in zip(("16", "64"), sizes, results, strict=True):
        ratio = round(makespan / IDEAL_S, 3)
        figures[f"makespan_over_ideal_{key}"] = ratio
        figures[f"fanout_failed_{key}"] = failed
        target = "1.2" if key == "16" else "1.5"
        rows.append(
            (
                f"makespan_over_ideal_{key}",
                ratio,
                f"{n} agents{note}: makespan {makespan:.3f} s / ideal {IDEAL_S:.1f} s "
                f"(spawn() returned after {spawn_s:.3f} s); target <= {target}",
            )
        )
        rows.append((f"fanout_failed_{key}", failed, f"{n} agents{note}: not succeeded"))
    table(rows)
    print(
        f"(fake requests: {fake.stats.requests}, errors: {fake.stats.errors}; "
        f"total {time.perf_counter() - started:.1f} s)"
    )
    return figures
