"""The orchestrator: spawns runs of subagents, reports their status, joins and reruns them.

One anyio task group owns every agent; each agent has its own cancel scope. Cancellation we ask
for becomes a `cancelled` agent; the server stopping under an agent makes it `interrupted`, with
its work committed on its branch.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import time
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TypeGuard

import anyio
import anyio.abc

from orchestration import workspace as ws_mod
from orchestration.agent import AgentLoop, Budget, LoopOutcome, Progress, Transcript
from orchestration.attention import WakeOn
from orchestration.config import Settings
from orchestration.contracts import (
    AgentBrief,
    AgentMergeResult,
    AgentResult,
    AgentStatus,
    AgentView,
    CancelResult,
    CommandRun,
    CostEstimate,
    DiffStat,
    FileChange,
    LeaseView,
    MergeOutcome,
    MergeRequest,
    MergeResult,
    RerunResult,
    RunTotals,
    RunView,
    SpawnRequest,
    SpawnResult,
    StatusResult,
    StopReason,
    TokenUsage,
)
from orchestration.errors import (
    AgentNotFound,
    ConfigError,
    InvalidRequest,
    InvalidState,
    OrchestrationError,
    RepositoryError,
    RunNotFound,
)
from orchestration.join import JoinCandidate, Joiner, JoinOutcome
from orchestration.model import Model
from orchestration.prompts import FINISH_TOOL, shared_prefix, task_prompt
from orchestration.retry import RetryPolicy
from orchestration.state import (
    AgentRecord,
    RunRecord,
    SharedFile,
    SharedSnapshot,
    StateStore,
)
from orchestration.wakeup import COALESCE_MAX_S, COALESCE_S, Wakeups
from toolbus.audit import AuditLog
from toolbus.bus import SUBAGENT_TOOL_SPECS, AgentBus
from toolbus.errors import LeaseError, LeaseLost
from toolbus.fileops import remove_partial_writes
from toolbus.leases import (
    Lease,
    LeaseGrant,
    LeaseKeeper,
    LeaseManager,
    LeaseMode,
    LeaseRequest,
    LeaseStore,
    conflicts,
)
from toolbus.resources import WriteScope
from toolbus.sandbox import probe_bwrap
from toolbus.terminal import SandboxMode, Terminal, TerminalConfig, describe_commands

log = logging.getLogger("fanout.orchestrator")

# Called once per model name and group of agents (see `Orchestrator._model`), not once per name.
ModelFactory = Callable[[str], Model]

MAX_SHARED_FILE_BYTES = 200_000
MAX_REJECTED_DIFF_CHARS = 30_000
SERVER_HEARTBEAT_S = 5.0
DISK_USAGE_CACHE_S = 10.0
ESTIMATED_TURNS = 8
ESTIMATED_GROWTH_PER_TURN = 1_500
ESTIMATED_OUTPUT_PER_TURN = 600
AGENTS_PER_MODEL = 16
# status answers kept per repository, one per question (run_id, agent_ids) asked
STATUS_ANSWERS_KEPT = 64
ACTIVE_STATUSES = tuple(s for s in AgentStatus if s.active)
# cancel_subagents waits this long for the agents to stop, then answers with where they are
CANCEL_WAIT_S = 30.0
# how often a server looks for cancel requests made from other servers (an indexed query)
CANCEL_POLL_S = 0.5
CANCEL_REQUESTED = "cancel_requested"  # the event of such a request


def default_model_factory(settings: Settings) -> ModelFactory:
    """Models from the Anthropic API (needs ANTHROPIC_API_KEY)."""

    def make(name: str) -> Model:
        from orchestration.providers.anthropic import AnthropicModel

        return AnthropicModel(
            model=name, timeout_s=settings.model_timeout_s, http_client=settings.http_client
        )

    return make


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
    started_at: float = 0.0


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
    # the agents' workspaces on disk, as status shows it: (when measured, bytes), None until
    # measured; the measurement under way, if any (one at a time serves every poll); and a
    # thread of their own, so that it never waits behind the agents' git work
    disk_usage: tuple[float, int] | None = None
    disk_measuring: anyio.Event | None = None
    disk_thread: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(1))
    prefixes: dict[str, str] = field(default_factory=dict[str, str])
    prefix_lock: anyio.Lock = field(default_factory=anyio.Lock)
    # Worker threads making worktrees (mostly waiting for the registration lock or a checkout
    # slot) get their own pool, so that they never hold up other work sent to threads.
    workspace_threads: anyio.CapacityLimiter = field(
        default_factory=lambda: anyio.CapacityLimiter((os.cpu_count() or 1) + 2)
    )
    # held while the agents of dead servers are taken over (on opening, and by the heartbeat)
    recovering: anyio.Lock = field(default_factory=anyio.Lock)


class Orchestrator:
    """Spawn, watch, cancel, merge and rerun subagents; one instance per server process."""

    def __init__(self, settings: Settings, model_factory: ModelFactory | None = None) -> None:
        self.settings = settings
        self._model_factory = model_factory or default_model_factory(settings)
        self._models: dict[tuple[str, int], Model] = {}
        self._model_locks: dict[tuple[str, int], anyio.Lock] = {}
        self._contexts: dict[Path, RepoContext] = {}
        self._discovered: dict[Path, ws_mod.GitRepo] = {}
        self._runtimes: dict[str, AgentRuntime] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._context_lock = anyio.Lock()
        self._closing = False

    # --- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Orchestrator:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self._closing = True
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        try:
            return await self._tg.__aexit__(exc_type, exc, tb)
        finally:
            for ctx in self._contexts.values():
                try:
                    ctx.store.unregister_server()
                finally:
                    ctx.store.close()
                    ctx.leases.store.close()
            for model in self._models.values():
                close = getattr(model, "aclose", None)
                if close is not None:
                    with anyio.CancelScope(shield=True):
                        await close()

    @property
    def task_group(self) -> anyio.abc.TaskGroup:
        if self._tg is None:
            raise RuntimeError("use the Orchestrator as an async context manager")
        return self._tg

    async def context(self, repo: Path | str | None) -> RepoContext:
        """The context of a repository, opened (and recovered) on first use."""
        path = repo if repo is not None else self.settings.repo
        if path is None:
            raise RepositoryError(
                "no repository given: pass `repo`, start the server with --repo, or set FANOUT_REPO"
            )
        where = Path(path)
        git_repo = self._discovered.get(where)
        if git_repo is None or not git_repo.root.is_dir():
            # (a status poll names the repository each time: one git process per poll otherwise)
            git_repo = await anyio.to_thread.run_sync(ws_mod.GitRepo.discover, where)
            self._discovered[where] = git_repo
        existing = self._contexts.get(git_repo.root)
        if existing is not None:  # the common case (every poll): no lock to take
            return existing
        async with self._context_lock:
            existing = self._contexts.get(git_repo.root)
            if existing is not None:
                return existing
            store = StateStore(git_repo.state_dir)
            lease_store = LeaseStore(
                git_repo.state_dir,
                ttl_s=self.settings.lease_ttl_s,
                lock_delay_s=self.settings.lease_lock_delay_s,
            )
            leases = LeaseManager(lease_store)
            keeper = LeaseKeeper(leases)
            ctx = RepoContext(repo=git_repo, store=store, leases=leases, keeper=keeper)
            store.register_server()
            await self.task_group.start(keeper.run)
            self.task_group.start_soon(self._server_heartbeat, ctx)
            self.task_group.start_soon(self._watch_cancel_requests, ctx)
            await self._recover(ctx)
            self._contexts[git_repo.root] = ctx
            return ctx

    async def _server_heartbeat(self, ctx: RepoContext) -> None:
        """Beat, and take over what a server that died since left: its agents would otherwise
        show `running` until another server opened the repository."""
        while True:
            await anyio.sleep(SERVER_HEARTBEAT_S)
            ctx.store.heartbeat()
            try:
                if ctx.store.orphaned(ctx.store.live_servers()):
                    await self._recover_agents(ctx)
            except Exception:  # the next beat tries again; the heartbeat itself must go on
                log.exception("recovery of the agents of a dead server failed")

    async def _recover(self, ctx: RepoContext) -> None:
        """On opening a repository: a dead server's agents, then a merge it left cut short."""
        await self._recover_agents(ctx)
        # a merge cut short by a crash: finish bringing the checkout forward, clear git locks
        note = await anyio.to_thread.run_sync(Joiner(ctx.repo).recover)
        if note:
            log.warning("recovery of %s: %s", ctx.repo.root, note)

    async def _recover_agents(self, ctx: RepoContext) -> None:
        """Mark the active agents of dead servers `interrupted`, committing what their worktrees
        hold, and keep the leases of their finished ones. Each agent is claimed first (this
        server becomes its owner), so two servers never recover the same agent."""
        async with ctx.recovering:
            await self._recover_agents_locked(ctx)

    async def _recover_agents_locked(self, ctx: RepoContext) -> None:
        me = ctx.store.server_id
        live = ctx.store.live_servers() | {me}
        touched_runs: set[str] = set()
        for found in ctx.store.all_agents():
            runtime = self._runtimes.get(found.agent_id)
            if not found.status.active or (runtime is not None and runtime.runs_here):
                continue  # finished, or running in this process
            if found.owner in live and found.owner != me:
                continue  # running in another live server
            # (owned by this server but not running here: claimed by a recovery that failed)
            agent = ctx.store.claim_agent(found.agent_id, found.owner, ACTIVE_STATUSES)
            if agent is None:
                continue  # another server recovered it first
            touched_runs.add(agent.run_id)
            await self._recover_one(ctx, agent)
        for run_id in touched_runs:
            if not any(a.status.active for a in ctx.store.agents(run_id)):
                ctx.store.reset_reservations(run_id)
        await self._adopt_leases(ctx, live)

    async def _recover_one(self, ctx: RepoContext, agent: AgentRecord) -> None:
        """An agent of a dead server, claimed: commit what its worktree holds and mark it
        `interrupted` with its result; if that work cannot be committed, mark it `interrupted`
        all the same, with the reason, rather than leave it `running`."""
        commit, changed_files, result = agent.commit, agent.changed_files, agent.result
        try:
            commit, changes = await self._commit_left_work(ctx, agent)
        except Exception as exc:
            log.exception("agent %s: recovery failed", agent.agent_id)
            reason = (
                f"the server running this agent stopped, and its work could not be committed "
                f"({exc}); its workspace is kept: rerun_subagent starts it again"
            )
        else:
            reason = (
                "the server running this agent stopped; rerun_subagent resumes it from its "
                "committed work"
            )
            changed_files = [c.path for c in changes]
            result = AgentResult(
                status=AgentStatus.INTERRUPTED,
                stop_reason=StopReason.INTERRUPTED,
                summary="",
                changed_files=changes,
                tokens=agent.tokens,
                turns=agent.turns,
                error=reason,
                commit=commit,
                branch=agent.branch,
            )
        ctx.store.update_agent(
            agent.agent_id,
            "interrupted",
            "the server running this agent stopped",
            status=AgentStatus.INTERRUPTED,
            stop_reason=StopReason.INTERRUPTED,
            status_reason=reason,
            commit=commit,
            changed_files=changed_files,
            result=result,
        )

    async def _commit_left_work(
        self, ctx: RepoContext, agent: AgentRecord
    ) -> tuple[str | None, list[FileChange]]:
        """Commit what a dead server's agent left in its worktree: (its commit, its changes)."""
        commit = agent.commit
        if agent.workspace and Path(agent.workspace).exists():
            # a write cut short leaves its temporary file; the file it replaced is intact
            await anyio.to_thread.run_sync(remove_partial_writes, Path(agent.workspace))
            # a commit cut short leaves git's lock files on the branch and worktree
            await anyio.to_thread.run_sync(
                ws_mod.clear_dead_locks, ctx.repo, Path(agent.workspace), agent.branch
            )
            work = await self._commit_work(ctx, agent, "work left by an interrupted agent")
            commit = work.commit or commit
        elif agent.workspace is None:
            # killed while its worktree was being made: nothing of it ran
            await anyio.to_thread.run_sync(
                ws_mod.discard_unstarted_workspace, ctx.repo, agent.run_id, agent.agent_id
            )
        changes: list[FileChange] = []
        if _has_work(commit, agent.base_commit):
            changes = await anyio.to_thread.run_sync(self._changes, ctx, agent.base_commit, commit)
        return commit, changes

    async def _adopt_leases(self, ctx: RepoContext, live: set[str]) -> None:
        """Keep the leases of finished, unmerged agents of dead servers alive from here.

        Only a dead server's agents are taken over (including those just marked interrupted
        here, which are this server's now): a live server keeps its own agents' leases
        (its keeper renews them and its merges release them), and a grant renewed from two
        processes would outlive the merge that gives it back. The agent is claimed first (this
        server becomes its owner, atomically), so two servers starting at once cannot both take
        it. A grant still live is renewed by this process's keeper from now on; one that lapsed
        is taken again (a new token) if nobody else holds its paths, else the agent is marked as
        having lost it, and merge_results skips it with the reason.
        """
        keep = (
            AgentStatus.SUCCEEDED,
            AgentStatus.FAILED,
            AgentStatus.CANCELLED,
            AgentStatus.INTERRUPTED,
            AgentStatus.CONFLICTED,
        )
        for found in ctx.store.all_agents():
            if found.status not in keep or found.lease_token is None or found.lease_lost:
                continue
            if found.agent_id in self._runtimes:
                continue  # run by this process
            if found.owner in live and found.owner != ctx.store.server_id:
                continue  # kept by the live server that ran it
            agent = ctx.store.claim_agent(found.agent_id, found.owner, keep)
            if agent is None or agent.lease_token is None:
                continue  # claimed by another server, or merged or discarded meanwhile
            if _scope_freed(agent):
                await self._release_leases(ctx, agent)  # no work to keep: free its paths
                continue
            holder = agent.lease_holder or agent.agent_id
            rows = [
                r
                for r in await ctx.leases.table()
                if r.holder == holder and r.token == agent.lease_token
            ]
            grant: LeaseGrant | None = None
            if rows:
                grant = LeaseGrant(
                    holder=holder,
                    token=agent.lease_token,
                    leases=tuple(r.request for r in rows),
                    expires_at=min(r.expires_at for r in rows),
                )
            else:
                requests = self._scope_requests(agent.write_scope)
                try:
                    grant = ctx.leases.store.try_acquire(holder, requests)
                except LeaseError:
                    grant = None
                if grant is None:
                    ctx.store.update_agent(
                        agent.agent_id,
                        "lease_lost",
                        "lapsed while no server kept it",
                        lease_lost=True,
                    )
                    continue
                ctx.store.update_agent(
                    agent.agent_id, "leased", f"token {grant.token}", lease_token=grant.token
                )
                if _scope_freed(self._agent(ctx, agent.agent_id)):
                    # merged or discarded by another server while the grant was taken: that
                    # server's sweep may have run before the grant existed, so give it back here
                    with contextlib.suppress(LeaseError):
                        await ctx.leases.release(grant)
                    continue
            runtime = AgentRuntime(agent_id=agent.agent_id)
            runtime.fence = LeaseFence(ctx.leases, holder)
            runtime.fence.grant = grant
            self._runtimes[agent.agent_id] = runtime
            ctx.keeper.track(grant, lambda lost, r=runtime: self._on_lease_lost(ctx, r, lost))

    def _model(self, name: str) -> Model:
        """The model `name` of the first group of agents (made on first use)."""
        key = self._model_key(name, 1)
        model = self._models.get(key)
        if model is None:
            model = self._models[key] = self._model_factory(name)
        return model

    async def _agent_model(self, name: str, agent_index: int) -> Model:
        """The model `name` for the agent of this index: one instance per name and group of
        `AGENTS_PER_MODEL` agents, so that no HTTP connection pool serves more than that many.

        (An httpx connection pool, `FANOUT_HTTP_CLIENT=httpx`, scans every connection it holds
        on each request and response, so one pool for 64 agents costs more CPU than the requests
        themselves.) The instances after the first are made in a worker thread, off the event
        loop: a factory may be slow (the process's first SDK client loads the CA bundle).
        """
        key = self._model_key(name, agent_index)
        model = self._models.get(key)
        if model is None:
            async with self._model_locks.setdefault(key, anyio.Lock()):
                model = self._models.get(key)
                if model is None:
                    model = await anyio.to_thread.run_sync(self._model_factory, name)
                    self._models[key] = model
        return model

    @staticmethod
    def _model_key(name: str, agent_index: int) -> tuple[str, int]:
        return (name, (max(agent_index, 1) - 1) // AGENTS_PER_MODEL)

    # --- spawn ------------------------------------------------------------------------------

    async def spawn(self, request: SpawnRequest, default_repo: Path | None = None) -> SpawnResult:
        """Validate, pin the snapshot, create the agents and start them; returns at once."""
        settings = self.settings
        ctx = await self.context(request.repo or default_repo)
        for name in {t.model or settings.model for t in request.tasks}:
            self._model(name)  # a missing API key fails here, before anything is created
        names = [t.name or f"agent-{i + 1}" for i, t in enumerate(request.tasks)]
        if len(set(names)) != len(names):
            raise InvalidRequest("tasks[].name: names must be unique within a run")
        run_id = f"r{secrets.token_hex(4)}"
        snap = await anyio.to_thread.run_sync(ws_mod.snapshot, ctx.repo, run_id)
        shared_spec = request.shared_context
        shared, paths = await anyio.to_thread.run_sync(
            self._shared_snapshot,
            ctx,
            snap.base_commit,
            shared_spec.plan if shared_spec else None,
            shared_spec.conventions if shared_spec else None,
            shared_spec.files if shared_spec else [],
        )
        max_concurrency = request.max_concurrency or settings.max_concurrency
        budget = request.budget_tokens or settings.budget_tokens
        run = RunRecord(
            run_id=run_id,
            repo=str(ctx.repo.root),
            created_at=time.time(),
            base_commit=snap.base_commit,
            head_commit=snap.head_commit,
            branch_ref=snap.branch_ref,
            snapshot_dirty=snap.dirty,
            shared=shared,
            max_concurrency=max_concurrency,
            budget_tokens=budget,
            model=settings.model,
            owner=ctx.store.server_id,
        )
        agents: list[AgentRecord] = []
        for i, task in enumerate(request.tasks):
            agent_id = f"{run_id}-a{i + 1}"
            agents.append(
                AgentRecord(
                    agent_id=agent_id,
                    run_id=run_id,
                    index=i + 1,
                    name=names[i],
                    prompt=task.prompt,
                    write_scope=task.write_scope,
                    model=task.model or settings.model,
                    max_turns=task.max_turns or settings.max_turns,
                    base_commit=snap.base_commit,
                    owner=ctx.store.server_id,
                    lease_holder=agent_id,
                )
            )
        self._plan_waves(agents)
        warnings = await self._spawn_warnings(ctx, agents)
        estimate = self._estimate(run, agents)
        if estimate.estimated_total_tokens > budget:
            warnings.append(
                f"the estimate ({estimate.estimated_total_tokens} tokens) exceeds the budget "
                f"({budget}); agents stop with budget_exhausted when it is spent"
            )
        ctx.store.create_run(run, agents)
        ctx.limiters[run_id] = anyio.CapacityLimiter(max_concurrency)
        ctx.prefixes[run_id] = shared_prefix(shared, paths)
        # Runtimes are registered before any task starts (cancel sees them at once); the tasks
        # start in spawn order, and no agent's turn runs before spawn returns.
        runtimes = [self._register_runtime(agent.agent_id) for agent in agents]
        for runtime in runtimes:
            self.task_group.start_soon(self._agent_task, ctx, runtime)
        briefs = [self._brief(a) for a in agents]
        return SpawnResult(
            run_id=run_id,
            repo=str(ctx.repo.root),
            base_commit=snap.base_commit,
            snapshot_of_uncommitted_changes=snap.dirty,
            agents=briefs,
            estimate=estimate,
            warnings=warnings,
        )

    @staticmethod
    def _scope_requests(write_scope: list[str] | None) -> list[LeaseRequest]:
        scope = WriteScope.of(write_scope)
        return [LeaseRequest.write(p) for p in scope.lease_paths()] if not scope.read_only else []

    def _plan_waves(self, agents: list[AgentRecord]) -> None:
        """An agent waits for each earlier agent of the run whose write scope overlaps its own."""
        requests = [self._scope_requests(agent.write_scope) for agent in agents]
        for i, agent in enumerate(agents):
            mine = requests[i]
            agent.waits_for = [
                earlier.agent_id
                for j, earlier in enumerate(agents[:i])
                if any(conflicts(a, b) for a in mine for b in requests[j])
            ]

    async def _spawn_warnings(self, ctx: RepoContext, agents: list[AgentRecord]) -> list[str]:
        warnings: list[str] = []
        sandboxed = self.settings.sandbox == "bwrap"
        if self.settings.sandbox == "auto":
            problem = await probe_bwrap()
            sandboxed = problem is None
            if problem is not None:
                warnings.append(
                    f"commands run WITHOUT a sandbox ({problem}): they can write outside their "
                    "worktree, reach the network and read the server's environment; install "
                    "bubblewrap, or set FANOUT_SANDBOX=none to accept this"
                )
        warnings.append(
            await anyio.to_thread.run_sync(
                functools.partial(
                    describe_commands,
                    sandboxed=sandboxed,
                    extra_ro_paths=self.settings.sandbox_ro_paths,
                    limits=self.settings.command_limits,
                    path=os.environ.get("PATH", ""),
                )
            )
        )
        for agent in agents:
            if agent.write_scope is None:
                warnings.append(
                    f"{agent.name} has no write_scope: it may change the whole repository and "
                    "so serializes with every other writer; give it path prefixes to run it in "
                    "parallel"
                )
            if agent.waits_for:
                names = ", ".join(a.name for a in agents if a.agent_id in agent.waits_for)
                warnings.append(
                    f"{agent.name} overlaps the write scope of {names}: it waits until they are "
                    "merged or discarded, then starts from the new head"
                )
        blockers: set[str] = set()
        for agent in agents:
            for lease in await ctx.leases.blockers(self._scope_requests(agent.write_scope)):
                blockers.add(lease.holder)
        if blockers:
            warnings.append(
                "agents of earlier runs hold overlapping write leases ("
                + ", ".join(sorted(blockers))
                + "): the overlapping agents wait until those are merged or discarded"
            )
        return warnings

    def _estimate(self, run: RunRecord, agents: list[AgentRecord]) -> CostEstimate:
        prefix = shared_prefix(run.shared, [])
        tool_chars = sum(len(t.description) + 200 for t in [*SUBAGENT_TOOL_SPECS, FINISH_TOOL])
        prefix_tokens = (len(prefix) + tool_chars) // 4 + run.shared.file_count * 6
        task_tokens = sum(len(a.prompt) // 4 + 60 for a in agents) // max(len(agents), 1)
        turns = min(ESTIMATED_TURNS, max(a.max_turns for a in agents))
        n = len(agents)
        per_agent_input = turns * (prefix_tokens + task_tokens) + ESTIMATED_GROWTH_PER_TURN * (
            turns * (turns - 1) // 2
        )
        output = ESTIMATED_OUTPUT_PER_TURN * turns
        uncached = n * (per_agent_input + output)
        prefix_reads = n * turns * prefix_tokens - prefix_tokens
        cached = uncached - prefix_reads + round(0.1 * prefix_reads + 0.25 * prefix_tokens)
        return CostEstimate(
            agents=n,
            shared_prefix_tokens=prefix_tokens,
            per_agent_task_tokens=task_tokens,
            estimated_turns_per_agent=turns,
            estimated_total_tokens=cached,
            estimated_uncached_tokens=uncached,
            budget_tokens=run.budget_tokens,
            note=(
                f"assumes {turns} turns per agent, ~{ESTIMATED_GROWTH_PER_TURN} tokens of "
                "conversation growth per turn and the shared prefix read from the prompt cache "
                "after the first agent (counted as the budget counts: cache reads ×0.1, writes "
                "×1.25); the live meter in get_status is exact"
            ),
        )

    def _shared_snapshot(
        self,
        ctx: RepoContext,
        base: str,
        plan: str | None,
        conventions: str | None,
        files: list[str],
    ) -> tuple[SharedSnapshot, list[str]]:
        """The run's shared context, and the paths at the base (for the shared prefix)."""
        paths = self._paths_at(ctx, base)
        shared_files: list[SharedFile] = []
        for path in files:
            blob = ctx.repo.try_git("rev-parse", "--verify", "--quiet", f"{base}:{path}")
            if blob is None:
                raise InvalidRequest(
                    f"shared_context.files: {path!r} does not exist at the base commit "
                    f"{base[:12]}; list files that are in the repository"
                )
            blob = blob.strip()
            size = int(ctx.repo.git("cat-file", "-s", blob).strip())
            content: str | None = None
            note: str | None = None
            if size > MAX_SHARED_FILE_BYTES:
                note = f"{size} bytes, over the {MAX_SHARED_FILE_BYTES}-byte limit: read it"
            else:
                raw = ctx.repo.git("cat-file", "blob", blob)
                if "\x00" in raw:
                    note = "binary file"
                else:
                    content = raw
            shared_files.append(
                SharedFile(path=path, blob=blob, size=size, content=content, note=note)
            )
        shared = SharedSnapshot(
            base_commit=base,
            plan=plan,
            conventions=conventions,
            files=shared_files,
            file_count=len(paths),
        )
        return shared, paths

    async def _prefix(self, ctx: RepoContext, run: RunRecord) -> str:
        prefix = ctx.prefixes.get(run.run_id)
        if prefix is None:
            async with ctx.prefix_lock:  # agents of a run (rerun, restart) list the base once
                prefix = ctx.prefixes.get(run.run_id)
                if prefix is None:
                    paths = await anyio.to_thread.run_sync(self._paths_at, ctx, run.base_commit)
                    prefix = ctx.prefixes[run.run_id] = shared_prefix(run.shared, paths)
        return prefix

    @staticmethod
    def _paths_at(ctx: RepoContext, commit: str) -> list[str]:
        out = ctx.repo.git("ls-tree", "-r", "--name-only", "-z", commit)
        return [p for p in out.split("\x00") if p]

    def _brief(self, agent: AgentRecord) -> AgentBrief:
        return AgentBrief(
            agent_id=agent.agent_id,
            name=agent.name,
            status=agent.status,
            write_scope=agent.write_scope,
            waits_for=agent.waits_for,
        )

    # --- running an agent -------------------------------------------------------------------

    def _register_runtime(self, agent_id: str) -> AgentRuntime:
        runtime = AgentRuntime(agent_id=agent_id, runs_here=True)
        self._runtimes[agent_id] = runtime
        return runtime

    async def _agent_task(self, ctx: RepoContext, runtime: AgentRuntime) -> None:
        agent_id = runtime.agent_id
        store = ctx.store
        try:
            with runtime.scope:
                await self._run_agent(ctx, runtime)
            if runtime.scope.cancelled_caught:
                await self._finish_cancelled(ctx, runtime)
        except Exception as exc:  # a defect of ours: contained to this agent
            log.exception("agent %s failed inside the orchestrator", agent_id)
            with anyio.CancelScope(shield=True):
                await self._fail_internal(ctx, runtime, exc)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._finish_interrupted(ctx, runtime)
            raise
        finally:
            record = store.agent(agent_id)
            if record is not None and record.status.active:
                with anyio.CancelScope(shield=True):
                    await self._finish_interrupted(ctx, runtime)

    async def _fail_internal(self, ctx: RepoContext, runtime: AgentRuntime, exc: Exception) -> None:
        error = f"internal error: {type(exc).__name__}: {exc}"
        try:
            await self._finish(
                ctx,
                runtime,
                LoopOutcome(StopReason.INTERNAL_ERROR, error=error),
                status=AgentStatus.FAILED,
            )
        except Exception:
            log.exception("recording the failure of %s failed", runtime.agent_id)
            ctx.store.update_agent(
                runtime.agent_id,
                "failed",
                error,
                status=AgentStatus.FAILED,
                stop_reason=StopReason.INTERNAL_ERROR,
                status_reason=error,
            )

    async def _run_agent(self, ctx: RepoContext, runtime: AgentRuntime) -> None:
        store = ctx.store
        agent = self._agent(ctx, runtime.agent_id)
        # 1. Wait for earlier agents of the run whose write scope overlaps (waves).
        for other_id in agent.waits_for:
            other = self._runtimes.get(other_id)
            other_record = store.agent(other_id)
            if other_record is None or _scope_freed(other_record):
                continue
            store.update_agent(
                agent.agent_id,
                "waiting",
                f"waits for {other_id}",
                status=AgentStatus.WAITING,
                status_reason=f"waits for {other_record.name} ({other_id}) to be merged or "
                "discarded: their write scopes overlap",
            )
            while True:
                if other is not None:
                    with anyio.move_on_after(1.0):
                        await other.released.wait()
                else:
                    await anyio.sleep(1.0)
                other_record = store.agent(other_id)
                if other_record is None or _scope_freed(other_record):
                    break
        # 2. Take the write leases of the scope, all at once.
        requests = self._scope_requests(agent.write_scope)
        fence = LeaseFence(ctx.leases, agent.lease_holder or agent.agent_id)
        runtime.fence = fence
        if requests:
            holder = agent.lease_holder or agent.agent_id

            def on_wait() -> None:
                store.update_agent(
                    agent.agent_id,
                    "waiting",
                    "waits for leases",
                    status=AgentStatus.WAITING,
                    status_reason="waits for overlapping write leases held by other agents "
                    "(see get_status leases); it starts once they are merged or discarded",
                )

            grant = await ctx.leases.acquire(holder, requests, on_wait=on_wait)
            fence.grant = grant
            ctx.keeper.track(grant, lambda lost: self._on_lease_lost(ctx, runtime, lost))
            store.update_agent(
                agent.agent_id,
                "leased",
                f"token {grant.token}",
                lease_token=grant.token,
                status=AgentStatus.QUEUED,
                status_reason=None,
            )
        # 3. A concurrency slot.
        limiter = ctx.limiters.get(agent.run_id)
        if limiter is None:
            run = self._run(ctx, agent.run_id)
            limiter = ctx.limiters[agent.run_id] = anyio.CapacityLimiter(run.max_concurrency)
        async with limiter:
            await self._run_loop(ctx, runtime)

    async def _run_loop(self, ctx: RepoContext, runtime: AgentRuntime) -> None:
        """Create the workspace while the first model turn is in flight, then run the loop.

        The first request needs only the prompts; the loop waits for the workspace before it
        records that turn or runs a tool, and the agent shows `running` once the workspace exists.
        """
        agent = self._agent(ctx, runtime.agent_id)
        run = self._run(ctx, agent.run_id)
        ready = anyio.Event()
        made: list[AgentBus] = []
        failed: list[Exception] = []
        loop_scope = anyio.CancelScope()

        async def prepare() -> None:
            try:
                made.append(await self._prepare_workspace(ctx, runtime, agent))
            except Exception as exc:  # the agent fails at once, its first turn abandoned
                log.exception("agent %s: its workspace could not be made", agent.agent_id)
                failed.append(exc)
                loop_scope.cancel()
            finally:
                ready.set()

        async def workspace_ready() -> AgentBus:
            await ready.wait()
            if failed:
                raise failed[0]
            return made[0]

        # The prefix describes the run's base for every agent, so it is byte-identical.
        prefix = await self._prefix(ctx, run)
        loop = AgentLoop(
            model=await self._agent_model(agent.model, agent.index),
            model_name=agent.model,
            bus=None,
            workspace_ready=workspace_ready,
            budget=self._budget(ctx, agent.run_id),
            retry=RetryPolicy(
                max_attempts=self.settings.retry_max_attempts,
                retry_after_cap_s=self.settings.retry_after_cap_s,
            ),
            system_prefix=prefix,
            system_task=task_prompt(
                name=agent.name,
                prompt=agent.prompt,
                scope=WriteScope.of(agent.write_scope),
                max_turns=agent.max_turns,
                rerun_context=agent.rerun_context,
            ),
            tools=[*SUBAGENT_TOOL_SPECS, FINISH_TOOL],
            max_turns=agent.max_turns,
            max_output_tokens=self.settings.max_output_tokens,
            on_turn=lambda p, reserved, used: self._on_turn(
                ctx, runtime.agent_id, p, reserved, used
            ),
            transcript=Transcript(ctx.repo.state_dir / "transcripts" / f"{agent.agent_id}.jsonl"),
        )
        await anyio.to_thread.run_sync(loop.transcript.touch)  # its file: off the event loop
        runtime.loop = loop
        runtime.started_at = time.monotonic()
        outcome = LoopOutcome(StopReason.INTERNAL_ERROR, error="the loop did not run")
        async with anyio.create_task_group() as tg:
            tg.start_soon(prepare)
            with loop_scope:
                try:
                    outcome = await loop.run()
                except Exception as exc:  # a defect of ours: contained to this agent
                    log.exception("agent %s crashed", agent.agent_id)
                    outcome = LoopOutcome(
                        StopReason.INTERNAL_ERROR, error=f"{type(exc).__name__}: {exc}"
                    )
        if failed and loop_scope.cancelled_caught:
            error = failed[0]
            outcome = LoopOutcome(
                StopReason.INTERNAL_ERROR,
                error=f"its workspace could not be made: {type(error).__name__}: {error}",
            )
        with anyio.CancelScope(shield=True):
            await self._finish(ctx, runtime, outcome)

    async def _prepare_workspace(
        self, ctx: RepoContext, runtime: AgentRuntime, agent: AgentRecord
    ) -> AgentBus:
        """The agent's worktree and bus; the agent is `running` from here."""
        start = agent.base_commit
        if agent.waits_for and not agent.rerun_of:
            start = await anyio.to_thread.run_sync(ctx.repo.head_commit)
        if agent.rerun_of is not None and agent.start_commit is not None:
            start = agent.start_commit
        audit = AuditLog(ctx.repo.state_dir / "audit" / f"{agent.agent_id}.jsonl")
        home = ctx.repo.state_dir / "homes" / agent.agent_id

        def make() -> tuple[ws_mod.Workspace, Terminal]:
            # everything that creates files, off the event loop (a file can take a millisecond
            # to allocate on a busy disk, and 64 agents start at once)
            workspace = ws_mod.create_workspace(
                ctx.repo,
                base_commit=start,
                run_id=agent.run_id,
                agent_id=agent.agent_id,
                include=self.settings.include,
            )
            audit.touch()
            terminal = Terminal(
                workspace.path,
                TerminalConfig(
                    sandbox=SandboxMode(self.settings.sandbox),
                    allow_network=self.settings.allow_network,
                    env_passthrough=tuple(self.settings.env_passthrough),
                    default_timeout_s=self.settings.command_timeout_s,
                    hidden_paths=(ctx.repo.state_dir,),
                    extra_ro_paths=self.settings.sandbox_ro_paths,
                    # git's dirs from the server's records, never from the workspace's `.git`
                    git_admin_dir=workspace.admin_dir,
                    git_common_dir=ctx.repo.git_dir,
                    home=home,
                    limits=self.settings.command_limits,
                ),
            )
            return workspace, terminal

        workspace, terminal = await anyio.to_thread.run_sync(make, limiter=ctx.workspace_threads)
        base = agent.base_commit if agent.start_commit else start
        agent = ctx.store.update_agent(
            agent.agent_id,
            "running",
            "",
            status=AgentStatus.RUNNING,
            status_reason=None,
            started_at=time.time(),
            workspace=str(workspace.path),
            branch=workspace.branch,
            base_commit=base,
            start_commit=start,
            commit=start if start != base else None,
        )
        assert runtime.fence is not None
        runtime.audit = audit
        return AgentBus(
            agent_id=agent.agent_id,
            workspace=workspace.path,
            write_scope=WriteScope.of(agent.write_scope),
            fence=runtime.fence,
            audit=audit,
            terminal=terminal,
            git_dir=workspace.admin_dir,
        )

    def _budget(self, ctx: RepoContext, run_id: str) -> Budget:
        store = ctx.store

        def describe() -> str:
            total, used, reserved = store.budget(run_id)
            return f"{used} of {total} tokens used, {reserved} reserved by running turns"

        return Budget(
            reserve=lambda n: store.reserve_budget(run_id, n),
            settle=lambda reserved, used: store.settle_budget(run_id, reserved, used),
            describe=describe,
        )

    def _on_turn(
        self, ctx: RepoContext, agent_id: str, progress: Progress, reserved: int, used: int
    ) -> None:
        runtime = self._runtimes.get(agent_id)
        loop = runtime.loop if runtime is not None else None
        # files written through the bus so far (final, git-based facts replace them at the end)
        bus = loop.bus if loop is not None else None
        written = bus.written_paths() if bus is not None else []
        ctx.store.update_agent(
            agent_id,
            "turn",
            f"turn {progress.turns}",
            settle=(reserved, used),
            turns=progress.turns,
            tokens=progress.tokens,
            changed_files=sorted(set(written)),
        )

    def _on_lease_lost(self, ctx: RepoContext, runtime: AgentRuntime, lost: LeaseLost) -> None:
        current = ctx.store.agent(runtime.agent_id)
        if current is None or current.status in (AgentStatus.MERGED, AgentStatus.DISCARDED):
            return  # given back on purpose (by the server that merged or discarded it)
        record = ctx.store.update_agent(runtime.agent_id, "lease_lost", str(lost), lease_lost=True)
        if record.status.active:
            runtime.cancel_reason = f"its write lease was lost ({lost}); it cannot land"
            runtime.lost_lease = True
            runtime.scope.cancel()

    async def _commit_work(
        self, ctx: RepoContext, agent: AgentRecord, message: str
    ) -> ws_mod.WorkCommit:
        workspace = _workspace_of(agent)
        scope = WriteScope.of(agent.write_scope)
        return await anyio.to_thread.run_sync(
            lambda: ws_mod.commit_workspace(
                workspace, message=f"fanout: {agent.name}: {message}", write_scope=scope
            )
        )

    @staticmethod
    def _changes(ctx: RepoContext, base: str, commit: str) -> list[FileChange]:
        pyrepo = ctx.repo.open()
        try:
            found = ws_mod.file_changes(pyrepo, base, commit)
        finally:
            pyrepo.free()
        return found

    async def _finish_cancelled(self, ctx: RepoContext, runtime: AgentRuntime) -> None:
        reason = runtime.cancel_reason or "cancelled by cancel_subagents"
        lease_lost = runtime.lost_lease
        outcome = LoopOutcome(
            StopReason.INTERNAL_ERROR if lease_lost else StopReason.CANCELLED, error=reason
        )
        with anyio.CancelScope(shield=True):
            await self._finish(
                ctx,
                runtime,
                outcome,
                status=AgentStatus.FAILED if lease_lost else AgentStatus.CANCELLED,
            )

    async def _finish_interrupted(self, ctx: RepoContext, runtime: AgentRuntime) -> None:
        outcome = LoopOutcome(
            StopReason.INTERRUPTED,
            error="the server stopped while this agent ran; rerun_subagent resumes it from its "
            "committed work",
        )
        await self._finish(ctx, runtime, outcome, status=AgentStatus.INTERRUPTED)

    async def _finish(
        self,
        ctx: RepoContext,
        runtime: AgentRuntime,
        outcome: LoopOutcome,
        status: AgentStatus | None = None,
    ) -> None:
        """Commit the agent's work on its branch and record its result, built from facts."""
        agent = self._agent(ctx, runtime.agent_id)
        if not agent.status.active:
            return
        if status is None:
            finished = outcome.stop_reason in (StopReason.FINISHED, StopReason.FINAL_ANSWER)
            ok = finished and not outcome.failed_by_model
            status = AgentStatus.SUCCEEDED if ok else AgentStatus.FAILED
        reason = outcome.error
        if outcome.failed_by_model:
            reason = "the agent reported that it could not complete its task"
        commit = agent.commit
        changes: list[FileChange] = []
        dropped: list[str] = []
        if agent.workspace is not None and Path(agent.workspace).exists():
            work = await self._commit_work(ctx, agent, _first_line(outcome.summary or agent.prompt))
            commit = work.commit or commit
            dropped = [*work.dropped, *work.planted]
        if commit is not None:
            changes = await anyio.to_thread.run_sync(self._changes, ctx, agent.base_commit, commit)
        records = runtime.audit.records() if runtime.audit is not None else []
        commands = [
            CommandRun(
                command=r.command or r.args_brief,
                exit_code=r.exit_code,
                duration_s=round(r.duration_ms / 1000, 3),
                timed_out=bool(r.timed_out),
                outcome=r.outcome,
            )
            for r in records
            if r.op == "run_command"
        ]
        progress = runtime.loop.progress if runtime.loop is not None else Progress()
        duration = time.monotonic() - runtime.started_at if runtime.started_at else 0.0
        result = AgentResult(
            status=status,
            stop_reason=outcome.stop_reason,
            summary=outcome.summary,
            follow_ups=outcome.follow_ups,
            changed_files=changes,
            dropped_files=dropped,
            commands=commands,
            refused_calls=sum(1 for r in records if r.outcome != "ok"),
            tokens=progress.tokens,
            turns=progress.turns,
            duration_s=round(duration, 3),
            error=reason,
            commit=commit,
            branch=agent.branch,
        )
        ctx.store.update_agent(
            agent.agent_id,
            status.value,
            reason or outcome.stop_reason.value,
            status=status,
            stop_reason=outcome.stop_reason,
            status_reason=reason,
            result=result,
            commit=commit,
            finished_at=time.time(),
            turns=progress.turns,
            tokens=progress.tokens,
            changed_files=[c.path for c in changes],
        )
        if status != AgentStatus.SUCCEEDED and not _has_work(commit, agent.base_commit):
            # nothing to merge or keep: its scope goes to whoever waits for it
            await self._release_leases(ctx, agent)
            self._signal_released(agent.agent_id)

    # --- lookups ----------------------------------------------------------------------------

    def _run(self, ctx: RepoContext, run_id: str) -> RunRecord:
        run = ctx.store.run(run_id)
        if run is None:
            raise RunNotFound(f"no run {run_id!r} in {ctx.repo.root}; get_status lists the runs")
        return run

    def _agent(self, ctx: RepoContext, agent_id: str) -> AgentRecord:
        agent = ctx.store.agent(agent_id)
        if agent is None:
            raise AgentNotFound(
                f"no agent {agent_id!r} in {ctx.repo.root}; get_status lists the agents"
            )
        return agent

    async def _context_of_run(self, run_id: str, repo: Path | None) -> RepoContext:
        for ctx in self._contexts.values():
            if ctx.store.run(run_id) is not None:
                return ctx
        ctx = await self.context(repo)
        self._run(ctx, run_id)
        return ctx

    async def _context_of_agent(self, agent_id: str, repo: Path | None) -> RepoContext:
        for ctx in self._contexts.values():
            if ctx.store.agent(agent_id) is not None:
                return ctx
        ctx = await self.context(repo)
        self._agent(ctx, agent_id)
        return ctx

    # --- status -----------------------------------------------------------------------------

    async def status(
        self,
        *,
        run_id: str | None = None,
        agent_ids: Sequence[str] | None = None,
        since: int | None = None,
        wait_s: float | None = None,
        repo: Path | None = None,
        wake_on: WakeOn = WakeOn.SETTLED,
    ) -> StatusResult:
        """Runs and agents; with `since` and `wait_s`, waits until the orchestrator has something
        to do after `since` (`wake_on`, see `orchestration.wakeup`), at most `wait_s`. Each run
        says whether it is settled and what to call next, and which agents changed after `since`.

        Polls are cheap when little changed: runs, agents and each agent's view are built again
        only when they changed, so answers share them: read them, never mutate them.

        A long-poll answers by its deadline, whatever else waits for the event loop's attention
        or the worker threads. An answer shows the state as of the moment its poll was due
        (called, woken by a change, or timed out) or later, so the polls due by the time the
        state was last read (those one change woke, say) share that read (`_StatusRead`)."""
        due = called = time.monotonic()
        timeout = 0.0
        deadline: float | None = None  # on anyio's clock
        if since is not None and wait_s:
            timeout = min(max(wait_s, 0.0), self.settings.status_wait_cap_s)
            deadline = anyio.current_time() + timeout
        ctx = await (self._status_context(run_id, repo) if run_id else self.context(repo))
        self._measure_disk_usage_if_old(ctx)  # while the poll waits
        changed = True
        if since is not None and deadline is not None:
            changed, due = await self._wait_for_attention(
                ctx, run_id, since, wake_on=wake_on, deadline=deadline, called=called, wait=timeout
            )
        elif since is not None:
            changed = ctx.store.cursor() > since
        disk = await self._disk_usage(ctx, deadline)
        read = self._status_reads.get(ctx.store)
        if read is None or read.at < due:
            read = await self._read_status(ctx, read)
        cursor = read.cursor
        runs = ctx.store.runs_snapshot(run_id, cursor)
        if run_id and not runs:
            self._run(ctx, run_id)  # raises RunNotFound
        wanted = set(agent_ids) if agent_ids else None
        snapshots = {r.run_id: ctx.store.agents_snapshot(r.run_id, cursor) for r in runs}
        if wanted:
            known = {a.agent_id for agents in snapshots.values() for a in agents}
            missing = sorted(wanted - known)
            if missing:
                raise AgentNotFound(f"agent_ids: no such agent(s) {', '.join(missing)}")
        # Views are built with model_construct: every value comes from an already validated
        # record or lease, so validating ~64 nested views again per poll would be wasted work.
        built = self._status_views.setdefault(ctx.store, {})
        budgets = tuple(read.budgets.get(run.run_id, (0, 0, 0)) for run in runs)
        # The same question, asked again while everything it shows is the same, gets the same
        # answer object: runs and agents change only with an event (the cursor), the budget's
        # reservations and the leases without one.
        asked = (run_id, tuple(sorted(wanted)) if wanted else None, since)
        shows = (cursor, changed, read.lease_keys, budgets, disk)
        answers = self._status_answers.setdefault(ctx.store, {})
        last = answers.get(asked)
        if last is not None and last[0] == shows:
            return last[1]
        views: list[RunView] = []
        wakeups = self._wakeups_of(ctx)
        for run, (total, used, reserved) in zip(runs, budgets, strict=True):
            agents = snapshots[run.run_id]
            attention = await wakeups.attention(run.run_id, cursor)
            changed_agents = (
                None if since is None else sorted(wakeups.changes(since, run.run_id, cursor).agents)
            )
            by_status = {s.value: n for s, n in Counter(a.status for a in agents).items()}
            spent = [a.tokens for a in agents]
            tokens = TokenUsage.model_construct(
                input=sum(t.input for t in spent),
                output=sum(t.output for t in spent),
                cache_read=sum(t.cache_read for t in spent),
                cache_write=sum(t.cache_write for t in spent),
            )
            shown = [a for a in agents if wanted is None or a.agent_id in wanted]
            views.append(
                RunView.model_construct(
                    run_id=run.run_id,
                    repo=run.repo,
                    created_at=run.created_at,
                    base_commit=run.base_commit,
                    max_concurrency=run.max_concurrency,
                    totals=RunTotals.model_construct(
                        agents=len(agents),
                        by_status=by_status,
                        tokens=tokens,
                        budget_tokens=total,
                        budget_used=used,
                        budget_remaining=max(total - used - reserved, 0),
                    ),
                    agents=[
                        _agent_view(
                            built, a, read.leases_by_holder.get(a.lease_holder or a.agent_id, [])
                        )
                        for a in shown
                    ],
                    settled=attention.settled,
                    next=attention.next,
                    changed_agents=changed_agents,
                )
            )
        result = StatusResult(cursor=cursor, changed=changed, runs=views, workspace_disk_bytes=disk)
        if len(answers) >= STATUS_ANSWERS_KEPT:
            answers.clear()
        answers[asked] = (shows, result)
        return result

    async def _wait_for_attention(
        self,
        ctx: RepoContext,
        run_id: str | None,
        since: int,
        *,
        wake_on: WakeOn,
        deadline: float,
        called: float,
        wait: float,
    ) -> tuple[bool, float]:
        """Wait until the orchestrator has something to do after `since`, or the deadline:
        (whether it has, when the poll came due). A run settled since `since` answers at once
        (one settled and unchanged since waits: the last answer said what to do); an agent's
        turn never wakes the poll; completions close together wake it once."""
        wakeups = self._wakeups_of(ctx)
        await anyio.lowlevel.checkpoint()
        cursor = ctx.store.cursor()
        if cursor > since and await wakeups.settled(run_id, cursor):
            return True, called
        seen = since
        while True:
            remaining = deadline - anyio.current_time()
            change = (
                await ctx.store.change_after(seen, remaining, run_id) if remaining > 0 else None
            )
            if change is None:
                return False, called + wait
            cursor = ctx.store.cursor()
            if await wakeups.wakes(since, run_id, wake_on, cursor):
                if wake_on is WakeOn.FINISHED:
                    await self._coalesce(
                        ctx, wakeups, run_id, since=since, cursor=cursor, deadline=deadline
                    )
                return True, max(called, change)
            seen = cursor

    async def _coalesce(
        self,
        ctx: RepoContext,
        wakeups: Wakeups,
        run_id: str | None,
        *,
        since: int,
        cursor: int,
        deadline: float,
    ) -> None:
        """After a completion, wait while more arrive within COALESCE_S of each other (at most
        COALESCE_MAX_S, never past the deadline), so that they wake the poll once."""
        finals = wakeups.finals(since, run_id, cursor)
        until = min(deadline, anyio.current_time() + COALESCE_MAX_S)
        seen = cursor
        while not await wakeups.settled(run_id, seen):
            window = min(COALESCE_S, until - anyio.current_time())
            if window <= 0:
                return
            if await ctx.store.change_after(seen, window, run_id) is None:
                return  # a whole window without a change
            seen = ctx.store.cursor()
            finals = max(finals, wakeups.finals(since, run_id, seen))

    def _wakeups_of(self, ctx: RepoContext) -> Wakeups:
        known = self._wakeups.get(ctx.store)
        if known is None:
            known = Wakeups(ctx.store, ctx.leases.table, self._scope_requests)
            self._wakeups[ctx.store] = known
        return known

    @functools.cached_property
    def _wakeups(self) -> weakref.WeakKeyDictionary[StateStore, Wakeups]:
        """Per state store, the wake-up questions of its long-polls (shared answers)."""
        return weakref.WeakKeyDictionary()

    async def _read_status(self, ctx: RepoContext, last: _StatusRead | None) -> _StatusRead:
        """Read what status answers are built from: the change cursor, the leases, the budgets."""
        at = time.monotonic()
        cursor = ctx.store.cursor()  # read once, before the rows (see runs_snapshot)
        now = time.time()
        # A lease's view is the one of the previous read while it shows the same: its expiry is
        # shown in whole seconds, so the holder's view, and its dump in the MCP answer, are
        # reused between polls within a second (renewals move it every ttl/3).
        last_views = {} if last is None else last.lease_views
        lease_views: dict[_LeaseShown, LeaseView] = {}
        leases_by_holder: dict[str, list[LeaseView]] = {}
        for lease in await ctx.leases.table():
            mode = "write" if lease.mode == LeaseMode.WRITE else "read"
            key = (lease.holder, lease.token, lease.resource, mode, lease_expires_in(lease, now))
            view = last_views.get(key)
            if view is None:
                view = LeaseView.model_construct(
                    resource=lease.resource, mode=mode, token=lease.token, expires_in_s=key[4]
                )
            lease_views[key] = view
            leases_by_holder.setdefault(lease.holder, []).append(view)
        read = _StatusRead(
            at=at,
            cursor=cursor,
            lease_views=lease_views,
            lease_keys=tuple(lease_views),
            leases_by_holder=leases_by_holder,
            budgets=ctx.store.budgets(),
        )
        self._status_reads[ctx.store] = read
        return read

    async def _status_context(self, run_id: str, repo: Path | None) -> RepoContext:
        """`_context_of_run` for a status poll: finds the run in the stores' snapshots."""
        for ctx in self._contexts.values():
            if ctx.store.runs_snapshot(run_id):
                return ctx
        ctx = await self.context(repo)
        if not ctx.store.runs_snapshot(run_id):
            self._run(ctx, run_id)  # raises RunNotFound
        return ctx

    @functools.cached_property
    def _status_views(self) -> weakref.WeakKeyDictionary[StateStore, dict[str, _BuiltView]]:
        """Per state store, agent_id -> the status view built last for that agent."""
        return weakref.WeakKeyDictionary()

    @functools.cached_property
    def _status_answers(
        self,
    ) -> weakref.WeakKeyDictionary[StateStore, dict[_StatusAsked, tuple[object, StatusResult]]]:
        """Per state store and question (run_id, agent_ids), the last answer and what it showed."""
        return weakref.WeakKeyDictionary()

    @functools.cached_property
    def _status_reads(self) -> weakref.WeakKeyDictionary[StateStore, _StatusRead]:
        """Per state store, the last read of what status answers show."""
        return weakref.WeakKeyDictionary()

    async def _disk_usage(self, ctx: RepoContext, deadline: float | None) -> int:
        """The workspaces' disk usage, measured again once older than DISK_USAGE_CACHE_S.

        The walk of every worktree runs in the background, one at a time for all polls; a poll
        answers with the last figure meanwhile, and waits only for the first one, until its
        deadline at most."""
        measuring = self._measure_disk_usage_if_old(ctx)
        if measuring is not None and ctx.disk_usage is None:
            with anyio.move_on_after(None if deadline is None else deadline - anyio.current_time()):
                await measuring.wait()
        known = ctx.disk_usage
        return 0 if known is None else known[1]

    def _measure_disk_usage_if_old(self, ctx: RepoContext) -> anyio.Event | None:
        """Start measuring the disk usage unless its figure is recent or a measurement is under
        way; the event of the measurement under way, if any."""
        known = ctx.disk_usage
        if known is not None and time.monotonic() - known[0] <= DISK_USAGE_CACHE_S:
            return None
        if ctx.disk_measuring is None:
            ctx.disk_measuring = anyio.Event()
            self.task_group.start_soon(self._measure_disk_usage, ctx, ctx.disk_measuring)
        return ctx.disk_measuring

    async def _measure_disk_usage(self, ctx: RepoContext, done: anyio.Event) -> None:
        try:
            value = await anyio.to_thread.run_sync(
                ws_mod.workspace_disk_usage, ctx.repo, limiter=ctx.disk_thread
            )
            ctx.disk_usage = (time.monotonic(), value)
        except Exception:  # the last figure stays; the next poll measures again
            log.exception("measuring the workspaces' disk usage failed")
        finally:
            ctx.disk_measuring = None
            done.set()

    # --- cancel -----------------------------------------------------------------------------

    async def cancel(
        self, run_id: str, agent_ids: Sequence[str] | None = None, repo: Path | None = None
    ) -> CancelResult:
        """Cancel some or all of a run's active agents; their work so far is committed."""
        ctx = await self._context_of_run(run_id, repo)
        agents = ctx.store.agents(run_id)
        if agent_ids:
            by_id = {a.agent_id: a for a in agents}
            missing = [i for i in agent_ids if i not in by_id]
            if missing:
                raise AgentNotFound(f"agent_ids: {', '.join(missing)} not in run {run_id}")
            agents = [by_id[i] for i in agent_ids]
        stopping: set[str] = set()
        live: set[str] | None = None  # the live servers, read once, when first needed
        orphans = False
        for agent in agents:
            if not agent.status.active:
                continue
            runtime = self._runtimes.get(agent.agent_id)
            if runtime is not None and runtime.runs_here:
                runtime.scope.cancel()
            else:
                if live is None:
                    live = ctx.store.live_servers()
                if agent.owner in live:
                    # run by another live server: it cancels the agent when it sees the request
                    ctx.store.update_agent(
                        agent.agent_id,
                        CANCEL_REQUESTED,
                        ctx.store.server_id,
                        status_reason="cancel requested from another server; the server running "
                        "it stops it",
                    )
                else:
                    orphans = True
            stopping.add(agent.agent_id)
        if orphans:
            await self._recover_agents(ctx)  # their server is gone: they become interrupted
        with anyio.move_on_after(CANCEL_WAIT_S):  # then the answer shows where they are
            await self._await_final(ctx, run_id, stopping)
        refreshed = [self._agent(ctx, a.agent_id) for a in agents]
        return CancelResult(run_id=run_id, agents=[self._brief(a) for a in refreshed])

    async def _watch_cancel_requests(self, ctx: RepoContext) -> None:
        """Cancel the agents this process runs for which another server recorded a request."""
        seen = ctx.store.cursor()
        while True:
            await anyio.sleep(CANCEL_POLL_S)
            for seq, agent_id, detail in ctx.store.events_of_kind(CANCEL_REQUESTED, since=seen):
                seen = max(seen, seq)
                runtime = self._runtimes.get(agent_id)
                if runtime is None or not runtime.runs_here:
                    continue
                runtime.cancel_reason = (
                    f"cancelled by cancel_subagents from another server ({detail})"
                )
                runtime.scope.cancel()

    async def _await_final(self, ctx: RepoContext, run_id: str, agent_ids: set[str]) -> None:
        """Return once none of these agents of the run is active: one watcher for them all,
        looking at the run's snapshot (its changed rows parsed once) after each of its changes."""
        while agent_ids:
            cursor = ctx.store.cursor()
            agents = ctx.store.agents_snapshot(run_id, cursor)
            if not any(a.status.active for a in agents if a.agent_id in agent_ids):
                return
            await ctx.store.wait_for_change(cursor, 1.0, run_id)

    # --- merge ------------------------------------------------------------------------------

    async def merge(
        self,
        request: MergeRequest,
        *,
        repo: Path | None = None,
        on_progress: Callable[[int, int, str], None] | None = None,
    ) -> MergeResult:
        """Join agents' work into the canonical branch, one fenced writer at a time."""
        ctx = await self._context_of_run(request.run_id, repo)
        agents = ctx.store.agents(request.run_id)
        by_id = {a.agent_id: a for a in agents}
        unknown = [i for i in [*(request.agent_ids or []), *request.discard] if i not in by_id]
        if unknown:
            raise AgentNotFound(
                f"agent_ids/discard: {', '.join(unknown)} not in run {request.run_id}"
            )
        results: list[AgentMergeResult] = []
        for agent_id in request.discard:
            results.append(await self._discard(ctx, by_id[agent_id], dry_run=request.dry_run))
        discarded = set(request.discard)
        if request.agent_ids is not None:
            chosen = [by_id[i] for i in request.agent_ids if i not in discarded]
        else:
            chosen = sorted(
                (
                    a
                    for a in agents
                    if a.status == AgentStatus.SUCCEEDED and a.agent_id not in discarded
                ),
                key=lambda a: (a.finish_seq or 0, a.index),
            )
        candidates: list[JoinCandidate] = []
        for agent in chosen:
            skip = self._merge_precheck(agent)
            if skip is not None:
                results.append(
                    AgentMergeResult(
                        agent_id=agent.agent_id,
                        name=agent.name,
                        outcome=MergeOutcome.SKIPPED,
                        reason=skip,
                    )
                )
                continue
            if agent.commit is None or agent.commit == agent.base_commit:  # (narrows the type)
                results.append(await self._merge_empty(ctx, agent, dry_run=request.dry_run))
                continue
            candidates.append(
                JoinCandidate(
                    agent_id=agent.agent_id,
                    name=agent.name,
                    task_summary=_first_line(agent.prompt),
                    model_summary=agent.result.summary if agent.result else "",
                    base_commit=agent.base_commit,
                    branch=agent.branch or "",
                    commit=agent.commit,
                )
            )

        def can_land(agent_id: str) -> str | None:
            agent = by_id[agent_id]
            if agent.lease_token is None:
                return None
            try:
                ctx.leases.check(agent.lease_holder or agent_id, agent.lease_token, None)
            except LeaseError as exc:
                return (
                    f"its write lease was lost ({exc}); another agent may have written the same "
                    "paths since: rerun_subagent it on the new head"
                )
            return None

        total = len(candidates)
        done_count = 0

        def progress(outcome: JoinOutcome) -> None:
            nonlocal done_count
            done_count += 1
            if on_progress is not None:
                message = f"{outcome.agent_id}: {outcome.outcome}"
                anyio.from_thread.run_sync(on_progress, done_count, total, message)

        joiner = Joiner(ctx.repo)
        outcomes = await anyio.to_thread.run_sync(
            lambda: joiner.merge(
                candidates,
                dry_run=request.dry_run,
                can_land=can_land,
                on_progress=progress,
            )
        )
        for candidate, outcome in zip(candidates, outcomes, strict=True):
            agent = by_id[candidate.agent_id]
            result = AgentMergeResult(
                agent_id=agent.agent_id,
                name=agent.name,
                outcome=outcome.outcome,
                commit=outcome.commit,
                conflicts=list(outcome.conflicts),
                reason=outcome.reason,
                diffstat=outcome.diffstat,
            )
            results.append(result)
            if request.dry_run:
                continue
            if result.outcome == MergeOutcome.MERGED:
                await self._after_merge(ctx, agent, result.commit)
            elif result.outcome == MergeOutcome.CONFLICTED:
                ctx.store.update_agent(
                    agent.agent_id,
                    "conflicted",
                    ", ".join(result.conflicts),
                    status=AgentStatus.CONFLICTED,
                    status_reason="conflicts with the canonical head in "
                    + ", ".join(result.conflicts)
                    + ": rerun_subagent re-runs it on the new head",
                    conflicts=result.conflicts,
                )
        head = await anyio.to_thread.run_sync(ctx.repo.head_commit)
        total_stat = DiffStat()
        for r in results:
            if r.outcome in (MergeOutcome.MERGED, MergeOutcome.CLEAN):
                total_stat = DiffStat(
                    files=total_stat.files + r.diffstat.files,
                    insertions=total_stat.insertions + r.diffstat.insertions,
                    deletions=total_stat.deletions + r.diffstat.deletions,
                    paths=[*total_stat.paths, *r.diffstat.paths],
                )
        return MergeResult(
            run_id=request.run_id,
            dry_run=request.dry_run,
            agents=results,
            head=head,
            branch=ctx.repo.head_branch(),
            diffstat=total_stat,
        )

    @staticmethod
    def _merge_precheck(agent: AgentRecord) -> str | None:
        if agent.status.active:
            return f"it is still {agent.status.value}; wait for it (get_status wait_s) or cancel it"
        if agent.status == AgentStatus.MERGED:
            return "already merged"
        if agent.status == AgentStatus.DISCARDED:
            return "discarded"
        if agent.lease_lost:
            return (
                "its write lease was lost while it ran, so its writes are not fenced: "
                "rerun_subagent it"
            )
        return None

    async def _merge_empty(
        self, ctx: RepoContext, agent: AgentRecord, *, dry_run: bool
    ) -> AgentMergeResult:
        if not dry_run:
            await self._after_merge(ctx, agent, None)
        return AgentMergeResult(
            agent_id=agent.agent_id,
            name=agent.name,
            outcome=MergeOutcome.CLEAN if dry_run else MergeOutcome.MERGED,
            reason="no changes to merge",
        )

    async def _after_merge(self, ctx: RepoContext, agent: AgentRecord, commit: str | None) -> None:
        """Landed: remove its workspace (retention), record it merged, then release its leases.

        Recorded before the leases go, so that no server can take them over for it in between
        (a server adopting a dead server's leases checks the status after taking them)."""
        await self._remove_workspace(ctx, agent)
        ctx.store.update_agent(
            agent.agent_id,
            "merged",
            commit or "no changes",
            status=AgentStatus.MERGED,
            status_reason=f"merged as {commit[:12]}" if commit else "nothing to merge",
            workspace=None,
        )
        await self._release_leases(ctx, agent)
        self._signal_released(agent.agent_id)

    def _signal_released(self, agent_id: str) -> None:
        runtime = self._runtimes.get(agent_id)
        if runtime is not None:
            runtime.released.set()

    async def _release_leases(self, ctx: RepoContext, agent: AgentRecord) -> None:
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
        # whatever else the holder still holds goes too: a grant another server took for it
        # (the sweep that makes a merge or discard leave no lease behind, whoever kept it)
        held = [lease for lease in await ctx.leases.table() if lease.holder == holder]
        if held:
            await ctx.leases.break_holder(holder, immediate=True)

    async def _remove_workspace(self, ctx: RepoContext, agent: AgentRecord) -> None:
        if agent.workspace is None or not Path(agent.workspace).exists():
            return
        workspace = _workspace_of(agent)
        await anyio.to_thread.run_sync(
            lambda: ws_mod.remove_workspace(
                ctx.repo, workspace, delete_branch=self.settings.delete_merged_branches
            )
        )

    async def _discard(
        self, ctx: RepoContext, agent: AgentRecord, *, dry_run: bool
    ) -> AgentMergeResult:
        if agent.status.active:
            raise InvalidState(
                f"discard: {agent.agent_id} is still {agent.status.value}; cancel it first"
            )
        if agent.status == AgentStatus.MERGED:
            raise InvalidState(f"discard: {agent.agent_id} is already merged")
        if not dry_run and agent.status != AgentStatus.DISCARDED:
            await self._remove_workspace(ctx, agent)
            ctx.store.update_agent(
                agent.agent_id,
                "discarded",
                "explicit discard",
                status=AgentStatus.DISCARDED,
                status_reason="discarded by merge_results(discard=...); its branch "
                + (agent.branch or "")
                + " is kept",
                workspace=None,
            )
            await self._release_leases(ctx, agent)  # after the record, as for a merge
            self._signal_released(agent.agent_id)
        return AgentMergeResult(
            agent_id=agent.agent_id,
            name=agent.name,
            outcome=MergeOutcome.DISCARDED,
            reason="explicitly discarded",
        )

    # --- rerun ------------------------------------------------------------------------------

    async def rerun(
        self, agent_id: str, instructions: str | None = None, repo: Path | None = None
    ) -> RerunResult:
        """A new agent for the same task on the current head, told what was rejected and why."""
        ctx = await self._context_of_agent(agent_id, repo)
        old = self._agent(ctx, agent_id)
        if old.status.active:
            raise InvalidState(
                f"{agent_id} is still {old.status.value}; cancel it first or wait for it"
            )
        if old.status in (AgentStatus.MERGED, AgentStatus.DISCARDED):
            raise InvalidState(f"{agent_id} is {old.status.value}; nothing to rerun")
        run = self._run(ctx, old.run_id)
        # an interrupted or cancelled agent that committed work is resumed from it; one
        # without work simply starts over on the current head
        resume = old.status in (
            AgentStatus.INTERRUPTED,
            AgentStatus.CANCELLED,
        ) and _has_work(old.commit, old.base_commit)
        head = await anyio.to_thread.run_sync(ctx.repo.head_commit)
        context = await anyio.to_thread.run_sync(
            self._rerun_context, ctx, old, instructions, resume
        )
        index = len(ctx.store.agents(run.run_id)) + 1
        new_id = f"{run.run_id}-a{index}"
        new = AgentRecord(
            agent_id=new_id,
            run_id=run.run_id,
            index=index,
            name=f"{old.name}-r{index}",
            prompt=old.prompt,
            write_scope=old.write_scope,
            model=old.model,
            max_turns=old.max_turns,
            base_commit=old.base_commit if resume and old.commit else head,
            start_commit=(old.commit or old.base_commit) if resume else head,
            owner=ctx.store.server_id,
            rerun_of=old.agent_id,
            rerun_context=context,
            lease_holder=new_id,
        )
        await self._release_leases(ctx, old)
        ctx.store.add_agent(new)
        self.task_group.start_soon(self._agent_task, ctx, self._register_runtime(new_id))
        self.task_group.start_soon(self._discard_when_running, ctx, old.agent_id, new_id)
        return RerunResult(
            run_id=run.run_id,
            replaces=old.agent_id,
            agent=self._brief(self._agent(ctx, new_id)),
            base_commit=new.start_commit or head,
        )

    async def _discard_when_running(self, ctx: RepoContext, old_id: str, new_id: str) -> None:
        while self._agent(ctx, new_id).status in (AgentStatus.QUEUED, AgentStatus.WAITING):
            await ctx.store.wait_for_change(ctx.store.cursor(), 1.0)
        old = self._agent(ctx, old_id)
        if old.status not in (AgentStatus.MERGED, AgentStatus.DISCARDED):
            await self._remove_workspace(ctx, old)
            ctx.store.update_agent(
                old_id,
                "discarded",
                f"replaced by {new_id}",
                status=AgentStatus.DISCARDED,
                status_reason=f"replaced by {new_id} (rerun_subagent); its branch is kept",
                workspace=None,
            )
            self._signal_released(old_id)

    def _rerun_context(
        self, ctx: RepoContext, old: AgentRecord, instructions: str | None, resume: bool
    ) -> str:
        parts: list[str] = []
        if resume:
            parts.append(
                f"An earlier attempt ({old.agent_id}) was {old.status.value} before it finished. "
                "Its work so far is already in your copy of the repository: check what is done "
                "and complete the task."
            )
        else:
            parts.append(
                f"An earlier attempt at this task ({old.agent_id}) was rejected: "
                + (old.status_reason or old.status.value)
                + ". You start from the current head of the branch, which may include other "
                "agents' merged work. Redo the task so that it fits the current code."
            )
            if _has_work(old.commit, old.base_commit):
                diff = ctx.repo.git(
                    "diff", "--no-ext-diff", "--no-textconv", old.base_commit, old.commit
                )
                if len(diff) > MAX_REJECTED_DIFF_CHARS:
                    diff = diff[:MAX_REJECTED_DIFF_CHARS] + "\n… (diff truncated)"
                parts.append(f"The rejected diff:\n```diff\n{diff}\n```")
            if old.conflicts:
                parts.append("It conflicted in: " + ", ".join(old.conflicts))
        if instructions:
            parts.append(f"Extra instructions from the coordinator:\n{instructions.strip()}")
        return "\n\n".join(parts)


# a status question: (run_id, the sorted agent_ids or None)
_StatusAsked = tuple[str | None, tuple[str, ...] | None, int | None]
# what a lease's view shows: (holder, token, resource, mode, expires in whole seconds)
_LeaseShown = tuple[str, int, str, str, float]


@dataclass(frozen=True)
class _StatusRead:
    """What status answers are built from, read at `at` (time.monotonic()), all at once."""

    at: float
    cursor: int
    lease_views: dict[_LeaseShown, LeaseView]
    lease_keys: tuple[_LeaseShown, ...]
    leases_by_holder: dict[str, list[LeaseView]]
    budgets: dict[str, tuple[int, int, int]]  # run_id -> (total, used, reserved)


@dataclass(frozen=True)
class _BuiltView:
    """An agent's status view and what it was built from."""

    record: AgentRecord
    leases: list[LeaseView]
    view: AgentView


def _agent_view(
    built: dict[str, _BuiltView], agent: AgentRecord, leases: list[LeaseView]
) -> AgentView:
    """The agent's status view: the one built last time while its record and leases are the same.

    The record is compared by identity: the store's snapshot hands out the same record object
    until the agent's stored row changes, and a changed row is parsed into a new object. Leases
    come from the lease table on each call and are compared by value (a held lease's expiry
    moves, so its holder's view is rebuilt)."""
    last = built.get(agent.agent_id)
    if last is not None and last.record is agent and last.leases == leases:
        return last.view
    view = AgentView.model_construct(
        agent_id=agent.agent_id,
        run_id=agent.run_id,
        name=agent.name,
        status=agent.status,
        status_reason=agent.status_reason,
        turns=agent.turns,
        max_turns=agent.max_turns,
        tokens=agent.tokens,
        write_scope=agent.write_scope,
        waits_for=agent.waits_for if agent.status.active else [],
        leases=leases,
        lease_lost=agent.lease_lost,
        changed_files=agent.changed_files,
        model=agent.model,
        base_commit=agent.base_commit,
        branch=agent.branch,
        rerun_of=agent.rerun_of,
        result=agent.result.view() if agent.result is not None else None,
    )
    built[agent.agent_id] = _BuiltView(agent, leases, view)
    return view


def lease_expires_in(lease: Lease, now: float) -> float:
    """How long until `lease` expires, as status shows it: whole seconds (the TTL is tens of
    seconds, renewed every third of it)."""
    return float(round(lease.expires_at - now))


def _has_work(commit: str | None, base_commit: str) -> TypeGuard[str]:
    """Whether an agent's branch holds committed work: a commit other than its base."""
    return bool(commit) and commit != base_commit


def _scope_freed(agent: AgentRecord) -> bool:
    """Whether a later wave may start: the agent was merged or discarded, or it ended without
    any work to merge (its leases are then released at once)."""
    if agent.status in (AgentStatus.MERGED, AgentStatus.DISCARDED):
        return True
    ended_empty = agent.status in (
        AgentStatus.FAILED,
        AgentStatus.CANCELLED,
        AgentStatus.INTERRUPTED,
    ) and not _has_work(agent.commit, agent.base_commit)
    return ended_empty


def _workspace_of(agent: AgentRecord) -> ws_mod.Workspace:
    """The agent's worktree as the workspace module describes it, from the durable record."""
    return ws_mod.Workspace(
        path=Path(agent.workspace or ""),
        branch=agent.branch or "",
        base_commit=agent.base_commit,
        run_id=agent.run_id,
        agent_id=agent.agent_id,
    )


def _first_line(text: str, limit: int = 72) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


__all__ = ["ConfigError", "OrchestrationError", "Orchestrator"]
