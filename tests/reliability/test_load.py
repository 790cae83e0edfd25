"""Load: many agents on the fake API, and lease operations at a rate from several processes.

Agents: two runs of 64 at concurrency 32 (full profile; a run holds at most 64 tasks) through the
real anthropic client and fakeapi, all merged; CI runs two of 16 at 8. After a warm-up run (so
lazily opened files do not count), the process's file descriptors, its child processes and the
agents' worktrees are counted before and after: nothing may be left.

Leases: 4 processes doing ~250 operations a second each (acquire, check, renew, release) for a
minute (full) or 3 s (CI) on overlapping resources; an O_EXCL owner file per granted resource
catches a double grant; no operation may fail; each process's descriptors are counted too.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import pytest

from fakeapi import FakeAnthropic, by_key, writes_file
from orchestration.config import Settings
from orchestration.contracts import MergeRequest, SpawnRequest, StatusResult, TaskSpec
from orchestration.model import Model
from orchestration.orchestrator import Orchestrator
from orchestration.providers.anthropic import AnthropicModel
from tests.orchestration.scripts import git, make_repo
from tests.reliability.conftest import FULL, Ledger
from tests.reliability.procs import Child, integrity
from tests.reliability.server_proc import LeaseLoadConfig, LeaseLoadReport

G_AGENTS = "G8a load: 128 agents (2 × 64 at concurrency 32) succeed and merge"
G_LEAK = "G8b load: no leak (fds, child processes, worktrees)"
G_LEASES = "G8c load: lease operations from 4 processes, no error, no double grant"

RUNS, PER_RUN, CONCURRENCY = (2, 64, 32) if FULL else (2, 16, 8)
LEASE_SECONDS = 60.0 if FULL else 3.0
LEASE_RATE = 250.0  # per process; 4 processes


def _fd_targets() -> list[str]:
    targets: list[str] = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return sorted(targets)


def _children() -> list[int]:
    pid = os.getpid()
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(c) for c in text]
    return found


async def _settle(orch: Orchestrator, run_id: str) -> StatusResult:
    cursor: int | None = None
    with anyio.fail_after(600):
        while True:
            status = await orch.status(run_id=run_id, since=cursor, wait_s=2)
            cursor = status.cursor
            if not any(a.status.active for a in status.runs[0].agents):
                return status


async def _round(
    orch: Orchestrator, label: str, runs: int, per_run: int, ledger: Ledger | None
) -> None:
    for r in range(runs):
        keys = [f"{label}r{r}a{i:02d}" for i in range(per_run)]
        started = time.monotonic()
        spawned = await orch.spawn(
            SpawnRequest(
                tasks=[
                    TaskSpec(prompt=f"<<{k}>> write", name=k, write_scope=[f"load/{k}"])
                    for k in keys
                ]
            )
        )
        status = await _settle(orch, spawned.run_id)
        merged = await orch.merge(MergeRequest(run_id=spawned.run_id))
        seconds = time.monotonic() - started
        if ledger is None:
            continue
        statuses = sorted({a.status.value for a in status.runs[0].agents})
        outcomes = sorted({m.outcome.value for m in merged.agents})
        reasons = sorted({str(a.status_reason) for a in status.runs[0].agents if a.status_reason})
        ok = statuses == ["succeeded"] and outcomes == ["merged"] and len(merged.agents) == per_run
        ledger.record(
            G_AGENTS,
            f"run {r + 1}: {per_run} agents at {CONCURRENCY} in {seconds:.1f} s",
            ok,
            f"statuses {statuses}, merges {outcomes}, reasons {reasons[:3]}",
        )


def _minus(after: list[str], before: list[str]) -> list[str]:
    left = list(after)
    for target in before:
        if target in left:
            left.remove(target)
    return left


@pytest.mark.anyio
async def test_many_agents_leave_nothing_behind(tmp_path: Path, ledger: Ledger) -> None:
    repo = make_repo(tmp_path / "repo")
    keys = [f"wr0a{i:02d}" for i in range(2)]
    keys += [f"mr{r}a{i:02d}" for r in range(RUNS) for i in range(PER_RUN)]
    handler = by_key({f"<<{k}>>": writes_file(f"load/{k}/f.txt", f"{k}\n") for k in keys})
    settings = Settings.model_validate(
        {"repo": repo, "sandbox": "none", "max_concurrency": CONCURRENCY, "model_timeout_s": 30}
    )
    async with FakeAnthropic(handler).serve() as fake:

        def factory(name: str) -> Model:
            return AnthropicModel(
                model=name, base_url=fake.base_url, api_key="sk-fake", timeout_s=30
            )

        outside = _fd_targets()
        async with Orchestrator(settings, factory) as orch:
            await _round(orch, "w", 1, 2, None)  # warm-up: lazily opened files, a connection
            children, inside = _children(), _fd_targets()
            await _round(orch, "m", RUNS, PER_RUN, ledger)
            children_after, inside_after = _children(), _fd_targets()
    after = _fd_targets()  # the fake stopped too: its ends of the connections are closed
    # while the server runs: the model client's keep-alive pool may grow (sockets); nothing else
    grown = [t for t in _minus(inside_after, inside) if not t.startswith("socket:")]
    ledger.record(G_LEAK, "file descriptors while serving (sockets aside)", not grown, f"{grown}")
    # once the orchestrator is closed: nothing but its lease store, whose leak is pinned by
    # test_orchestrator_closes_its_lease_store
    left = [t for t in _minus(after, outside) if not Path(t).name.startswith("leases.")]
    ledger.record(G_LEAK, "file descriptors after close", not left, f"{left}")
    ledger.record(
        G_LEAK, "child processes", children_after == children, f"{children} → {children_after}"
    )
    worktrees = [line for line in git(repo, "worktree", "list").splitlines() if "fanout" in line]
    dirs = sorted(p.name for p in (repo / ".git/fanout/worktrees").glob("*/*"))
    ledger.record(
        G_LEAK, "worktrees removed after merge", not worktrees and not dirs, f"{dirs[:5]}"
    )
    files = git(repo, "ls-tree", "-r", "--name-only", "HEAD", "load").split()
    ledger.record(
        G_AGENTS,
        "every agent's file at the head",
        len(files) == RUNS * PER_RUN + 2,
        f"{len(files)} files",
    )
    failures = [*ledger.failures(G_AGENTS), *ledger.failures(G_LEAK)]
    assert not failures, "\n".join(failures)


@pytest.mark.anyio
async def test_orchestrator_closes_its_lease_store(tmp_path: Path, ledger: Ledger) -> None:
    repo = make_repo(tmp_path / "repo")
    settings = Settings.model_validate({"repo": repo, "sandbox": "none"})
    before = _fd_targets()
    async with Orchestrator(settings) as orch:
        await orch.status()
    left = _minus(_fd_targets(), before)
    ledger.record(G_LEAK, "Orchestrator closed: its descriptors closed", not left, f"{left}")
    assert not left, left


def test_lease_operations_from_four_processes(tmp_path: Path, ledger: Ledger) -> None:
    state_dir = tmp_path / "state"
    markers = tmp_path / "markers"
    children = [
        Child(
            "leases",
            LeaseLoadConfig(
                state_dir=str(state_dir),
                markers=str(markers),
                name=f"p{i}",
                seconds=LEASE_SECONDS,
                rate=LEASE_RATE,
                seed=i,
            ),
            tmp_path / "logs",
        )
        for i in range(4)
    ]
    reports: list[LeaseLoadReport] = []
    for child in children:
        assert child.wait(LEASE_SECONDS + 120) == 0, child.stderr()
        reports.append(LeaseLoadReport.model_validate_json(child.stdout()))
    ops = sum(r.ops for r in reports)
    seconds = max(r.seconds for r in reports)
    rate = ops / seconds
    for r in reports:
        ledger.record(G_LEASES, f"{r.name}: {r.ops} ops, no error", not r.errors, f"{r.errors[:3]}")
        ledger.record(
            G_LEASES, f"{r.name}: no double grant", not r.double_grants, f"{r.double_grants[:3]}"
        )
        ledger.record(
            G_LEAK,
            f"lease process {r.name}: file descriptors",
            r.fds_after <= r.fds_before,
            f"{r.fds_before} → {r.fds_after}",
        )
    ledger.record(
        G_LEASES,
        f"{rate:.0f} ops/s over {seconds:.1f} s ({sum(r.grants for r in reports)} grants, "
        f"{sum(r.blocked for r in reports)} refused as held)",
        rate >= 0.9 * 4 * LEASE_RATE,
        f"only {rate:.0f} ops/s",
    )
    verdict = integrity(state_dir / "leases.db")
    ledger.record(G_LEASES, "leases.db integrity after", verdict == "ok", verdict)
    failures = [*ledger.failures(G_LEASES)]
    assert not failures, "\n".join(failures)
