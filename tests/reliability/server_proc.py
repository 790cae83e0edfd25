"""A server process for the crash and two-server tests: an `Orchestrator` on a repository with a
scripted model, driven by a JSON config and observed through marker files.

    python -m tests.reliability.server_proc crash   CONFIG_JSON   # runs to a point, then waits
    python -m tests.reliability.server_proc recover CONFIG_JSON   # reopens, recovers, reports
    python -m tests.reliability.server_proc worker  CONFIG_JSON   # one of two servers on a repo
    python -m tests.reliability.server_proc leases  CONFIG_JSON   # lease operations at a rate

A marker is a file in `markers/`, written atomically (write, then rename); the test waits for
markers, then kills the process (SIGKILL to its process group) at the point it chose.

Test-only timing: the server heartbeat (`orchestration.orchestrator.SERVER_HEARTBEAT_S`, 5 s) and
the staleness after which a server counts as dead (`orchestration.state.SERVER_STALE_S`, 20 s)
are module constants; this script sets them from the config (e.g. 0.2 s and 0.8 s) so a crash
test need not wait 20 s. The ratio is kept (stale > 3 heartbeats).
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal

import anyio
from pydantic import BaseModel, Field, JsonValue

from orchestration.clock import Timing as EngineTiming
from orchestration.config import Settings
from orchestration.contracts import (
    AgentStatus,
    MergeOutcome,
    MergeRequest,
    SpawnRequest,
    StatusResult,
    TaskSpec,
)
from orchestration.model import ModelRequest, ModelResponse, TextBlock, ToolUseBlock, Usage
from orchestration.orchestrator import Orchestrator
from orchestration.providers.function import FunctionModel
from orchestration.workspace.overlay import enter_private_mounts

Scenario = Literal["after_spawn", "mid_turn", "mid_write", "mid_merge", "mid_verify"]
KEY = re.compile(r"<<([A-Za-z0-9_-]+)>>")


class Timing(BaseModel):
    """Lease and liveness timing of a test server (small, so tests wait little)."""

    lease_ttl_s: float = 1.0
    lease_lock_delay_s: float = 0.3
    heartbeat_s: float = 0.2
    stale_s: float = 0.8


class CrashConfig(BaseModel):
    repo: str
    markers: str
    scenario: Scenario
    agents: int = 4
    quick_agents: int = 2
    write_bytes: int = 4_000_000
    timing: Timing = Field(default_factory=Timing)
    workspaces: str = ""
    """`worktree` forces git worktrees; empty: copy-on-write views where they can be made."""


class RecoverConfig(BaseModel):
    repo: str
    timing: Timing = Field(default_factory=Timing)
    reruns: int = 1


class AgentFact(BaseModel):
    agent_id: str
    run_id: str
    name: str
    status: str
    commit: str | None
    branch: str | None
    lease_lost: bool
    status_reason: str | None


class MergeFact(BaseModel):
    agent_id: str
    outcome: str
    commit: str | None
    reason: str | None


class RecoverReport(BaseModel):
    recovered: list[AgentFact]
    merges: list[MergeFact]
    reruns: list[AgentFact]
    rerun_merges: list[MergeFact]
    fresh: list[AgentFact]
    fresh_merges: list[MergeFact]
    head: str
    leases_left: list[str]
    seconds: float


class WorkerConfig(BaseModel):
    repo: str
    markers: str
    name: str
    rounds: int = 3
    timing: Timing = Field(default_factory=Timing)
    critical_log: str


class WorkerReport(BaseModel):
    name: str
    agents: list[AgentFact]
    merges: list[MergeFact]
    seconds: float


class LeaseLoadConfig(BaseModel):
    state_dir: str
    markers: str
    name: str
    seconds: float
    rate: float
    resources: int = 24
    seed: int = 0


class LeaseLoadReport(BaseModel):
    name: str
    ops: int
    grants: int
    blocked: int
    errors: list[str]
    double_grants: list[str]
    fds_before: int
    fds_after: int
    seconds: float


# --- helpers ---------------------------------------------------------------------------------


def mark(markers: str | Path, name: str, data: str = "") -> None:
    """Write marker `name` atomically."""
    directory = Path(markers)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{name}.{os.getpid()}.tmp"
    tmp.write_text(data)
    tmp.rename(directory / name)


def engine_timing(timing: Timing) -> EngineTiming:
    """A fast server heartbeat and staleness for a test server (see the module docstring)."""
    return EngineTiming(server_heartbeat_s=timing.heartbeat_s, server_stale_s=timing.stale_s)


def settings_for(repo: str, timing: Timing, **extra: object) -> Settings:
    values: dict[str, object] = {
        "repo": repo,
        "sandbox": "none",
        "lease_ttl_s": timing.lease_ttl_s,
        "lease_lock_delay_s": timing.lease_lock_delay_s,
        "max_concurrency": 16,
    }
    values.update(extra)
    return Settings.model_validate(values)


def task_key(request: ModelRequest) -> str:
    found = KEY.search(request.system_task)
    return found.group(1) if found else ""


def scope_of(request: ModelRequest) -> str:
    """The scope a task names as `[[scope]]` in its prompt."""
    return request.system_task.split("[[", 1)[1].split("]]", 1)[0]


def turn_of(request: ModelRequest) -> int:
    return sum(1 for m in request.messages if m.role == "assistant")


def call(name: str, arguments: dict[str, JsonValue], turn: int) -> ModelResponse:
    return ModelResponse(
        content=[ToolUseBlock(id=f"toolu_{turn}_{name}", name=name, input=arguments)],
        stop_reason="tool_use",
        usage=Usage(input_tokens=100, output_tokens=20),
        model="scripted",
    )


def finish(key: str, turn: int) -> ModelResponse:
    return call("finish", {"summary": f"{key} done"}, turn)


def text(body: str) -> ModelResponse:
    return ModelResponse(
        content=[TextBlock(text=body)],
        stop_reason="end_turn",
        usage=Usage(input_tokens=100, output_tokens=20),
        model="scripted",
    )


def fact(view: object) -> AgentFact:
    from orchestration.contracts import AgentView

    assert isinstance(view, AgentView)
    commit = view.result.commit if view.result is not None else None
    return AgentFact(
        agent_id=view.agent_id,
        run_id=view.run_id,
        name=view.name,
        status=view.status.value,
        commit=commit,
        branch=view.branch,
        lease_lost=view.lease_lost,
        status_reason=view.status_reason,
    )


def all_facts(status: StatusResult) -> list[AgentFact]:
    return [fact(a) for run in status.runs for a in run.agents]


async def wait_until(
    orch: Orchestrator, done: Callable[[StatusResult], bool], timeout_s: float = 120.0
) -> StatusResult:
    cursor: int | None = None
    with anyio.fail_after(timeout_s):
        while True:
            status = await orch.status(since=cursor, wait_s=1.0)
            cursor = status.cursor
            if done(status):
                return status


def none_active(run_ids: set[str] | None = None) -> Callable[[StatusResult], bool]:
    def done(status: StatusResult) -> bool:
        return not any(
            a.status.active
            for run in status.runs
            if run_ids is None or run.run_id in run_ids
            for a in run.agents
        )

    return done


async def merge_all(orch: Orchestrator, run_id: str) -> list[MergeFact]:
    merged = await orch.merge(MergeRequest(run_id=run_id))
    return [
        MergeFact(agent_id=r.agent_id, outcome=r.outcome.value, commit=r.commit, reason=r.reason)
        for r in merged.agents
    ]


# --- crash -----------------------------------------------------------------------------------


async def crash(config: CrashConfig) -> None:
    """Run agents to the scenario's point, mark it, and wait to be killed."""
    markers = config.markers
    quick = config.quick_agents
    big = "x" * (config.write_bytes - 1) + "\n"

    async def reply(request: ModelRequest) -> ModelResponse:
        key = task_key(request)
        index = int(key[1:]) if key[1:].isdigit() else 0
        turn = turn_of(request)
        if config.scenario == "after_spawn":
            await anyio.sleep(0.2)
        if turn == 0:
            return call("write_file", {"path": f"{key}/a.txt", "content": f"{key} work\n"}, 0)
        if turn == 1:
            mark(markers, f"wrote-{key}")
            if index <= quick or config.scenario in ("after_spawn", "mid_merge", "mid_verify"):
                return finish(key, turn)
            if config.scenario == "mid_turn":
                mark(markers, f"blocked-{key}")
                await anyio.sleep_forever()
            # mid_write: a large write, killed while the bus writes it
            mark(markers, f"writing-{key}")
            return call("write_file", {"path": f"{key}/big.txt", "content": big}, 1)
        if turn == 2:
            mark(markers, f"wrote-big-{key}")
        return finish(key, turn)

    model = FunctionModel(reply)
    settings = settings_for(config.repo, config.timing)
    async with Orchestrator(
        settings, lambda _name: model, timing=engine_timing(config.timing)
    ) as orch:
        tasks = [
            TaskSpec(
                prompt=f"<<w{i:02d}>> write a file", name=f"w{i:02d}", write_scope=[f"w{i:02d}"]
            )
            for i in range(1, config.agents + 1)
        ]
        spawned = await orch.spawn(SpawnRequest(tasks=tasks))
        mark(
            markers,
            "spawned",
            json.dumps({"run_id": spawned.run_id, "agents": [a.agent_id for a in spawned.agents]}),
        )
        if config.scenario == "mid_merge":
            await wait_until(orch, none_active())
            mark(markers, "merging")
            count = 0

            def progress(done: int, total: int, message: str) -> None:
                nonlocal count
                count = done
                mark(markers, f"merged-{done}", message)

            await orch.merge(MergeRequest(run_id=spawned.run_id), on_progress=progress)
            mark(markers, "merge-done", str(count))
        elif config.scenario == "mid_verify":
            await wait_until(orch, none_active())
            # the command says it started, then takes its time: the kill lands inside it
            started = Path(markers) / "verifying"
            command = f"touch {shlex.quote(str(started))} && sleep 20"
            await orch.merge(MergeRequest(run_id=spawned.run_id, verify_command=command))
            mark(markers, "merge-done")
        elif config.scenario in ("mid_turn", "mid_write"):
            status = await wait_until(
                orch,
                lambda s: all(
                    a.status == AgentStatus.SUCCEEDED
                    for a in s.runs[0].agents
                    if int(a.name[1:]) <= quick
                ),
            )
            mark(markers, "quick-done", json.dumps([f.model_dump() for f in all_facts(status)]))
        await anyio.sleep_forever()


# --- recover ---------------------------------------------------------------------------------


async def recover(config: RecoverConfig) -> RecoverReport:
    """Reopen the repository after a crash: recover, merge, rerun, and run something new."""
    started = time.monotonic()

    async def reply(request: ModelRequest) -> ModelResponse:
        key = task_key(request)
        turn = turn_of(request)
        if turn == 0 and key.startswith("fresh"):
            scope = scope_of(request)
            return call("write_file", {"path": f"{scope}/{key}.txt", "content": f"{key}\n"}, 0)
        if turn == 0:
            return call("list_files", {}, 0)
        return finish(key, turn)

    model = FunctionModel(reply)
    settings = settings_for(config.repo, config.timing)
    async with Orchestrator(
        settings, lambda _name: model, timing=engine_timing(config.timing)
    ) as orch:
        status = await orch.status()
        recovered = all_facts(status)
        merges: list[MergeFact] = []
        for run in status.runs:
            merges.extend(await merge_all(orch, run.run_id))
        rerun_ids: list[str] = []
        for agent in recovered:
            if agent.status == AgentStatus.INTERRUPTED.value and len(rerun_ids) < config.reruns:
                rerun_ids.append((await orch.rerun(agent.agent_id)).agent.agent_id)
        rerun_merges: list[MergeFact] = []
        reruns: list[AgentFact] = []
        if rerun_ids:
            runs = {a.run_id for a in recovered}
            after = await wait_until(orch, none_active(runs))
            reruns = [a for a in all_facts(after) if a.agent_id in rerun_ids]
            for run_id in sorted({a.run_id for a in reruns}):
                rerun_merges.extend(
                    m for m in await merge_all(orch, run_id) if m.agent_id in rerun_ids
                )
        # something new: a fresh scope, and the scope of an agent of the dead server that was
        # merged just now (its lease must not linger)
        merged_ids = {m.agent_id for m in merges if m.outcome == MergeOutcome.MERGED.value}
        reused = [a.name for a in recovered if a.agent_id in merged_ids][:1]
        tasks = [TaskSpec(prompt="<<fresh1>> new work [[fresh/one]]", write_scope=["fresh/one"])]
        tasks += [TaskSpec(prompt=f"<<fresh2>> new work [[{s}]]", write_scope=[s]) for s in reused]
        spawned = await orch.spawn(SpawnRequest(tasks=tasks))
        done = await wait_until(orch, none_active({spawned.run_id}), timeout_s=60)
        fresh = [a for a in all_facts(done) if a.run_id == spawned.run_id]
        fresh_merges = await merge_all(orch, spawned.run_id)
        ctx = await orch.context(config.repo)
        head = await anyio.to_thread.run_sync(ctx.repo.head_commit)
        leases_left = [f"{lease.holder}:{lease.resource}" for lease in await ctx.leases.table()]
    return RecoverReport(
        recovered=recovered,
        merges=merges,
        reruns=reruns,
        rerun_merges=rerun_merges,
        fresh=fresh,
        fresh_merges=fresh_merges,
        head=head,
        leases_left=leases_left,
        seconds=round(time.monotonic() - started, 3),
    )


# --- worker (two servers on one repository) ----------------------------------------------------


def append_line(path: str, line: str) -> None:
    """One O_APPEND write: lines from several processes never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


async def worker(config: WorkerConfig) -> WorkerReport:
    """Rounds of runs with overlapping (`shared`, `shared/sub`) and disjoint scopes; merge as
    agents finish. Each agent logs when its critical section (holding its write lease) starts
    and ends, with the system-wide monotonic clock."""
    started = time.monotonic()
    name = config.name
    rng = random.Random(name)

    async def reply(request: ModelRequest) -> ModelResponse:
        key = task_key(request)
        turn = turn_of(request)
        scope = scope_of(request)
        if turn == 0:
            append_line(config.critical_log, f"enter {key} {scope} {time.monotonic():.6f}")
            path = f"{scope}/{key}.txt" if scope else f"{key}.txt"
            await anyio.sleep(rng.uniform(0.0, 0.05))
            return call("write_file", {"path": path, "content": f"{key}\n"}, 0)
        if turn == 1:
            await anyio.sleep(rng.uniform(0.0, 0.05))
            append_line(config.critical_log, f"exit {key} {scope} {time.monotonic():.6f}")
        return finish(key, turn)

    model = FunctionModel(reply)
    settings = settings_for(config.repo, config.timing)
    facts: list[AgentFact] = []
    merges: list[MergeFact] = []
    async with Orchestrator(
        settings, lambda _name: model, timing=engine_timing(config.timing)
    ) as orch:
        mark(config.markers, f"ready-{name}")
        for r in range(config.rounds):
            scopes = ["shared", "shared/sub", f"own-{name}", f"own-{name}/r{r}", "common/x"]
            tasks = [
                TaskSpec(
                    prompt=f"<<{name}r{r}t{i}>> scope [[{scope}]]",
                    name=f"t{i}",
                    write_scope=[scope],
                )
                for i, scope in enumerate(scopes)
            ]
            spawned = await orch.spawn(SpawnRequest(tasks=tasks))

            cursor: int | None = None
            try:
                with anyio.fail_after(240):
                    while True:
                        status = await orch.status(run_id=spawned.run_id, since=cursor, wait_s=1.0)
                        cursor = status.cursor
                        agents = status.runs[0].agents
                        if any(a.status == AgentStatus.SUCCEEDED for a in agents):
                            merges += await merge_all(orch, spawned.run_id)
                        elif not any(a.status.active for a in agents):
                            break
            except TimeoutError:
                raise RuntimeError(
                    f"{name}: round {r} did not settle in 240 s\n" + await stuck_report(orch)
                ) from None
            facts += all_facts(await orch.status(run_id=spawned.run_id))
    return WorkerReport(
        name=name,
        agents=facts,
        merges=merges,
        seconds=round(time.monotonic() - started, 3),
    )


async def stuck_report(orch: Orchestrator) -> str:
    """Every agent of the repository's store (status, owner, lease token, reason) and the lease
    table: what a round that never settled was waiting for."""
    ctx = await orch.context(None)
    lines = [
        f"agent {a.agent_id} {a.status.value} owner={a.owner} token={a.lease_token} "
        f"lost={a.lease_lost} reason={a.status_reason}"
        for a in ctx.store.all_agents()
    ]
    lines += [
        f"lease {lease.resource} {lease.mode} holder={lease.holder} token={lease.token}"
        for lease in await ctx.leases.table()
    ]
    lines += [f"waiter {w}" for w in await ctx.leases.waiters()]
    return "\n".join(lines)


# --- lease load ------------------------------------------------------------------------------


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def lease_load(config: LeaseLoadConfig) -> LeaseLoadReport:
    """Lease operations at `rate` per second for `seconds`: acquire (non-blocking) a random set,
    check it, renew it, release it. Exclusion is checked with O_EXCL owner files: a process that
    holds a write lease on `r` creates `owners/r`; finding it there means a double grant."""
    from toolbus.errors import LeaseError
    from toolbus.leases import LeaseMode, LeaseRequest, LeaseStore

    rng = random.Random(config.seed)
    owners = Path(config.markers) / "owners"
    owners.mkdir(parents=True, exist_ok=True)
    fds_before = fd_count()
    store = LeaseStore(config.state_dir, ttl_s=5.0, lock_delay_s=0.0)
    names = [f"d{i % 4}/r{i}" for i in range(config.resources)]
    errors: list[str] = []
    doubles: list[str] = []
    ops = grants = blocked = 0
    interval = 1.0 / config.rate
    mark(config.markers, f"ready-{config.name}")
    start = time.monotonic()
    next_at = start
    holder = f"{config.name}-{os.getpid()}"
    while time.monotonic() - start < config.seconds:
        now = time.monotonic()
        if now < next_at:
            time.sleep(next_at - now)
        next_at += interval * 4  # a granted cycle is four operations, a refused one is one
        picked = sorted(set(rng.sample(names, rng.randint(1, 3))))
        if rng.random() < 0.1:
            picked = [f"d{rng.randint(0, 3)}"]  # an ancestor: conflicts with its whole directory
        try:
            grant = store.try_acquire(holder, [LeaseRequest.write(p) for p in picked])
            ops += 1
            if grant is None:
                blocked += 1
                next_at -= interval * 3
                continue
            grants += 1
            created: list[Path] = []
            for p in picked:
                marker = owners / p.replace("/", "__")
                try:
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                    os.close(fd)
                    created.append(marker)
                except FileExistsError:
                    doubles.append(f"{holder} was granted {p} while {marker.name} existed")
            store.check(holder, grant.token, picked[0] if picked[0] else None, LeaseMode.WRITE)
            grant = store.renew(grant)
            ops += 2
            for marker in created:
                marker.unlink()
            store.release(grant)
            ops += 1
        except LeaseError as exc:
            errors.append(f"{type(exc).__name__}: {exc}"[:300])
        except Exception as exc:  # any error counts against the store
            errors.append(f"{type(exc).__name__}: {exc}"[:300])
    elapsed = time.monotonic() - start
    store.close()
    return LeaseLoadReport(
        name=config.name,
        ops=ops,
        grants=grants,
        blocked=blocked,
        errors=errors[:50],
        double_grants=doubles[:50],
        fds_before=fds_before,
        fds_after=fd_count(),
        seconds=round(elapsed, 3),
    )


def _run_async(fn: Callable[[], Awaitable[BaseModel | None]]) -> BaseModel | None:
    return anyio.run(fn)


def main(argv: list[str]) -> int:
    mode, raw = argv[1], argv[2]
    layout = json.loads(raw).get("workspaces", "") if raw.startswith("{") else ""
    if layout:
        os.environ["FANOUT_WORKSPACES"] = layout
    enter_private_mounts()  # as the server does: agents' workspaces are views where it can
    report: BaseModel | None
    if mode == "crash":
        crash_config = CrashConfig.model_validate_json(raw)
        report = _run_async(lambda: crash(crash_config))
    elif mode == "recover":
        recover_config = RecoverConfig.model_validate_json(raw)
        report = _run_async(lambda: recover(recover_config))
    elif mode == "worker":
        worker_config = WorkerConfig.model_validate_json(raw)
        report = _run_async(lambda: worker(worker_config))
    elif mode == "leases":
        report = lease_load(LeaseLoadConfig.model_validate_json(raw))
    else:
        print(f"unknown mode {mode!r}", file=sys.stderr)
        return 2
    if report is not None:
        sys.stdout.write(report.model_dump_json() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
