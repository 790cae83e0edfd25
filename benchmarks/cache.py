"""Prompt caching across a run: 8 agents (3 turns each) sharing a ~20k-token context (plan,
conventions, files), against the fake Messages API, whose cache keeps the API's rules (an entry
is readable only once its writer's response has begun; see `fakeapi.cache`).

Rounds alternate between a server that writes the shared prefix once (the default: the first
request goes alone, the others wait until its response begins) and one that starts every agent
at once (`FANOUT_CACHE_WARMUP_MAX_S=0`), each on its own repository, each round with its own
plan (so that no round reads another's prefix).

Figures, from the rounds with the warm-up:
- `cache_read_share`: of agents 2..N's shared-prefix tokens (tools and shared system prompt, in
  each of their requests, as the fake counts them), the share billed as cache reads (>= 0.9);
- `input_cost_over_uncached`: the run's input tokens at the API's prices (plain, writes x1.25
  or x2 for an hour, reads x0.1) over the same tokens all billed as plain input (<= 0.35);
- `warmup_delay_over_first_byte`: what the warm-up adds to the run (median makespan with it
  minus without it) over the first request's time to its response's start (<= 1.2);
- `estimate_error`: |spawn's estimate - what the run spent| / spent, in the budget's units, the
  largest over the rounds after the first (calibrated by the repository's earlier runs; <= 0.25);
  `estimate_error_first_run` is the first round's, on the defaults.
The same share without the warm-up is printed beside. `--quick`: 2 agents, 2 rounds.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import anyio

from benchmarks.common import (
    FakeStats,
    anthropic_factory,
    bench_settings,
    build_repo,
    drive,
    fake_in_process,
    orchestrator,
    scratch,
    table,
    tasks,
)
from orchestration.contracts import SharedContextSpec, SpawnRequest, TokenUsage
from orchestration.orchestrator import Orchestrator

LATENCY_S = 0.4  # the fake's time to first byte
SHARED_FILES = 4


def _paragraphs(topic: str, count: int) -> str:
    return "\n".join(
        f"{topic} {i}: the module keeps its state in one place, validates its inputs at the "
        f"boundary, logs what it refuses and why, and is covered by a focused test ({i})."
        for i in range(count)
    )


def _shared_files() -> dict[str, str]:
    body = "".join(
        f'def helper_{k}(value: int) -> int:\n    """Helper {k}."""\n    return value + {k}\n\n'
        for k in range(120)
    )
    return {f"shared/lib{i}.py": body for i in range(SHARED_FILES)}


def _shared_context(label: str) -> SharedContextSpec:
    return SharedContextSpec(
        plan=f"Round {label}.\n" + _paragraphs("Step", 125),
        conventions=_paragraphs("Rule", 60),
        files=sorted(_shared_files()),
    )


@dataclass
class Round:
    tokens: TokenUsage
    makespan_s: float
    estimate: int
    spent: int
    first_byte_s: float | None
    failed: int
    prefix_tokens: int


async def _round(orch: Orchestrator, label: str, agents: int, first: int) -> Round:
    timing = await drive(
        orch,
        [
            SpawnRequest(
                tasks=tasks(agents, start=first),
                shared_context=_shared_context(label),
                max_concurrency=agents,
            )
        ],
    )
    spawned = timing.spawned[0]
    status = await orch.status(run_id=spawned.run_id)
    run = status.runs[0]
    cache = run.prompt_cache
    return Round(
        tokens=run.totals.tokens,
        makespan_s=timing.makespan_s,
        estimate=spawned.estimate.estimated_total_tokens,
        spent=run.totals.budget_used,
        first_byte_s=cache.first_byte_s if cache is not None else None,
        failed=timing.failed,
        prefix_tokens=spawned.estimate.shared_prefix_tokens,
    )


async def _measure(
    base_url: str, root: Path, agents: int, rounds: int
) -> tuple[list[Round], list[Round]]:
    warm_repo, cold_repo = root / "warm", root / "cold"
    build_repo(warm_repo, 50, extra=_shared_files())
    build_repo(cold_repo, 50, extra=_shared_files())
    factory = anthropic_factory(base_url)
    warm: list[Round] = []
    cold: list[Round] = []
    async with (
        orchestrator(bench_settings(warm_repo, agents), factory) as with_warmup,
        orchestrator(
            bench_settings(cold_repo, agents, cache_warmup_max_s=0), factory
        ) as without_warmup,
    ):
        for r in range(rounds):
            first = 1 + r * agents
            warm.append(await _round(with_warmup, f"{r} warm", agents, first))
            cold.append(await _round(without_warmup, f"{r} cold", agents, first))
    return warm, cold


def _share_of_others(stats: FakeStats, label_runs: int) -> tuple[float, float]:
    """(warm, cold) share of agents 2..N's shared-prefix tokens read from the cache; runs are
    told apart by their prefix, rounds alternate warm then cold."""
    order: list[str] = []
    by_run: dict[str, list[tuple[str, int, int]]] = {}
    for key, agent, tokens, read in stats.prefix_reads:
        if key not in by_run:
            order.append(key)
            by_run[key] = []
        by_run[key].append((agent, tokens, read))
    sums = [[0, 0], [0, 0]]  # [warm, cold] x [read, tokens]
    for i, key in enumerate(order[: 2 * label_runs]):
        requests = by_run[key]
        writer = requests[0][0]
        side = sums[i % 2]
        for agent, tokens, read in requests:
            if agent != writer:
                side[0] += read
                side[1] += tokens
    return tuple(s[0] / s[1] if s[1] else 0.0 for s in sums)  # type: ignore[return-value]


def _input_cost(tokens: TokenUsage) -> float:
    total = tokens.input + tokens.cache_write + tokens.cache_read
    if not total:
        return 0.0
    writes_5m = tokens.cache_write - tokens.cache_write_1h
    cost = tokens.input + 1.25 * writes_5m + 2.0 * tokens.cache_write_1h + 0.1 * tokens.cache_read
    return cost / total


def run(quick: bool) -> dict[str, float | int]:
    agents, rounds = (2, 2) if quick else (8, 4)
    with (
        scratch("bench-cache-") as tmp,
        fake_in_process(latency_s=LATENCY_S) as fake,
    ):
        warm, cold = anyio.run(_measure, fake.base_url, Path(tmp), agents, rounds)
    stats = fake.stats
    share_warm, share_cold = _share_of_others(stats, rounds)
    tokens = sum((r.tokens for r in warm), TokenUsage())
    cold_tokens = sum((r.tokens for r in cold), TokenUsage())
    first_bytes = [r.first_byte_s for r in warm if r.first_byte_s is not None]
    first_byte = statistics.median(first_bytes) if first_bytes else 0.0
    delay = statistics.median(r.makespan_s for r in warm) - statistics.median(
        r.makespan_s for r in cold
    )
    errors = [abs(r.estimate - r.spent) / r.spent for r in warm if r.spent]
    failed = sum(r.failed for r in warm + cold)
    note = f"{agents} agents x 3 turns, {rounds} rounds" + (" (quick)" if quick else "")
    figures: dict[str, float | int] = {
        "cache_read_share": round(share_warm, 4),
        "cache_read_share_without_warmup": round(share_cold, 4),
        "input_cost_over_uncached": round(_input_cost(tokens), 4),
        "input_cost_over_uncached_without_warmup": round(_input_cost(cold_tokens), 4),
        "warmup_delay_over_first_byte": round(max(delay, 0.0) / first_byte, 3)
        if first_byte
        else 0.0,
        "estimate_error": round(max(errors[1:]), 4) if len(errors) > 1 else 0.0,
        "estimate_error_first_run": round(errors[0], 4) if errors else 0.0,
        "cache_failed": failed,
    }
    table(
        [
            (
                "cache_read_share",
                figures["cache_read_share"],
                f"{note}; agents 2..N's prefix tokens read from the cache; target >= 0.9",
            ),
            (
                "  without the warm-up",
                figures["cache_read_share_without_warmup"],
                "every agent's first request left together",
            ),
            (
                "input_cost_over_uncached",
                figures["input_cost_over_uncached"],
                "target <= 0.35",
            ),
            (
                "  without the warm-up",
                figures["input_cost_over_uncached_without_warmup"],
                "",
            ),
            (
                "warmup_delay_over_first_byte",
                figures["warmup_delay_over_first_byte"],
                f"makespan median {delay * 1000:+.0f} ms with the warm-up; first byte "
                f"{first_byte * 1000:.0f} ms; target <= 1.2",
            ),
            (
                "estimate_error",
                figures["estimate_error"],
                "rounds after the first, calibrated by the earlier runs; target <= 0.25 ("
                + ", ".join(f"{r.estimate}/{r.spent}" for r in warm)
                + " estimated/spent)",
            ),
            (
                "estimate_error_first_run",
                figures["estimate_error_first_run"],
                "the first round, on the defaults (no earlier run to measure)",
            ),
            ("cache_failed", failed, "agents not succeeded"),
            (
                "tokens input / write / read",
                f"{tokens.input}/{tokens.cache_write}/{tokens.cache_read}",
                f"with the warm-up, from get_status ({stats.requests} requests in all)",
            ),
            (
                "shared prefix (estimate)",
                warm[0].prefix_tokens,
                "tokens per request, spawn's estimate",
            ),
        ]
    )
    return figures
