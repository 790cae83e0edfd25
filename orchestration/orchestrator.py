"""The orchestrator: spawns runs of subagents, reports their status, joins and reruns them.

A facade over the engine's parts, each owning one job: `planner` (a run before it starts),
`runner` (one agent, from its wave to its result), `registry` (the agents this process runs),
`recovery` (what dead servers left), `merger` (the join and discards), `status_view` (status
answers and their caches). One anyio task group owns every agent; each agent has its own cancel
scope. Cancellation we ask for becomes a `cancelled` agent; the server stopping under an agent
makes it `interrupted`, with its work committed on its branch.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar, cast

import anyio
import anyio.abc

from orchestration import estimates, planner
from orchestration import workspace as ws_mod
from orchestration.attention import WakeOn
from orchestration.caching import PrefixWarmup
from orchestration.caps import ServerCaps
from orchestration.clock import SYSTEM_CLOCK, Clock, Timing
from orchestration.config import Settings
from orchestration.context import RepoContext, find_agent, find_run
from orchestration.contracts import (
    AgentStatus,
    Approval,
    CancelResult,
    MergeRequest,
    MergeResult,
    RerunResult,
    SpawnRequest,
    SpawnResult,
    StatusResult,
)
from orchestration.errors import (
    AgentNotFound,
    ConfigError,
    InvalidRequest,
    InvalidState,
    NotFound,
    OrchestrationError,
    RepositoryError,
)
from orchestration.executors import Executor, make_executor
from orchestration.merger import Merger
from orchestration.models import AGENTS_PER_MODEL, ModelFactory, ModelPool, default_model_factory
from orchestration.prompts import shared_prefix
from orchestration.records import brief, has_work, replaces_its_agent, reruns_of
from orchestration.recovery import Recovery
from orchestration.registry import AgentRegistry, LeaseFence
from orchestration.runner import AgentRunner
from orchestration.state import AgentRecord, EventKind, SharedSnapshot, StateStore
from orchestration.status_view import StatusView, lease_expires_in
from toolbus.external import ExternalServerError, ExternalTool, ExternalTools
from toolbus.leases import LeaseKeeper, LeaseManager, LeaseStore
from toolbus.shared_reads import SharedReadLeases

_T = TypeVar("_T")
log = logging.getLogger("fanout.orchestrator")

MAX_REJECTED_DIFF_CHARS = 30_000


class Orchestrator:
    """Spawn, watch, cancel, merge and rerun subagents; one instance per server process."""

    def __init__(
        self,
        settings: Settings,
        model_factory: ModelFactory | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        timing: Timing | None = None,
        external: ExternalTools | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.timing = timing or Timing()
        self._models = ModelPool(
            model_factory or default_model_factory(settings), max_pause_s=settings.retry_after_cap_s
        )
        self._registry = AgentRegistry()
        self._caps = ServerCaps(settings.max_running, settings.server_budget_tokens)
        self._caps.pacing = self._models.pacing
        self._runner = AgentRunner(
            settings,
            self._registry,
            self._models,
            caps=self._caps,
            clock=clock,
            start_soon=self._start_soon,
            external=external,
            executor=make_executor(settings, self._start_soon),
        )
        self._recovery = Recovery(self._registry, self._runner, self.timing)
        self._merger = Merger(settings, self._registry)
        self._runner.replace_rerun = self._merger.replace
        self._contexts: dict[Path, RepoContext] = {}
        self._views: dict[Path, StatusView] = {}
        self._discovered: dict[Path, ws_mod.GitRepo] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._context_lock = anyio.Lock()
        self._rerun_lock = anyio.Lock()
        self._closing = False

    @property
    def executor(self) -> Executor:
        """Where this server's agents run."""
        return self._runner.executor

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
                if ctx.shared_reads is not None:
                    ctx.shared_reads.close()
                try:
                    ctx.store.unregister_server()
                finally:
                    ctx.store.close()
                    ctx.leases.store.close()
            await self._models.aclose()

    @property
    def task_group(self) -> anyio.abc.TaskGroup:
        if self._tg is None:
            raise RuntimeError("use the Orchestrator as an async context manager")
        return self._tg

    def _start_soon(self, func: Callable[..., object], *args: object) -> None:
        self.task_group.start_soon(func, *args)  # pyright: ignore[reportArgumentType]

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
            store = StateStore(git_repo.state_dir, stale_s=self.timing.server_stale_s)
            lease_store = LeaseStore(
                git_repo.state_dir,
                ttl_s=self.settings.lease_ttl_s,
                lock_delay_s=self.settings.lease_lock_delay_s,
            )
            leases = LeaseManager(lease_store)
            keeper = LeaseKeeper(leases)
            ctx = RepoContext(repo=git_repo, store=store, leases=leases, keeper=keeper)
            ctx.shared_reads = SharedReadLeases(
                leases, keeper, f"{store.server_id}:mcp-reads", self._start_soon
            )
            store.register_server()
            await self.task_group.start(keeper.run)
            self.task_group.start_soon(self._recovery.heartbeat, ctx)
            self.task_group.start_soon(self._watch_cancel_requests, ctx)
            await self._recovery.on_open(ctx)
            # which workspaces this process can make here: its probe mounts a trial view, once
            # per repository (the answer is kept), so that the first spawn does not wait for it
            try:
                await anyio.to_thread.run_sync(
                    ws_mod.view_support, git_repo, self.settings.workspaces
                )
            except OSError as exc:  # spawn asks again, and says what is wrong
                log.warning("probing workspaces in %s: %s", git_repo.root, exc)
            self._views[git_repo.root] = StatusView(
                ctx,
                caps=self._caps,
                clock=self.clock,
                timing=self.timing,
                start_soon=self._start_soon,
            )
            self._contexts[git_repo.root] = ctx
            return ctx

    # --- spawn ------------------------------------------------------------------------------

    async def spawn(self, request: SpawnRequest, default_repo: Path | None = None) -> SpawnResult:
        """Validate, pin the snapshot, create the agents and start them; returns at once."""
        settings = self.settings
        ctx = await self.context(request.repo or default_repo)
        for name in {t.model or settings.model for t in request.tasks}:
            self._models.first(name)  # a missing API key fails here, before anything is created
        names = [t.name or f"agent-{i + 1}" for i, t in enumerate(request.tasks)]
        if len(set(names)) != len(names):
            raise InvalidRequest("tasks[].name: names must be unique within a run")
        executor = self._runner.executor
        unoffered: list[str] = []
        if executor.offers_mcp:
            servers, mcp_tools = await self._downstream(request)
        elif request.mcp_servers:
            raise InvalidRequest(
                f"mcp_servers: agents run by the {executor.name} executor get no downstream MCP "
                "servers yet; spawn with mcp_servers=[] or run the server with "
                "FANOUT_EXECUTOR=in-process"
            )
        else:
            servers, mcp_tools = [], []
            external = self._runner.external
            unoffered = external.servers() if external is not None else []
        await executor.prepare()
        run_id = f"r{secrets.token_hex(4)}"
        sandbox_problem = await planner.sandbox_problem(settings)
        shared_spec = request.shared_context

        pinned: list[str] = []

        def based() -> tuple[ws_mod.Snapshot, tuple[SharedSnapshot, list[str]]]:
            # the base (git status, a child process), its shared context, then its reference:
            # one after the other, with no turn of the event loop between them, and the
            # reference last, so that a shared file the base lacks leaves none
            snap = ws_mod.snapshot(ctx.repo, run_id, pin=False)
            shared = planner.shared_snapshot(
                ctx.repo,
                snap.base_commit,
                shared_spec.plan if shared_spec else None,
                shared_spec.conventions if shared_spec else None,
                shared_spec.files if shared_spec else [],
            )
            ws_mod.pin_snapshot(ctx.repo, run_id, snap.base_commit)
            pinned.append(run_id)
            return snap, shared

        # the base, the ids in use, the workspace kind, the history of earlier runs, what runs
        # the agents (a cluster's executor asks its cluster) and what commands run in: each
        # waits on git, the database, the cluster or the file system, none on another
        try:
            async with _InThreads() as calls:
                based_of = calls.start(based)
                known_of = calls.start(ctx.store.agent_ids)
                support_of = calls.start(
                    functools.partial(ws_mod.view_support, ctx.repo, self.settings.workspaces)
                )
                history_of = calls.start(functools.partial(estimates.history, ctx.store))
                running_on_of = calls.start(executor.describe)
                sandbox_of = calls.start(
                    functools.partial(planner.sandbox_warnings, settings, sandbox_problem)
                )
            snap, (shared, paths) = based_of.value()
            known, support, history = known_of.value(), support_of.value(), history_of.value()
            run = planner.new_run(
                settings,
                request,
                run_id,
                snap,
                shared,
                repo=str(ctx.repo.root),
                owner=ctx.store.server_id,
                now=self.clock.time(),
                mcp_servers=servers,
            )
            agents = planner.new_agents(settings, request, run, names, known=known)
            warnings = [
                *planner.base_warnings(snap),
                *sandbox_of.value(),
                *await planner.spawn_warnings(ctx.leases, agents),
            ]
            repeat = planner.repeat_warning(history, run_id, agents, run.created_at)
            if repeat is not None:
                warnings.insert(0, repeat)
            if unoffered:
                warnings.append(
                    f"the downstream MCP servers ({', '.join(unoffered)}) are not offered to "
                    f"agents run by the {executor.name} executor"
                )
            running_on = running_on_of.value()
            if support.kind != "overlay" and "FANOUT_WORKSPACES" not in support.note:
                warnings.append(
                    f"each agent gets a full checkout ({support.note}); copy-on-write views "
                    "would cost only what the agent changes"
                )
            prefix = shared_prefix(shared, paths)
            estimate, first_request = estimates.estimate(
                run,
                agents,
                prefix=prefix,
                cal=estimates.calibrate(history),
                ttl_setting=settings.cache_ttl,
                min_tokens_override=settings.cache_min_tokens,
                warmup=settings.cache_warmup_max_s > 0,
            )
            run = run.model_copy(
                update={
                    "estimate_tokens": estimate.estimated_total_tokens,
                    "cache_ttl": estimate.cache_ttl,
                    "cache_note": estimate.prompt_cache,
                    "first_request_tokens": first_request,
                }
            )
            if estimate.estimated_total_tokens > run.budget_tokens:
                warnings.append(
                    f"the estimate ({estimate.estimated_total_tokens} tokens) exceeds the budget "
                    f"({run.budget_tokens}); agents stop with budget_exhausted when it is spent"
                )
            ctx.store.create_run(run, agents)
        except BaseException:
            if pinned:  # the run is not made: its base's reference goes too
                with anyio.CancelScope(shield=True):
                    try:
                        await anyio.to_thread.run_sync(ws_mod.unpin_snapshot, ctx.repo, run_id)
                    except Exception:  # (the spawn's own failure is the one to report)
                        log.warning("spawn: unpinning the base of %s failed", run_id, exc_info=True)
            raise
        ctx.limiters[run_id] = anyio.CapacityLimiter(run.max_concurrency)
        ctx.prefixes[run_id] = prefix
        ctx.workspace_kinds[run_id] = support.kind
        if estimate.cache_ttl is not None and settings.cache_warmup_max_s > 0:
            ctx.warmups[run_id] = PrefixWarmup(settings.cache_warmup_max_s, self.clock.monotonic)
        # Runtimes are registered before any task starts (cancel sees them at once); the tasks
        # start in spawn order, and no agent's turn runs before spawn returns.
        runtimes = [self._registry.run_here(agent.agent_id) for agent in agents]
        self._runner.start_run(ctx, runtimes)
        briefs = [brief(a) for a in agents]
        return SpawnResult(
            run_id=run_id,
            repo=str(ctx.repo.root),
            base_commit=snap.base_commit,
            snapshot_of_uncommitted_changes=snap.dirty,
            agents=briefs,
            estimate=estimate,
            warnings=warnings,
            permissions=self._runner.policy(run, agents[0]).describe()
            + ("; tasks narrow it further" if any(a.permissions for a in agents) else ""),
            mcp_tools=[tool.name for tool in mcp_tools],
            executor=running_on,
        )

    async def _downstream(self, request: SpawnRequest) -> tuple[list[str], list[ExternalTool]]:
        """The downstream MCP servers a run gets, and their tools; refuses a server that is not
        configured or cannot be listed, naming it."""
        external = self._runner.external
        configured = external.servers() if external is not None else []
        wanted = configured if request.mcp_servers is None else list(request.mcp_servers)
        unknown = sorted(set(wanted) - set(configured))
        if unknown:
            have = ", ".join(configured) or "none (FANOUT_MCP_CONFIG names none)"
            raise InvalidRequest(
                f"mcp_servers: {', '.join(unknown)} not configured; the servers are: {have}"
            )
        if not wanted or external is None:
            return [], []
        try:
            return wanted, await external.list_tools(wanted)
        except ExternalServerError as exc:
            raise InvalidRequest(
                f"mcp_servers: {exc}; fix the server, or spawn without it (mcp_servers=[...])"
            ) from None

    # --- approvals --------------------------------------------------------------------------

    async def pending_approvals(self, repo: Path | None = None) -> list[Approval]:
        """The calls that wait for the person's answer, oldest first."""
        ctx = await self.context(repo)
        found = [
            a.approval
            for a in await anyio.to_thread.run_sync(ctx.store.all_agents)
            if a.approval is not None and a.approval.decision is None and a.status.active
        ]
        return sorted(found, key=lambda a: a.requested_at)

    async def answer_approval(
        self, approval_id: str, allow: bool, note: str | None, *, by: str, repo: Path | None = None
    ) -> Approval:
        """Answer a pending approval once; the agent's call goes on (or is refused) at once."""
        agent_id, sep, _ = approval_id.rpartition("-p")
        if not sep or not agent_id:
            raise InvalidRequest(
                f"approval_id {approval_id!r} is not an approval id; get_status lists the "
                "pending ones (an agent's `approval`)"
            )
        ctx = await self._context_of_agent(agent_id, repo)
        decided = ctx.store.decide_approval(agent_id, approval_id, allowed=allow, by=by, note=note)
        if decided is not None:
            return decided
        current = find_agent(ctx, agent_id).approval
        if current is not None and current.approval_id == approval_id and current.decision:
            if current.decision == ("allowed" if allow else "refused"):
                return current  # the same answer again (the person, asked within this call)
            raise InvalidState(
                f"approval {approval_id} was already answered: {current.decision} by {current.by}"
            )
        raise InvalidState(
            f"approval {approval_id} is not pending (answered, timed out, or its agent stopped); "
            "get_status lists the pending ones"
        )

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
        to do after `since` (`wake_on`, see `orchestration.wakeup`), at most `wait_s` (capped by
        the settings). See `StatusView.answer`."""
        called = self.clock.monotonic()
        wait = 0.0
        deadline: float | None = None  # on anyio's clock
        if since is not None and wait_s:
            wait = min(max(wait_s, 0.0), self.settings.status_wait_cap_s)
            deadline = anyio.current_time() + wait
        ctx = await (self._status_context(run_id, repo) if run_id else self.context(repo))
        return await self._views[ctx.repo.root].answer(
            run_id=run_id,
            agent_ids=agent_ids,
            since=since,
            wake_on=wake_on,
            called=called,
            deadline=deadline,
            wait=wait,
        )

    async def _status_context(self, run_id: str, repo: Path | None) -> RepoContext:
        """`_context_of_run` for a status poll: finds the run in the stores' snapshots."""
        for ctx in self._contexts.values():
            if ctx.store.runs_snapshot(run_id):
                return ctx
        ctx = await self.context(repo)
        if not ctx.store.runs_snapshot(run_id):
            find_run(ctx, run_id)  # raises RunNotFound
        return ctx

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
            runtime = self._registry.running_here(agent.agent_id)
            if runtime is not None:
                runtime.cancel()
            else:
                if live is None:
                    live = ctx.store.live_servers()
                if agent.owner in live:
                    # run by another live server: it cancels the agent when it sees the request
                    ctx.store.request_cancel(
                        agent.agent_id,
                        ctx.store.server_id,
                        "cancel requested from another server; the server running it stops it",
                    )
                else:
                    orphans = True
            stopping.add(agent.agent_id)
        if orphans:
            await self._recovery.recover_agents(
                ctx
            )  # their server is gone: they become interrupted
        with anyio.move_on_after(self.timing.cancel_wait_s):  # then the answer shows where they are
            await self._await_final(ctx, run_id, stopping)
        refreshed = [find_agent(ctx, a.agent_id) for a in agents]
        return CancelResult(run_id=run_id, agents=[brief(a) for a in refreshed])

    async def _watch_cancel_requests(self, ctx: RepoContext) -> None:
        """Cancel the agents this process runs for which another server recorded a request."""
        seen = ctx.store.cursor()
        while True:
            await anyio.sleep(self.timing.cancel_poll_s)
            try:
                requests = ctx.store.events_of_kind(EventKind.CANCEL_REQUESTED, since=seen)
            except Exception:  # (the state busy, say): the next poll reads again; the watch,
                # a task of the server's, must not take the server down with it
                log.exception("reading the cancel requests of %s failed", ctx.repo.root)
                continue
            for seq, agent_id, detail in requests:
                seen = max(seen, seq)
                runtime = self._registry.running_here(agent_id)
                if runtime is not None:
                    runtime.cancel(f"cancelled by cancel_subagents from another server ({detail})")

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
        return await self._merger.merge(ctx, request, on_progress)

    # --- rerun ------------------------------------------------------------------------------

    async def rerun(
        self, agent_id: str, instructions: str | None = None, repo: Path | None = None
    ) -> RerunResult:
        """A new agent for the same task on the current head, told what was rejected and why.
        One at a time: of two calls for one agent at once (a client's retry, say), one makes
        the rerun and the other is told of it."""
        async with self._rerun_lock:
            return await self._rerun(agent_id, instructions, repo)

    async def _rerun(
        self, agent_id: str, instructions: str | None, repo: Path | None
    ) -> RerunResult:
        ctx = await self._context_of_agent(agent_id, repo)
        old = find_agent(ctx, agent_id)
        if old.status.active:
            raise InvalidState(
                f"{agent_id} is still {old.status.value}; cancel it first or wait for it"
            )
        if old.status.closed:
            raise InvalidState(f"{agent_id} is {old.status.value}; nothing to rerun")
        run = find_run(ctx, old.run_id)
        # an interrupted or cancelled agent that committed work is resumed from it; one
        # without work simply starts over on the current head
        resume = old.status in (
            AgentStatus.INTERRUPTED,
            AgentStatus.CANCELLED,
        ) and has_work(old.commit, old.base_commit)
        _refuse_second_rerun(ctx, old)
        head = await anyio.to_thread.run_sync(ctx.repo.head_commit)
        context = await anyio.to_thread.run_sync(rerun_context, ctx, old, instructions, resume)
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
            depends_on=old.depends_on,
            resources=old.resources,
            network=old.network,
            permissions=old.permissions,
        )
        await self._registry.release_leases(ctx, old)
        ctx.store.add_agent(new)
        self._runner.start(ctx, self._registry.run_here(new_id))
        self.task_group.start_soon(self._merger.replace_when_running, ctx, old.agent_id, new_id)
        return RerunResult(
            run_id=run.run_id,
            replaces=old.agent_id,
            agent=brief(find_agent(ctx, new_id)),
            base_commit=new.start_commit or head,
        )

    # --- look-ups ---------------------------------------------------------------------------

    async def _context_of_run(self, run_id: str, repo: Path | None) -> RepoContext:
        """The context of the repository that has the run (RunNotFound if none has it)."""
        return await self._context_holding(run_id, repo, find_run)

    async def _context_of_agent(self, agent_id: str, repo: Path | None) -> RepoContext:
        """The context of the repository that has the agent (AgentNotFound if none has it)."""
        return await self._context_holding(agent_id, repo, find_agent)

    async def _context_holding(
        self, key: str, repo: Path | None, find: Callable[[RepoContext, str], object]
    ) -> RepoContext:
        for ctx in self._contexts.values():
            with contextlib.suppress(NotFound):
                find(ctx, key)
                return ctx
        ctx = await self.context(repo)
        find(ctx, key)  # raises NotFound, naming what is missing
        return ctx


def _refuse_second_rerun(ctx: RepoContext, old: AgentRecord) -> None:
    """`InvalidState` when `old` has a rerun already that was not discarded and did not end
    before it ran: it replaces `old` once it starts (until then `old` keeps its status), and
    a second rerun would redo the same task in the same scope beside it."""
    agents = {a.agent_id: a for a in ctx.store.agents(old.run_id)}
    later = reruns_of(agents.values()).get(old.agent_id)
    newer = agents.get(later) if later is not None else None
    if newer is None or not replaces_its_agent(newer):
        return
    raise InvalidState(
        f"{old.agent_id} is already rerun as {later} ({newer.name}, {newer.status.value}), "
        f"which replaces it; follow that one with get_status, and to redo the task again, "
        f'rerun_subagent(agent_id="{later}") once it has ended'
    )


def _current_versions(ctx: RepoContext, paths: list[str]) -> str:
    """The files a stale attempt read, as they are now on the canonical branch (bounded)."""
    head = ctx.repo.head_commit()
    shown: list[str] = [
        "It read files that changed after it started; this is how they are now (re-read them "
        "before relying on them):"
    ]
    room = MAX_REJECTED_DIFF_CHARS
    for path in paths:
        found = ctx.repo.blob_at(head, path)
        if found is None:
            shown.append(f"- {path}: deleted since")
            continue
        text = ctx.repo.git("cat-file", "blob", found[0])
        if "\x00" in text:
            shown.append(f"- {path}: a binary file")
            continue
        if len(text) > room:
            shown.append(f"- {path}: {found[1]} bytes, not shown here (read it)")
            continue
        room -= len(text)
        shown.append(f"- {path}:\n```\n{text}\n```")
    return "\n".join(shown)


def rerun_context(
    ctx: RepoContext, old: AgentRecord, instructions: str | None, resume: bool
) -> str:
    """What a rerun is told of the attempt it replaces: resumed work, or the rejected diff."""
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
        if has_work(old.commit, old.base_commit):
            diff = ctx.repo.git(
                "diff", "--no-ext-diff", "--no-textconv", old.base_commit, old.commit
            )
            if len(diff) > MAX_REJECTED_DIFF_CHARS:
                diff = diff[:MAX_REJECTED_DIFF_CHARS] + "\n… (diff truncated)"
            parts.append(f"The rejected diff:\n```diff\n{diff}\n```")
        if old.conflicts:
            parts.append("It conflicted in: " + ", ".join(old.conflicts))
        if old.stale_reads:
            parts.append(_current_versions(ctx, old.stale_reads))
    if instructions:
        parts.append(f"Extra instructions from the coordinator:\n{instructions.strip()}")
    return "\n\n".join(parts)


__all__ = [
    "AGENTS_PER_MODEL",
    "ConfigError",
    "LeaseFence",
    "ModelFactory",
    "OrchestrationError",
    "Orchestrator",
    "RepoContext",
    "lease_expires_in",
]


class _Call(Generic[_T]):
    """One call of `_InThreads`: its result once the group has ended."""

    def __init__(self) -> None:
        self._value: _T | None = None
        self._set = False

    def value(self) -> _T:
        if not self._set:
            raise RuntimeError("the call has not ended")
        return cast(_T, self._value)

    def set(self, value: _T) -> None:
        self._value, self._set = value, True


class _InThreads:
    """Calls run at once, each in a worker thread, their results read once the group has
    ended (`async with`); when calls fail, the first of them (in start order) raises then."""

    def __init__(self) -> None:
        self._failures: list[tuple[int, Exception]] = []
        self._started = 0
        self._group = anyio.create_task_group()

    async def __aenter__(self) -> _InThreads:
        await self._group.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._group.__aexit__(*exc_info)
        if self._failures:
            raise min(self._failures, key=lambda f: f[0])[1]

    def start(self, call: Callable[[], _T]) -> _Call[_T]:
        out: _Call[_T] = _Call()
        order = self._started
        self._started += 1

        async def run() -> None:
            try:
                out.set(await anyio.to_thread.run_sync(call))
            except Exception as exc:
                self._failures.append((order, exc))

        self._group.start_soon(run)
        return out
