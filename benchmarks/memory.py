"""Memory per running agent: 128 agents at concurrency 32 against the fake Messages API (200 ms
per request, in a child process so that its memory is not counted), through `AnthropicModel`.

A run holds at most 64 tasks and concurrency is per run, so the 128 agents are two runs of 64
spawned together, each at concurrency 16: 32 agents run at once, 128 are in the state store.
Figures: `rss_mb_per_running_agent` = (peak RSS of this process during the runs - RSS before
them) / 32 (target <= 3 MB; RSS sampled every 5 ms, the process already warmed up by a 2-agent
run, then its heap collected and frozen as the server's is, which sets the collector's young
threshold), `agents_failed` (target 0). `--quick`: 16 agents at concurrency 8 (one run).
"""

from __future__ import annotations

import threading
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
    rss_bytes,
    scratch,
    table,
    tasks,
)
from orchestration.contracts import SpawnRequest
from orchestration.heap import freeze_heap

LATENCY_S = 0.2
SAMPLE_S = 0.005
MB = 1024 * 1024


class PeakSampler:
    """Samples this process's RSS from a thread until stopped; keeps the peak."""

    def __init__(self) -> None:
        self.peak = rss_bytes()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self.samples += 1
            self._stop.wait(SAMPLE_S)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


async def _measure(
    base_url: str, root: Path, runs: int, per_run: int, concurrency: int
) -> tuple[int, int, int, int, float, int]:
    """(rss before, peak, rss after, failed, makespan_s, samples)."""
    repo = root / "repo"
    build_repo(repo, 50)
    settings = bench_settings(repo, concurrency)
    async with orchestrator(settings, anthropic_factory(base_url)) as orch:
        await drive(orch, [SpawnRequest(tasks=tasks(2, start=9000), max_concurrency=2)])
        freeze_heap()  # as `fanout-mcp` does once it has started (orchestration.heap)
        before = rss_bytes()
        requests = [
            SpawnRequest(tasks=tasks(per_run, start=1 + r * per_run), max_concurrency=concurrency)
            for r in range(runs)
        ]
        with PeakSampler() as sampler:
            timing = await drive(orch, requests, timeout_s=600)
        after = rss_bytes()
    return before, sampler.peak, after, timing.failed, timing.makespan_s, sampler.samples


def run(quick: bool) -> dict[str, float | int]:
    runs, per_run, concurrency = (1, 16, 8) if quick else (2, 64, 16)
    running = runs * concurrency
    started = time.perf_counter()
    with (
        scratch("bench-memory-") as tmp,
        fake_in_process(latency_s=LATENCY_S) as fake,
    ):
        before, peak, after, failed, makespan, samples = anyio.run(
            _measure, fake.base_url, Path(tmp), runs, per_run, concurrency
        )
    per_agent = (peak - before) / running / MB
    note = f"{runs * per_run} agents, {running} at once" + (" (quick)" if quick else "")
    figures: dict[str, float | int] = {
        "rss_mb_per_running_agent": round(per_agent, 3),
        "agents_failed": failed,
    }
    table(
        [
            (
                "rss_mb_per_running_agent",
                figures["rss_mb_per_running_agent"],
                f"{note}: (peak {peak / MB:.1f} MB - before {before / MB:.1f} MB) / {running}; "
                "target <= 3",
            ),
            ("agents_failed", failed, f"{note}; target 0"),
            (
                "rss after the run (MB)",
                round(after / MB, 1),
                f"{samples} samples; makespan "
                f"{makespan:.2f} s; fake: {fake.stats.requests} requests, "
                f"{fake.stats.errors} errors; "
                f"total {time.perf_counter() - started:.1f} s",
            ),
        ]
    )
    return figures
