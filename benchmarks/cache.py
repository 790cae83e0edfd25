"""Prompt caching across a run: 8 agents (3 turns each) sharing a ~20k-token context (plan,
conventions, files), against the fake Messages API with its cache accounting.

Figures: `cache_read_share` = cache_read / (cache_read + cache_write + input) over every request
of the run (target >= 0.9), and `input_cost_over_uncached` = (input + 1.25 x cache_write +
0.1 x cache_read) / (the same tokens all billed as plain input) (target <= 0.35). Tokens are the
run's totals as `get_status` reports them (from the API's usage); the fake's own log is checked to
agree. `--quick`: 2 agents.
"""

from __future__ import annotations

from pathlib import Path

import anyio

from benchmarks.common import (
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

LATENCY_S = 0.05
SHARED_FILES = 4
CHARS_PER_TOKEN = 4


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


def _shared_context() -> SharedContextSpec:
    return SharedContextSpec(
        plan=_paragraphs("Step", 125),
        conventions=_paragraphs("Rule", 60),
        files=sorted(_shared_files()),
    )


async def _measure(base_url: str, root: Path, agents: int) -> tuple[TokenUsage, int, int]:
    repo = root / "repo"
    build_repo(repo, 50, extra=_shared_files())
    async with orchestrator(bench_settings(repo, agents), anthropic_factory(base_url)) as orch:
        timing = await drive(
            orch,
            [
                SpawnRequest(
                    tasks=tasks(agents), shared_context=_shared_context(), max_concurrency=agents
                )
            ],
        )
        status = await orch.status(run_id=timing.spawned[0].run_id)
        prefix_tokens = timing.spawned[0].estimate.shared_prefix_tokens
    return status.runs[0].totals.tokens, timing.failed, prefix_tokens


def run(quick: bool) -> dict[str, float | int]:
    agents = 2 if quick else 8
    with (
        scratch("bench-cache-") as tmp,
        fake_in_process(latency_s=LATENCY_S) as fake,
    ):
        tokens, failed, prefix_tokens = anyio.run(_measure, fake.base_url, Path(tmp), agents)
    stats = fake.stats
    total = tokens.input + tokens.cache_write + tokens.cache_read
    share = tokens.cache_read / total if total else 0.0
    cost = (
        (tokens.input + 1.25 * tokens.cache_write + 0.1 * tokens.cache_read) / total
        if total
        else 0.0
    )
    agrees = (stats.input_tokens, stats.cache_write_tokens, stats.cache_read_tokens) == (
        tokens.input,
        tokens.cache_write,
        tokens.cache_read,
    )
    note = f"{agents} agents x 3 turns" + (" (quick)" if quick else "")
    figures: dict[str, float | int] = {
        "cache_read_share": round(share, 4),
        "input_cost_over_uncached": round(cost, 4),
        "cache_failed": failed,
    }
    table(
        [
            ("cache_read_share", figures["cache_read_share"], f"{note}; target >= 0.9"),
            (
                "input_cost_over_uncached",
                figures["input_cost_over_uncached"],
                f"{note}; target <= 0.35",
            ),
            ("cache_failed", failed, "agents not succeeded"),
            (
                "tokens input / write / read",
                f"{tokens.input}/{tokens.cache_write}/{tokens.cache_read}",
                f"from get_status; the fake's log {'agrees' if agrees else 'DISAGREES'} "
                f"({stats.requests} requests)",
            ),
            (
                "shared prefix (estimate)",
                prefix_tokens,
                f"tokens per request (spawn's estimate); "
                f"about {total // max(stats.requests, 1)} input tokens per request measured",
            ),
        ]
    )
    return figures
