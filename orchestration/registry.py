"""The agents this process runs, or whose leases it keeps: their runtimes, fences and signals."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import anyio

from orchestration import workspace as ws_mod
from orchestration.agent import AgentLoop, Progress
from orchestration.context import RepoContext
from orchestration.state import AgentRecord
from toolbus.audit import AuditLog
from toolbus.errors import LeaseError, LeaseLost
from toolbus.external import ExternalSession, ExternalTool
from toolbus.leases import LeaseGrant, LeaseManager, LeaseMode
from toolbus.permissions import GuardedScope

log = logging.getLogger("fanout.orchestrator")


class LeaseFence:
    """The bus's fence for one agent: its current grant, checked against the lease store.

    Thread-safe: the store's check is one SELECT under its own lock, and the grant is read once
    per check; so a file write checks it from its worker thread."""

    thread_safe = True

    def __init__(self, leases: LeaseManager, holder: str) -> None:
        self._leases = leases
        self._holder = holder
        self.grant: LeaseGrant | None = None

    @property
    def token(self) -> int | None:
        return None if self.grant is None else self.grant.token

    def check(self, path: str | None) -> None:
        grant = self.grant
        if grant is None:
            if path is None:
                return  # a read-only agent may run commands; their changes are dropped
            raise LeaseLost(f"no write lease is held for {path!r}")
        self._leases.check(self._holder, grant.token, path, LeaseMode.WRITE)


@dataclass
class CommitAhead:
    """An agent's commit made while its model call was in flight, all but its message
    (`AgentRunner.commit_ahead`)."""

    records: int  # how many audit records the agent's bus had made then
    scope: GuardedScope
    prepared: ws_mod.PreparedCommit


@dataclass
class AgentRuntime:
    """What this process knows of an agent it runs, or whose leases it keeps (a dead server's
    finished agent), beyond the durable record."""

    agent_id: str
    runs_here: bool = False  # a task of this process runs the agent (not only keeps its leases)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    cancel_reason: str | None = None
    lost_lease: bool = False  # cancelled because its write lease was lost (it then fails)
    released: anyio.Event = field(default_factory=anyio.Event)
    fence: LeaseFence | None = None
    loop: AgentLoop | None = None
    audit: AuditLog | None = None
    # the turns and tokens of an agent whose loop runs elsewhere, as its worker reported them
    remote_progress: Progress = field(default_factory=Progress)
    started_at: float = 0.0
    resource_grant: LeaseGrant | None = None  # the named resources it holds for its life
    external: ExternalSession | None = None  # its own connections to downstream MCP servers
    external_tools: tuple[ExternalTool, ...] = ()
    ahead: CommitAhead | None = None

    def drop_ahead(self) -> None:
        """Close the commit made ahead, if any (its handle is open until then)."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None:
            ahead.prepared.close()

    def cancel(self, reason: str | None = None) -> None:
        """Stop the agent's task; `reason` becomes its result's error."""
        if reason is not None:
            self.cancel_reason = reason
        self.scope.cancel()


class AgentRegistry:
    """The runtimes of this process, by agent id."""

    def __init__(self) -> None:
        self._runtimes: dict[str, AgentRuntime] = {}

    def run_here(self, agent_id: str) -> AgentRuntime:
        """Register an agent that a task of this process is about to run."""
        runtime = AgentRuntime(agent_id=agent_id, runs_here=True)
        self._runtimes[agent_id] = runtime
        return runtime

    def keep(self, agent_id: str, fence: LeaseFence) -> AgentRuntime:
        """Register a finished agent whose leases this process keeps (taken over)."""
        runtime = AgentRuntime(agent_id=agent_id, fence=fence)
        self._runtimes[agent_id] = runtime
        return runtime

    def get(self, agent_id: str) -> AgentRuntime | None:
        return self._runtimes.get(agent_id)

    def __contains__(self, agent_id: str) -> bool:
        return agent_id in self._runtimes

    def running_here(self, agent_id: str) -> AgentRuntime | None:
        """The runtime of an agent a task of this process runs, if any."""
        runtime = self._runtimes.get(agent_id)
        return runtime if runtime is not None and runtime.runs_here else None

    def signal_released(self, agent_id: str) -> None:
        """Wake the agents waiting for this one's scope (it was merged, discarded or freed)."""
        runtime = self._runtimes.get(agent_id)
        if runtime is not None:
            runtime.released.set()

    async def release_leases(self, ctx: RepoContext, agent: AgentRecord) -> None:
        """Give back the agent's write leases: the grant this process keeps, and whatever else
        its holder still holds (a grant another server took for it), so that a merge or a
        discard leaves no lease behind, whoever kept it."""
        runtime = self._runtimes.get(agent.agent_id)
        holder = agent.lease_holder or agent.agent_id
        if runtime is not None and runtime.fence is not None and runtime.fence.grant is not None:
            grant = runtime.fence.grant
            ctx.keeper.untrack(grant)
            runtime.fence.grant = None
            try:
                await ctx.leases.release(grant)
            except LeaseError as exc:
                log.info("release of %s's leases: %s", agent.agent_id, exc)
        held = [lease for lease in await ctx.leases.table() if lease.holder == holder]
        if held:
            await ctx.leases.break_holder(holder, immediate=True)
