"""Fan-out makespan: N agents x 3 turns against the fake Messages API at 200 ms per request, on a
small repository, concurrency N, through the real `anthropic` client (`AnthropicModel`).

Figures: `makespan_over_ideal_16`, `makespan_over_ideal_64` — the makespan (from just before
`spawn`, the repository already open as in a running server, until `get_status` long-polling
sees every agent final) over the ideal 3 x 200 ms. Targets: <= 1.2 and <= 1.5.

Beside them, the floor of this machine: `sdk_floor_over_ideal_N` replays the very requests the
agents sent (recorded in an untimed run) through the same SDK client and transport, N tasks of
three calls each, against the same fake — the model calls alone, without tools, worktrees,
commits or state — on the product's schedule: when the product warmed the prompt cache up
(`orchestration.caching`: a run's first request goes alone, the others once its response has
begun, so that the shared prefix is written once), the floor's first requests wait the same way.
`overhead_over_floor_N` is the product's makespan over that floor.
`sdk_floor_all_at_once_over_ideal_N` is the floor without the warm-up, every agent's first
request at once: the difference is the warm-up's price in time (`FANOUT_CACHE_WARMUP_MAX_S=0`
starts agents together, and every one of them then pays the prefix's cache write). Below it,
`transport_floor_over_ideal_N` sends the same request bodies through a bare aiohttp session per
agent (no SDK): what the fake API and the loopback transport cost on their own, which no client
can beat on this machine; `fake_cpu_ms_per_request_N` is the fake's own CPU time per request
during the product's rounds (Linux), spent on the same cores as the product. Floors and product
alternate, three times each, and the best of each is reported.

The SDK floor leaves out work the product's agents cannot do without: each mounts a view, records
its lease and state transitions in SQLite and its turns in a transcript, writes its file durably
(`fsync`), reads it back and commits it. `work_floor_over_ideal_N` is the SDK floor with each
agent doing that work as well, as leanly as Python allows (`benchmarks.work_floor`: plain rows,
libgit2 trees, no bus, no schemas), at the same points of its conversation, its start overlapping
its first request; `work_floor_over_floor_N` is what that work adds to the SDK floor,
`overhead_over_work_floor_N` the product's makespan over it, and
`work_floor_cpu_ms_per_agent_N` its CPU time per agent. `inodes_per_agent_N` and
`work_floor_inodes_per_agent_N` count the files and directories each made per agent, net, from
the filesystem's free inodes: exact where time is noisy, and each costs CPU to allocate. On an
ext4 without a journal (this machine's), an inode freed in the last minute or more is skipped
and read at every allocation, so after many deletions (a test suite's, a benchmark's scratch)
a file takes up to a millisecond of CPU to make: `scratch_file_create_ms` shows the state.
Where the work floor's figures exceed the targets of `overhead_over_floor_N` and
`cpu_ms_per_agent_64`, those targets are out of this machine's reach for the same work; the
product's distance to this floor is what is left to gain.

`worktree_overhead_over_floor_N` and `worktree_cpu_ms_per_agent_N` are the same figures for
one run with the worktree fallback (`FANOUT_WORKSPACES=worktree`), whose agents each get a full
checkout of the (small) repository.

`cpu_ms_per_agent_N` is the CPU time the product spent per agent (this process's threads and its
git children), beside `sdk_floor_cpu_ms_per_agent_N` for the SDK alone: on a machine of two
cores, where the fake API takes its share too, the makespan of 64 agents is bound by CPU, and
CPU time does not depend on how long a task waited for a core.

The fake runs in a child process so that its event loop does not share this process's GIL with
the orchestrator (on a 2-core machine it still shares the cores). `--quick`: 4 and 8 agents,
one round, reported under the same keys (noted as quick in the table).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import anyio

from benchmarks.common import (
    anthropic_factory,
    bench_settings,
    build_repo,
    drive,
    fake_in_process,
    orchestrator,
    process_cpu_s,
    scratch,
    self_cpu_s,
    table,
    tasks,
)
from benchmarks.work_floor import LeanAgent, LeanRun
from orchestration.contracts import SpawnRequest
from orchestration.heap import freeze_heap
from orchestration.model import Model, ModelRequest, ModelResponse
from orchestration.orchestrator import ModelFactory
from orchestration.providers.anthropic import AnthropicModel, to_api_request
from orchestration.workspace import overlay

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


def _free_inodes(path: Path) -> int:
    """The free inodes of the filesystem holding `path`: what a run takes of them is the
    files and directories it left (net of those it removed), counted exactly, unlike time."""
    return os.statvfs(path).f_ffree


@dataclass
class _Run:
    """One product run."""

    makespan_s: float
    failed: int
    spawn_s: float
    cpu_s: float  # this process's CPU time from spawn until the run was seen final
    warmed_up: bool  # the run's first request went alone (`orchestration.caching`)
    inodes: int  # files and directories made meanwhile, net of those removed


async def _product(
    base_url: str, agents: int, repo: Path, factory: ModelFactory | None = None
) -> _Run:
    """One run of `agents` in a fresh repository."""
    build_repo(repo, SMALL_REPO_FILES)
    made = factory or anthropic_factory(base_url)
    async with orchestrator(bench_settings(repo, agents), made) as orch:
        await orch.status()  # the repository is open (state, leases) as in a running server
        cpu, free = self_cpu_s(), _free_inodes(repo)
        timing = await drive(orch, [SpawnRequest(tasks=tasks(agents), max_concurrency=agents)])
        cpu, inodes = self_cpu_s() - cpu, free - _free_inodes(repo)
        runs = (await orch.status()).runs
    warmed = any(r.prompt_cache is not None and r.prompt_cache.first_byte_s for r in runs)
    return _Run(timing.makespan_s, timing.failed, timing.spawn_s, cpu, warmed, inodes)


def _by_agent(recorded: list[ModelRequest], agents: int) -> list[list[ModelRequest]]:
    """The recorded requests, per agent, in the order each agent sent them."""
    by_agent: dict[str, list[ModelRequest]] = {}
    for request in recorded:
        by_agent.setdefault(request.system_task, []).append(request)
    if len(by_agent) != agents or any(len(r) != TURNS for r in by_agent.values()):
        raise RuntimeError(
            f"the recorded run sent {len(recorded)} requests for {len(by_agent)} agents; "
            f"expected {TURNS} for each of {agents}"
        )
    return list(by_agent.values())


async def _first_answer(
    model: AnthropicModel,
    request: ModelRequest,
    n: int,
    *,
    warm_up: bool,
    begun: anyio.Event,
) -> ModelResponse:
    """Agent `n`'s first call on the floors' schedule: with `warm_up`, as the product warms the
    prompt cache up, the first agent's alone (streamed, `begun` set once its response begins)
    and the others' once it has begun; without, at once."""
    if warm_up and n == 0:
        return await model.complete_signalled(request, begun.set)
    if warm_up:
        await begun.wait()
    return await model.complete(request)


async def _floor(
    base_url: str, recorded: list[ModelRequest], agents: int, *, warm_up: bool = False
) -> tuple[float, float]:
    """The recorded requests replayed through the SDK: one task per agent, its calls in order,
    all at once; with `warm_up`, as the product schedules them when it warms the prompt cache
    up: the first agent's first request alone, the others' first once its response has begun
    (streamed, as the product's). (elapsed_s, cpu_s)."""
    by_agent = _by_agent(recorded, agents)
    models = [
        AnthropicModel(model=r[0].model, api_key="bench", base_url=base_url) for r in by_agent
    ]
    begun = anyio.Event()

    async def one(n: int, model: AnthropicModel, requests: list[ModelRequest]) -> None:
        await _first_answer(model, requests[0], n, warm_up=warm_up, begun=begun)
        for request in requests[1:]:
            await model.complete(request)

    started, cpu = time.perf_counter(), self_cpu_s()
    async with anyio.create_task_group() as tg:
        for n, (model, requests) in enumerate(zip(models, by_agent, strict=True)):
            tg.start_soon(one, n, model, requests)
    elapsed, cpu = time.perf_counter() - started, self_cpu_s() - cpu
    for model in models:
        await model.aclose()
    return elapsed, cpu


async def _work_floor(
    base_url: str,
    recorded: list[ModelRequest],
    agents: int,
    repository: Path,
    root: Path,
    *,
    warm_up: bool,
) -> tuple[float, float, int]:
    """`_floor` on the product's warm-up schedule, each agent doing the durable work the
    product's agents do (`benchmarks.work_floor`) where they must: its start (once the run's
    base checkout and databases, made in a worker thread, are ready) while its first request is
    under way, as that request needs no workspace; a transcript line and a state row per
    answer; its write after the first answer (in a worker thread, as `fsync` must not block the
    loop); its read after the second; its commit after the last. (elapsed_s, cpu_s, the files
    and directories made, see `_free_inodes`)."""
    by_agent = _by_agent(recorded, agents)
    models = [
        AnthropicModel(model=r[0].model, api_key="bench", base_url=base_url) for r in by_agent
    ]
    begun = anyio.Event()
    opened = anyio.Event()
    run: list[LeanRun] = []

    async def open_run() -> None:
        run.append(await anyio.to_thread.run_sync(LeanRun.open, repository, root))
        opened.set()

    async def one(n: int, model: AnthropicModel, requests: list[ModelRequest]) -> None:
        ready: list[LeanAgent] = []

        async def start() -> None:
            await opened.wait()
            ready.append(run[0].start(n))

        answers: list[ModelResponse] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(start)
            answers.append(await _first_answer(model, requests[0], n, warm_up=warm_up, begun=begun))
        agent = ready[0]  # (the task group waited for `start`)
        for k, request in enumerate(requests):
            answer = answers[0] if k == 0 else await model.complete(request)
            agent.turn(answer.model_dump_json())
            if k == 0:
                await agent.write(b"floor %d\n" % n)
            elif k == 1:
                agent.read()
        agent.finish()

    started, cpu, free = time.perf_counter(), self_cpu_s(), _free_inodes(repository)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(open_run)
            for n, (model, requests) in enumerate(zip(models, by_agent, strict=True)):
                tg.start_soon(one, n, model, requests)
        elapsed, cpu = time.perf_counter() - started, self_cpu_s() - cpu
        inodes = free - _free_inodes(repository)
    finally:
        for each in run:
            each.close()
    for model in models:
        await model.aclose()
    return elapsed, cpu, inodes


async def _transport_floor(base_url: str, recorded: list[ModelRequest], agents: int) -> float:
    """The recorded requests' bodies POSTed by a bare aiohttp session per agent (no SDK: no
    request building, validation or response models), each answer read and parsed; elapsed_s."""
    by_agent = _by_agent(recorded, agents)
    headers = {
        "x-api-key": "bench",
        "anthropic-version": "2023-06-01",
        "content-type": "application/json",
    }
    sessions = [aiohttp.ClientSession() for _ in by_agent]

    async def one(session: aiohttp.ClientSession, requests: list[ModelRequest]) -> None:
        for request in requests:
            system, tools, messages = to_api_request(request)
            body = {
                "model": request.model,
                "max_tokens": request.max_tokens,
                "system": system,
                "tools": tools,
                "messages": messages,
            }
            url = f"{base_url}/v1/messages"
            async with session.post(url, data=json.dumps(body), headers=headers) as answer:
                if answer.status != 200:
                    raise RuntimeError(f"the fake answered {answer.status}: {await answer.text()}")
                json.loads(await answer.read())

    started = time.perf_counter()
    try:
        async with anyio.create_task_group() as tg:
            for session, requests in zip(sessions, by_agent, strict=True):
                tg.start_soon(one, session, requests)
        return time.perf_counter() - started
    finally:
        for session in sessions:
            await session.close()


@dataclass
class _Size:
    """One size's best figures over the rounds."""

    makespan_s: float
    floor_s: float  # the SDK floor on the product's schedule (with its warm-up, if it had one)
    plain_floor_s: float  # the SDK floor with every agent's first request at once
    warmed_up: bool
    failed: int
    spawn_s: float
    cpu_s: float
    floor_cpu_s: float
    transport_s: float
    work_floor_s: float  # the SDK floor with the durable work (`_work_floor`)
    work_floor_cpu_s: float
    inodes: int  # the product's files and directories made per run (`_free_inodes`), least
    work_floor_inodes: int
    fake_cpu_s_per_request: float
    worktree: _Run  # one run with the worktree fallback (FANOUT_WORKSPACES=worktree)


async def _measure(
    sizes: tuple[int, int], base_url: str, root: Path, rounds: int, fake_pid: int | None
) -> list[_Size]:
    """Per size: the best product makespan (and its spawn_s), the best of each floor, the failed
    agents of all rounds, the least CPU time of the product and of the SDK floor, and the fake's
    CPU time per request over the product's rounds."""
    await _product(base_url, 2, root / "warm-up")  # imports, SDK client, pydantic schemas: once
    freeze_heap()  # as `fanout-mcp` does once it has started (orchestration.heap)
    out: list[_Size] = []
    for n in sizes:
        recorded: list[ModelRequest] = []
        await _product(base_url, n, root / f"record-{n}", _recording(base_url, recorded))
        products: list[_Run] = []
        floors: list[tuple[float, float]] = []
        warm_floors: list[tuple[float, float]] = []
        transports: list[float] = []
        work_floors: list[tuple[float, float, int]] = []
        fake_cpu = 0.0
        for r in range(rounds):
            floors.append(await _floor(base_url, recorded, n))
            warm_floors.append(await _floor(base_url, recorded, n, warm_up=True))
            transports.append(await _transport_floor(base_url, recorded, n))
            before = process_cpu_s(fake_pid) if fake_pid else 0.0
            products.append(await _product(base_url, n, root / f"repo-{n}-{r}"))
            fake_cpu += (process_cpu_s(fake_pid) - before) if fake_pid else 0.0
            floor_repo = root / f"floor-repo-{n}-{r}"
            build_repo(floor_repo, SMALL_REPO_FILES)
            work_floors.append(
                await _work_floor(
                    base_url,
                    recorded,
                    n,
                    floor_repo,
                    root / f"floor-{n}-{r}",
                    warm_up=products[-1].warmed_up,
                )
            )
        os.environ["FANOUT_WORKSPACES"] = "worktree"
        try:
            worktree = await _product(base_url, n, root / f"worktree-{n}")
        finally:
            os.environ.pop("FANOUT_WORKSPACES", None)
        best = min(products, key=lambda p: p.makespan_s)
        warmed = all(p.warmed_up for p in products)
        if any(p.warmed_up for p in products) and not warmed:
            raise RuntimeError("the product warmed the prompt cache up in some rounds only")
        same = warm_floors if warmed else floors
        out.append(
            _Size(
                makespan_s=best.makespan_s,
                floor_s=min(f[0] for f in same),
                plain_floor_s=min(f[0] for f in floors),
                warmed_up=warmed,
                failed=sum(p.failed for p in products),
                spawn_s=best.spawn_s,
                cpu_s=min(p.cpu_s for p in products),
                floor_cpu_s=min(f[1] for f in same),
                transport_s=min(transports),
                work_floor_s=min(f[0] for f in work_floors),
                work_floor_cpu_s=min(f[1] for f in work_floors),
                inodes=min(p.inodes for p in products),
                work_floor_inodes=min(f[2] for f in work_floors),
                fake_cpu_s_per_request=fake_cpu / (rounds * n * TURNS),
                worktree=worktree,
            )
        )
    return out


def run(quick: bool) -> dict[str, float | int]:
    sizes = (4, 8) if quick else (16, 64)
    rounds = 1 if quick else 3
    started = time.perf_counter()
    with scratch("bench-fanout-") as tmp, fake_in_process(latency_s=LATENCY_S) as fake:
        results = anyio.run(_measure, sizes, fake.base_url, Path(tmp), rounds, fake.pid)
    figures: dict[str, float | int] = {}
    rows: list[tuple[str, float | int, str]] = []
    note = " (quick)" if quick else ""
    for key, n, size in zip(("16", "64"), sizes, results, strict=True):
        makespan, floor = size.makespan_s, size.floor_s
        ratio = round(makespan / IDEAL_S, 3)
        figures[f"makespan_over_ideal_{key}"] = ratio
        figures[f"sdk_floor_over_ideal_{key}"] = round(floor / IDEAL_S, 3)
        figures[f"sdk_floor_all_at_once_over_ideal_{key}"] = round(size.plain_floor_s / IDEAL_S, 3)
        figures[f"overhead_over_floor_{key}"] = round(makespan / floor, 3)
        figures[f"fanout_failed_{key}"] = size.failed
        figures[f"cpu_ms_per_agent_{key}"] = round(size.cpu_s / n * 1000, 2)
        figures[f"sdk_floor_cpu_ms_per_agent_{key}"] = round(size.floor_cpu_s / n * 1000, 2)
        figures[f"transport_floor_over_ideal_{key}"] = round(size.transport_s / IDEAL_S, 3)
        figures[f"fake_cpu_ms_per_request_{key}"] = round(size.fake_cpu_s_per_request * 1000, 2)
        figures[f"work_floor_over_ideal_{key}"] = round(size.work_floor_s / IDEAL_S, 3)
        figures[f"work_floor_over_floor_{key}"] = round(size.work_floor_s / floor, 3)
        figures[f"overhead_over_work_floor_{key}"] = round(makespan / size.work_floor_s, 3)
        figures[f"work_floor_cpu_ms_per_agent_{key}"] = round(size.work_floor_cpu_s / n * 1000, 2)
        figures[f"inodes_per_agent_{key}"] = round(size.inodes / n, 1)
        figures[f"work_floor_inodes_per_agent_{key}"] = round(size.work_floor_inodes / n, 1)
        figures[f"worktree_overhead_over_floor_{key}"] = round(size.worktree.makespan_s / floor, 3)
        figures[f"worktree_cpu_ms_per_agent_{key}"] = round(size.worktree.cpu_s / n * 1000, 2)
        figures[f"worktree_fanout_failed_{key}"] = size.worktree.failed
        target = "1.2" if key == "16" else "1.5"
        rows += [
            (
                f"makespan_over_ideal_{key}",
                ratio,
                f"{n} agents{note}: makespan {makespan:.3f} s / ideal {IDEAL_S:.1f} s "
                f"(spawn() returned after {size.spawn_s:.3f} s); target <= {target}",
            ),
            (
                f"sdk_floor_over_ideal_{key}",
                figures[f"sdk_floor_over_ideal_{key}"],
                f"the same {n * TURNS} requests through the SDK alone: {floor:.3f} s"
                + (
                    ", the first alone until its response began, as the product warmed the "
                    "prompt cache up"
                    if size.warmed_up
                    else ""
                ),
            ),
            (
                f"sdk_floor_all_at_once_over_ideal_{key}",
                figures[f"sdk_floor_all_at_once_over_ideal_{key}"],
                f"the same, every agent's first request at once (no warm-up): "
                f"{size.plain_floor_s:.3f} s",
            ),
            (
                f"transport_floor_over_ideal_{key}",
                figures[f"transport_floor_over_ideal_{key}"],
                f"the same {n * TURNS} request bodies, bare aiohttp, no SDK: "
                f"{size.transport_s:.3f} s",
            ),
            (
                f"fake_cpu_ms_per_request_{key}",
                figures[f"fake_cpu_ms_per_request_{key}"],
                "the fake API's own CPU per request (its process, same cores), product rounds",
            ),
            (
                f"overhead_over_floor_{key}",
                figures[f"overhead_over_floor_{key}"],
                "product makespan / SDK floor (tools, workspaces, commits, state); target <= "
                + ("1.05" if key == "16" else "1.15"),
            ),
            (
                f"work_floor_over_ideal_{key}",
                figures[f"work_floor_over_ideal_{key}"],
                f"the SDK floor, each agent also doing its durable work at the product's points "
                f"(view, state rows, transcript, fsync'd write, read, commit; "
                f"benchmarks.work_floor), as leanly as possible: {size.work_floor_s:.3f} s"
                + ("" if overlay.in_private_mounts() else ", views not mounted here"),
            ),
            (
                f"work_floor_over_floor_{key}",
                figures[f"work_floor_over_floor_{key}"],
                "that floor / the SDK floor: what a lean implementation of the same work adds "
                "to the model calls here (compare overhead_over_floor)",
            ),
            (
                f"overhead_over_work_floor_{key}",
                figures[f"overhead_over_work_floor_{key}"],
                "product makespan / that floor",
            ),
            (
                f"cpu_ms_per_agent_{key}",
                figures[f"cpu_ms_per_agent_{key}"],
                "CPU time of the product per agent (this process, all threads, and git), least "
                "of the rounds" + ("; target <= 8" if key == "64" else ""),
            ),
            (
                f"sdk_floor_cpu_ms_per_agent_{key}",
                figures[f"sdk_floor_cpu_ms_per_agent_{key}"],
                f"the same for the SDK alone ({TURNS} requests per agent)",
            ),
            (
                f"work_floor_cpu_ms_per_agent_{key}",
                figures[f"work_floor_cpu_ms_per_agent_{key}"],
                "the same for the SDK with the durable work (work_floor above)",
            ),
            (
                f"inodes_per_agent_{key}",
                figures[f"inodes_per_agent_{key}"],
                "files and directories the product made per agent (net, from the filesystem's "
                "free inodes), least of the rounds: each costs CPU to allocate, see "
                "scratch_file_create_ms",
            ),
            (
                f"work_floor_inodes_per_agent_{key}",
                figures[f"work_floor_inodes_per_agent_{key}"],
                "the same for the work floor",
            ),
            (
                f"worktree_overhead_over_floor_{key}",
                figures[f"worktree_overhead_over_floor_{key}"],
                "the same with the worktree fallback (FANOUT_WORKSPACES=worktree), one round",
            ),
            (
                f"worktree_cpu_ms_per_agent_{key}",
                figures[f"worktree_cpu_ms_per_agent_{key}"],
                "the worktree fallback's CPU time per agent, that round",
            ),
            (
                f"worktree_fanout_failed_{key}",
                size.worktree.failed,
                "the worktree fallback: not succeeded",
            ),
            (f"fanout_failed_{key}", size.failed, f"{n} agents{note}: not succeeded, all rounds"),
        ]
    table(rows)
    print(
        f"(best of {rounds} round(s) each; fake requests: {fake.stats.requests}, "
        f"errors: {fake.stats.errors}; total {time.perf_counter() - started:.1f} s)"
    )
    return figures
