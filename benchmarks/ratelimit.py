"""A fan-out that meets the API's rate limit: the product against the limit's own floor.

The fake Messages API (in this process, on loopback, through the real `anthropic` client)
refuses requests beyond a token bucket of requests, as the API does: 429 `rate_limit_error`
with a `retry-after` in whole seconds. Figures: whether every agent still succeeds, how many
requests the API refused for each one it answered, and the makespan over the least time the
limit allows for the same requests (the floor: what no client can beat).

    python -m benchmarks ratelimit [--quick]
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
    orchestrator,
    scratch,
    table,
    tasks,
    three_turns,
)
from fakeapi import FakeAnthropic, RequestRateLimit
from orchestration.contracts import SpawnRequest

LATENCY_S = 0.2
REQUESTS_PER_AGENT = 3  # three_turns: write, read, finish
REPO_FILES = 50


async def _measure(
    root: Path, agents: int, per_minute: float, burst: float
) -> tuple[float, int, int, int]:
    """(makespan, agents not succeeded, requests answered, requests refused)."""
    limit = RequestRateLimit(per_minute, burst=burst)
    fake = FakeAnthropic(three_turns, latency_s=LATENCY_S, rate_limit=limit)
    repo = root / "repo"
    build_repo(repo, REPO_FILES)
    async with (
        fake.serve(),
        orchestrator(bench_settings(repo, agents), anthropic_factory(fake.base_url)) as orch,
    ):
        await orch.status()  # the repository is open, as in a running server
        started = time.perf_counter()
        timing = await drive(
            orch, [SpawnRequest(tasks=tasks(agents), max_concurrency=agents)], timeout_s=900
        )
        makespan = time.perf_counter() - started
    answered = sum(1 for r in fake.requests if r.status == 200)
    refused = sum(1 for r in fake.requests if r.status == 429)
    return makespan, timing.failed, answered, refused


def run(quick: bool) -> dict[str, float | int]:
    agents, per_minute, burst = (8, 240.0, 2.0) if quick else (16, 60.0, 2.0)
    with scratch("bench-ratelimit-") as tmp:
        makespan, failed, answered, refused = anyio.run(
            _measure, Path(tmp), agents, per_minute, burst
        )
    requests = agents * REQUESTS_PER_AGENT
    # the bucket lets `burst` through at once, then one per 60/per_minute s; the last answer
    # takes the latency
    floor = max(requests - burst, 0) * 60.0 / per_minute + LATENCY_S
    limit = f"{per_minute:g} requests a minute, a bucket of {burst:g}"
    figures: dict[str, float | int] = {
        "ratelimit_failed": failed,
        "ratelimit_refused_per_answer": round(refused / answered, 3) if answered else 0.0,
        "ratelimit_makespan_s": round(makespan, 2),
        "ratelimit_floor_s": round(floor, 2),
        "ratelimit_makespan_over_floor": round(makespan / floor, 3),
    }
    table(
        [
            (
                "ratelimit_failed",
                failed,
                f"{agents} agents x {REQUESTS_PER_AGENT} requests against an API allowing "
                f"{limit}: agents not succeeded",
            ),
            (
                "ratelimit_refused_per_answer",
                figures["ratelimit_refused_per_answer"],
                f"429s the API sent per request it answered ({refused} / {answered})",
            ),
            ("ratelimit_makespan_s", figures["ratelimit_makespan_s"], "spawn to all final"),
            (
                "ratelimit_floor_s",
                figures["ratelimit_floor_s"],
                "floor: the least time the limit allows for these requests (the bucket, then "
                "one request per refill, plus the last answer's latency)",
            ),
            (
                "ratelimit_makespan_over_floor",
                figures["ratelimit_makespan_over_floor"],
                "makespan / floor",
            ),
        ]
    )
    return figures
