"""One repository as this process uses it (its state, leases and workspaces), and the look-ups
of its runs and agents that every part of the engine shares."""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from orchestration import workspace as ws_mod
from orchestration.caching import PrefixWarmup
from orchestration.errors import AgentNotFound, RunNotFound
from orchestration.state import AgentRecord, RunRecord, StateStore
from toolbus.leases import LeaseKeeper, LeaseManager
from toolbus.shared_reads import SharedReadLeases


class SlowTurns:
    """One turn at a time per key: a lock for each key that someone holds or waits for, let go
    of once nobody does (the keys are commits, so they would otherwise pile up)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[anyio.Lock, int]] = {}

    def waiting(self) -> int:
        """How many keys someone holds or waits for."""
        return len(self._locks)

    def busy(self, key: str) -> bool:
        """Whether someone holds or waits for the turn of `key`."""
        return key in self._locks

    @asynccontextmanager
    async def of(self, key: str) -> AsyncGenerator[None]:
        lock, users = self._locks.get(key) or (anyio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


@dataclass
class RepoContext:
    """One repository's state, leases and workspaces as this process uses them."""

    repo: ws_mod.GitRepo
    store: StateStore
    leases: LeaseManager
    keeper: LeaseKeeper
    limiters: dict[str, anyio.CapacityLimiter] = field(
        default_factory=dict[str, anyio.CapacityLimiter]
    )
    prefixes: dict[str, str] = field(default_factory=dict[str, str])
    # the kind of workspace each run of this process gives its agents, decided at its spawn
    workspace_kinds: dict[str, str] = field(default_factory=dict[str, str])
    # runs of this process whose first request writes the shared prefix alone
    warmups: dict[str, PrefixWarmup] = field(default_factory=dict[str, PrefixWarmup])
    prefix_lock: anyio.Lock = field(default_factory=anyio.Lock)
    # Worker threads making worktrees (mostly waiting for the registration lock or a checkout
    # slot) get their own pool, so that they never hold up other work sent to threads.
    workspace_threads: anyio.CapacityLimiter = field(
        default_factory=lambda: anyio.CapacityLimiter((os.cpu_count() or 1) + 2)
    )
    # views that cannot be made on the event loop (their base is being checked out) are made
    # one at a time per start commit (`runner.quick_or_thread`)
    workspace_turns: SlowTurns = field(default_factory=SlowTurns)
    # held while the agents of dead servers are taken over (on opening, and by the heartbeat)
    recovering: anyio.Lock = field(default_factory=anyio.Lock)
    # this process's read leases on downstream MCP connections, shared by its read-only calls
    shared_reads: SharedReadLeases | None = None


def transcript_path(ctx: RepoContext, agent_id: str) -> Path:
    """Where the agent's transcript (its conversation, JSON lines) is kept."""
    return ctx.repo.state_dir / "transcripts" / f"{agent_id}.jsonl"


def find_run(ctx: RepoContext, run_id: str) -> RunRecord:
    """The run, or `RunNotFound` saying where to find the runs."""
    run = ctx.store.run(run_id)
    if run is None:
        raise RunNotFound(f"no run {run_id!r} in {ctx.repo.root}; get_status lists the runs")
    return run


def find_agent(ctx: RepoContext, agent_id: str) -> AgentRecord:
    """The agent, or `AgentNotFound` saying where to find the agents."""
    agent = ctx.store.agent(agent_id)
    if agent is None:
        raise AgentNotFound(
            f"no agent {agent_id!r} in {ctx.repo.root}; get_status lists the agents"
        )
    return agent
