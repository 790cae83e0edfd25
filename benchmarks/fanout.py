"""Fan-out makespan: N agents x 3 turns against the fake Messages API at 200 ms per request, on a
small repository, concurrency N, through the real `anthropic` client (`AnthropicModel`).

Figures: `makespan_over_ideal_16`, `makespan_over_ideal_64` — the makespan (from just before
`spawn`, the repository already open as in a running server, until `get_status` long-polling
sees every agent final) over the ideal 3 x 200 ms. Targets: <= 1.2 and <= 1.5.

Beside them, the floor of this machine: `sdk_floor_over_ideal_N` replays the very requests the
agents sent (recorded in an untimed run) through the same SDK client and transport, N tasks of
three calls each, against the same fake — the model calls alone, without tools, worktrees,
commits or state. `overhead_over_floor_N` is the product's makespan over that floor. Floor and
product alternate, twice each, and the best of each is reported.

The fake runs in a child process so that its event loop does not share this process's GIL with
the orchestrator (on a 2-core machine it still shares the cores). `--quick`: 4 and 8 agents,
one round, reported under the same keys (noted as quick in the table).
"""

from __future__ import annotations

import time
from collections.abc import Callable
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
from orchestration.contracts import SpawnRequest
from orchestration.heap import freeze_heap
from orchestration.model import Model, ModelRequest, ModelResponse
from orchestration.orchestrator import ModelFactory
from orchestration.providers.anthropic import AnthropicModel

LATENCY_S = 0.2
TURNS = 3
IDEAL_S = TURNS * LATENCY_S
SMALL_REPO_FILES = 50


class _Recording:
    """A `Model` that passes every call on and keeps the requests, per agent, in order."""

    def __init__(self, inner: Model, into: list[ModelRequest]) -> None:
        self._inner = inner
        self._into = into

    @property
    def name(self) -> str:
        return self._inner.name

    async def complete(self, request: ModelRequest) -> ModelResponse:
        self._into.append(request)
        return await self._inner.complete(request)

    async def aclose(self) -> None:
        close: Callable[[], object] | None = getattr(self._inner, "aclose", None)
        if close is not None:
            await close()  # pyright: ignore[reportGeneralTypeIssues]


def _recording(base_url: str, into: list[ModelRequest]) -> ModelFactory:
    real = anthropic_factory(base_url)

    def make(name: str) -> Model:
        return _Recording(real(name), into)

    return make


async def _product(
    base_url: str, agents: int, repo: Path, factory: ModelFactory | None = None
) -> tuple[float, int, float]:
    """(makespan_s, failed agents, spawn_s) of one run of `agents` in a fresh repository."""
    build_repo(repo, SMALL_REPO_FILES)
    made = factory or anthropic_factory(base_url)
    async with orchestrator(bench_settings(repo, agents), made) as orch:
        await orch.status()  # the repository is open (state, leases) as in a running server
        timing = await drive(orch, [SpawnRequest(tasks=tasks(agents), max_concurrency=agents)])
    return timing.makespan_s, timing.failed, timing.spawn_s


async def _floor(base_url: str, recorded: list[ModelRequest], agents: int) -> float:
    """The recorded requests replayed: one task per agent, its calls in order, all at once."""
    by_agent: dict[str, list[ModelRequest]] = {}
    for request in recorded:
        by_agent.setdefault(request.system_task, []).append(request)
    if len(by_agent) != agents or any(len(r) != TURNS for r in by_agent.values()):
        raise RuntimeError(
            f"the recorded run sent {len(recorded)} requests for {len(by_agent)} agents; "
            f"expected {TURNS} for each of {agents}"
        )
    models = [
        AnthropicModel(model=r[0].model, api_key="bench", base_url=base_url)
        for r in by_agent.values()
    ]

    async def one(model: AnthropicModel, requests: list[ModelRequest]) -> None:
        for request in requests:
            await model.complete(request)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for model, requests in zip(models, by_agent.values(), strict=True):
            tg.start_soon(one, model, requests)
    elapsed = time.perf_counter() - started
    for model in models:
        await model.aclose()
    return elapsed


async def _measure(
    sizes: tuple[int, int], base_url: str, root: Path, rounds: int
) -> list[tuple[float, float, int, float]]:
    """Per size: (best product makespan, best floor, failed agents, spawn_s of the best run)."""
    await _product(base_url, 2, root / "warm-up")  # imports, SDK client, pydantic schemas: once
    freeze_heap()  # as `fanout-mcp` does once it has started (orchestration.heap)
    out: list[tuple[float, float, int, float]] = []
    for n in sizes:
        recorded: list[ModelRequest] = []
        await _product(base_url, n, root / f"record-{n}", _recording(base_url, recorded))
        products: list[tuple[float, int, float]] = []
        floors: list[float] = []
        for r in range(rounds):
            floors.append(await _floor(base_url, recorded, n))
            products.append(await _product(base_url, n, root / f"repo-{n}-{r}"))
        best = min(products)
        out.append((best[0], min(floors), sum(p[1] for p in products), best[2]))
    return out


def run(quick: bool) -> dict[str, float | int]:
    sizes = (4, 8) if quick else (16, 64)
    rounds = 1 if quick else 2
    started = time.perf_counter()
    with scratch("bench-fanout-") as tmp, fake_in_process(latency_s=LATENCY_S) as fake:
        results = anyio.run(_measure, sizes, fake.base_url, Path(tmp), rounds)
    figures: dict[str, float | int] = {}
    rows: list[tuple[str, float | int, str]] = []
    note = " (quick)" if quick else ""
    for key, n, (makespan, floor, failed, spawn_s) in zip(
        ("16", "64"), sizes, results, strict=True
    ):
        ratio = round(makespan / IDEAL_S, 3)
        figures[f"makespan_over_ideal_{key}"] = ratio
        figures[f"sdk_floor_over_ideal_{key}"] = round(floor / IDEAL_S, 3)
        figures[f"overhead_over_floor_{key}"] = round(makespan / floor, 3)
        figures[f"fanout_failed_{key}"] = failed
        target = "1.2" if key == "16" else "1.5"
        rows += [
            (
                f"makespan_over_ideal_{key}",
                ratio,
                f"{n} agents{note}: makespan {makespan:.3f} s / ideal {IDEAL_S:.1f} s "
                f"(spawn() returned after {spawn_s:.3f} s); target <= {target}",
            ),
            (
                f"sdk_floor_over_ideal_{key}",
                figures[f"sdk_floor_over_ideal_{key}"],
                f"the same {n * TURNS} requests through the SDK alone: {floor:.3f} s",
            ),
            (
                f"overhead_over_floor_{key}",
                figures[f"overhead_over_floor_{key}"],
                "product makespan / SDK floor (tools, worktrees, commits, state)",
            ),
            (f"fanout_failed_{key}", failed, f"{n} agents{note}: not succeeded, all rounds"),
        ]
    table(rows)
    print(
        f"(best of {rounds} round(s) each; fake requests: {fake.stats.requests}, "
        f"errors: {fake.stats.errors}; total {time.perf_counter() - started:.1f} s)"
    )
    return figures
