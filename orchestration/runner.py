"""Running one agent: wait for its wave and leases, make its workspace, run its loop, and
record its result from facts (its commit, the bus's audit) when it ends, however it ends."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anyio

from orchestration import workspace as ws_mod
from orchestration.agent import (
    FILE_TOOLS,
    READ_ONLY_TOOLS,
    AgentLoop,
    Budget,
    LoopOutcome,
    Progress,
    Transcript,
)
from orchestration.caching import PrefixWarmup
from orchestration.caps import ServerCaps
from orchestration.clock import Clock
from orchestration.config import Settings
from orchestration.context import (
    RepoContext,
    SlowTurns,
    find_agent,
    find_run,
    transcript_path,
)
from orchestration.contracts import (
    AgentResult,
    AgentStatus,
    CommandRun,
    FileChange,
    PermissionDecision,
    StopReason,
    TokenUsage,
    shown_path,
)
from orchestration.executors.base import Executor, InProcessExecutor
from orchestration.gate import AgentGate, show_resource_wait
from orchestration.model import signals_start
from orchestration.models import ModelPool
from orchestration.planner import run_prefix
from orchestration.prompts import FINISH_TOOL
from orchestration.records import (
    current_agent,
    first_line,
    has_work,
    reruns_of,
    resumes_work,
    scope_freed,
    scope_requests,
    task_prompt_of,
    workspace_of,
)
from orchestration.registry import AgentRegistry, AgentRuntime, CommitAhead, LeaseFence
from orchestration.retry import RetryPolicy
from orchestration.state import AgentRecord, LastTurn, RunRecord
from toolbus.audit import AuditLog, AuditRecord
from toolbus.bus import AgentBus, agent_tool_specs
from toolbus.errors import LeaseLost
from toolbus.external import ExternalTool, ExternalTools
from toolbus.lease_store import LeaseRequest
from toolbus.permissions import GuardedScope, PermissionPolicy, PermissionRules
from toolbus.resources import WriteScope
from toolbus.terminal import SandboxMode, Terminal, TerminalConfig

log = logging.getLogger("fanout.orchestrator")

# characters of an internal error's text kept in the agent's record and result
INTERNAL_ERROR_SHOWN = 400

StartSoon = Callable[..., None]
T = TypeVar("T")
MAX_DECISIONS = 50  # the permission decisions a result lists (the audit log has them all)


def file_changes(ctx: RepoContext, base: str, commit: str) -> list[FileChange]:
    """The files `commit` changes against `base`, with line counts."""
    pyrepo = ctx.repo.open()
    try:
        found = ws_mod.file_changes(pyrepo, base, commit)
    finally:
        pyrepo.free()
    return found


@contextlib.asynccontextmanager
async def _slot(limiter: anyio.CapacityLimiter) -> AsyncGenerator[None]:
    """A token of `limiter` for the block, taken without yielding to the event loop when one is
    free (`async with limiter` always yields: in a burst of agents, a wait behind every other
    ready one)."""
    try:
        limiter.acquire_nowait()
    except anyio.WouldBlock:
        await limiter.acquire()
    try:
        yield
    finally:
        limiter.release()


async def quick_or_thread(
    call: Callable[[bool], T],
    limiter: anyio.CapacityLimiter | None = None,
    turns: SlowTurns | None = None,
    key: str = "",
) -> T:
    """`call(False)` here, on the event loop, or, when it raises `WouldBlock` (it could wait,
    or take time that grows with the repository or the change), `call(True)` in a worker
    thread. A quick workspace operation (a view's mount, a small commit) costs less CPU than a
    hop to a thread: under load the worker and the event loop hand the GIL to each other at
    every system call the worker makes.

    `turns`: callers of the same `key` (the agents of a run, whose views share a base) that
    found their base not ready take the slow path one at a time, each trying the quick one
    again first: while the first makes what the others wait for (the base's checkout), they
    wait here, not in threads of their own, and then mostly find it quick. What is slow for
    another reason (a worktree's checkout) still goes to threads side by side. While another
    caller of `key` has its turn (the base is being made), a caller waits for its own without
    trying first: that try would fail."""
    if turns is None or not turns.busy(key):
        try:
            return call(False)
        except ws_mod.WouldBlock as exc:
            if turns is None or not isinstance(exc, ws_mod.BaseNotReady):
                return await anyio.to_thread.run_sync(call, True, limiter=limiter)
    async with turns.of(key):
        try:
            return call(False)
        except ws_mod.WouldBlock:
            return await anyio.to_thread.run_sync(call, True, limiter=limiter)


async def commit_work(
    agent: AgentRecord,
    message: str,
    scope: WriteScope | None = None,
    prepared: ws_mod.PreparedCommit | None = None,
) -> ws_mod.WorkCommit:
    """Commit what the agent's worktree holds within its write scope (or `scope`, which may
    also guard paths by the permission policy), on its branch. `prepared`: the commit made
    ahead with that scope, of a view unchanged since (see `ws_mod.commit_workspace`)."""
    workspace = workspace_of(agent)
    scope = scope or WriteScope.of(agent.write_scope)

    def commit(wait: bool) -> ws_mod.WorkCommit:
        return ws_mod.commit_workspace(
            workspace,
            message=f"fanout: {agent.name}: {message}",
            write_scope=scope,
            wait=wait,
            prepared=prepared,
        )

    return await quick_or_thread(commit)


class AgentRunner:
    """Runs agents as tasks of the engine's task group, one cancel scope each."""

    def __init__(
        self,
        settings: Settings,
        registry: AgentRegistry,
        models: ModelPool,
        *,
        caps: ServerCaps,
        clock: Clock,
        start_soon: Callable[..., None],
        external: ExternalTools | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.settings = settings
        self._registry = registry
        self._models = models
        self._caps = caps
        self.clock = clock
        self._start_soon = start_soon
        self.external = external
        self.executor: Executor = executor or InProcessExecutor()
        # discards the agent a rerun replaces (old id, new id), as the rerun starts here; it
        # logs a failure rather than raise it (`Merger.replace`)
        self.replace_rerun: Callable[[RepoContext, str, str], Awaitable[None]] | None = None

    def policy(self, run: RunRecord, agent: AgentRecord) -> PermissionPolicy:
        """The permission policy of one agent: the settings, narrowed by its run and its task."""
        return self.policy_of(self.settings.permissions, run.permissions, agent.permissions)

    @staticmethod
    def policy_of(
        settings: PermissionRules, run: PermissionRules | None, task: PermissionRules | None
    ) -> PermissionPolicy:
        return (
            PermissionPolicy([("settings", settings)]).narrowed("run", run).narrowed("task", task)
        )

    async def external_tools(self, run: RunRecord) -> list[ExternalTool]:
        """The downstream MCP tools the run's agents get (listed once per server and process)."""
        if not run.mcp_servers or self.external is None:
            return []
        return await self.external.list_tools(run.mcp_servers)

    def start(self, ctx: RepoContext, runtime: AgentRuntime) -> None:
        """Start the agent's task (it waits for its wave, leases and a slot first)."""
        self._start_soon(self._agent_task, ctx, runtime)

    def start_run(self, ctx: RepoContext, runtimes: Sequence[AgentRuntime]) -> None:
        """Start a new run's agents. When its first agent makes the run's first request alone
        (`_warmup_gate`) and need not wait for others, the other agents' tasks start only once
        that request has left: until then each would take a turn of the event loop between
        its steps, and none of them could do more than wait."""
        first = find_agent(ctx, runtimes[0].agent_id) if runtimes else None
        warmup = None if first is None else self._warmup_gate(ctx, first)
        if warmup is None or first is None or first.depends_on or first.waits_for:
            for runtime in runtimes:
                self.start(ctx, runtime)
            return
        self.start(ctx, runtimes[0])
        self._start_soon(self._start_once_left, ctx, warmup, list(runtimes[1:]))

    async def _start_once_left(
        self, ctx: RepoContext, warmup: PrefixWarmup, runtimes: list[AgentRuntime]
    ) -> None:
        try:
            await warmup.until_left()
        finally:  # cancelled too: each task then records its agent as it would have
            for runtime in runtimes:
                self.start(ctx, runtime)

    def _warmup_gate(self, ctx: RepoContext, agent: AgentRecord) -> PrefixWarmup | None:
        """The run's warm-up, when its other agents start only after its first request left:
        in this process, with a model that says when its request left."""
        warmup = ctx.warmups.get(agent.run_id)
        if (
            warmup is not None
            and isinstance(self.executor, InProcessExecutor)
            and signals_start(self._models.first(agent.model))
        ):
            return warmup
        return None

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
            warmup = None if record is None else ctx.warmups.get(record.run_id)
            if warmup is not None:
                warmup.starter_stops(agent_id)
            if record is not None and record.status.active:
                with anyio.CancelScope(shield=True):
                    await self._finish_interrupted(ctx, runtime)
            with anyio.CancelScope(shield=True):
                await self._release_extras(ctx, runtime)

    async def _release_extras(self, ctx: RepoContext, runtime: AgentRuntime) -> None:
        """Give back what an agent holds only while it runs: its named resources held for its
        life and its downstream MCP sessions (its write scope stays until merged). Its loop goes
        too: the runtime stays until the agent is merged, and the loop (its messages, its bus)
        refers back to it, a cycle only the cycle collector would free."""
        runtime.drop_ahead()
        runtime.loop = None
        grant, runtime.resource_grant = runtime.resource_grant, None
        if grant is not None:
            ctx.keeper.untrack(grant)
            try:
                await ctx.leases.release(grant)
            except Exception:
                log.exception("agent %s: releasing its resources failed", runtime.agent_id)
        external, runtime.external = runtime.external, None
        if external is not None:
            try:
                await external.aclose()
            except Exception:
                log.exception("agent %s: closing its MCP sessions failed", runtime.agent_id)

    async def _fail_internal(self, ctx: RepoContext, runtime: AgentRuntime, exc: Exception) -> None:
        error = f"internal error: {type(exc).__name__}: {exc}"
        if len(error) > INTERNAL_ERROR_SHOWN:
            # (an exception's text may run long, a copy's list of errors say; every status
            # answer shows it to the orchestrator's model; the log has it whole)
            more = len(error) - INTERNAL_ERROR_SHOWN
            error = f"{error[:INTERNAL_ERROR_SHOWN]}... ({more} more characters in the log)"
        try:
            await self.finish(
                ctx,
                runtime,
                LoopOutcome(StopReason.INTERNAL_ERROR, error=error),
                status=AgentStatus.FAILED,
            )
        except Exception:
            log.exception("recording the failure of %s failed", runtime.agent_id)
            ctx.store.mark_final(
                runtime.agent_id,
                AgentStatus.FAILED,
                error,
                stop_reason=StopReason.INTERNAL_ERROR,
                reason=error,
            )

    async def _run_agent(self, ctx: RepoContext, runtime: AgentRuntime) -> None:
        store = ctx.store
        agent = find_agent(ctx, runtime.agent_id)
        # 0. Wait for the agents it depends on to be merged.
        if agent.depends_on:
            stopped = await self._wait_for_dependencies(ctx, agent)
            if stopped is not None:
                outcome = LoopOutcome(StopReason.CANCELLED, error=stopped)
                await self.finish(ctx, runtime, outcome, status=AgentStatus.CANCELLED)
                return
        # 1. Wait for earlier agents of the run whose write scope overlaps (waves).
        for other_id in agent.waits_for:
            other = self._registry.get(other_id)
            other_record = store.agent(other_id)
            if other_record is None or scope_freed(other_record):
                continue
            store.mark_waiting(
                agent.agent_id,
                f"waits for {other_id}",
                f"waits for {other_record.name} ({other_id}) to be merged or "
                "discarded: their write scopes overlap",
            )
            while True:
                if other is not None:
                    with anyio.move_on_after(1.0):
                        await other.released.wait()
                else:
                    await anyio.sleep(1.0)
                other_record = store.agent(other_id)
                if other_record is None or scope_freed(other_record):
                    break
        # 1b. The run's first agent to get here makes its first request before the others
        # start (see `caching.PrefixWarmup.before_start`): in this process, with a model that
        # says when its request left.
        warmup = self._warmup_gate(ctx, agent)
        if warmup is not None:
            await warmup.before_start(agent.agent_id)
        # 2. Take the write leases of the scope, all at once.
        requests = scope_requests(agent.write_scope)
        fence = LeaseFence(ctx.leases, agent.lease_holder or agent.agent_id)
        runtime.fence = fence
        if requests:
            holder = agent.lease_holder or agent.agent_id

            def on_wait() -> None:
                if warmup is not None:
                    warmup.starter_stops(agent.agent_id)
                store.mark_waiting(
                    agent.agent_id,
                    "waits for leases",
                    "waits for overlapping write leases held by other agents "
                    "(see get_status leases); it starts once they are merged or discarded",
                )

            grant = await ctx.leases.acquire(holder, requests, on_wait=on_wait)
            fence.grant = grant
            ctx.keeper.track(grant, lambda lost: self.on_lease_lost(ctx, runtime, lost))
            store.record_lease(agent.agent_id, grant.token, queued=True)
        # 2b. The named resources it holds for its whole run (after its scope: no cycle).
        held = [r.name for r in agent.resources if r.hold == "agent"]
        if held:
            holder = agent.lease_holder or agent.agent_id
            named = [LeaseRequest.named(name) for name in held]
            runtime.resource_grant = await ctx.leases.acquire(
                holder,
                named,
                on_wait=lambda: show_resource_wait(ctx, agent.agent_id, holder, named, "it"),
            )
            ctx.keeper.track(runtime.resource_grant, lambda lost: None)
        # 3. A concurrency slot.
        limiter = ctx.limiters.get(agent.run_id)
        if limiter is None:
            run = find_run(ctx, agent.run_id)
            limiter = ctx.limiters[agent.run_id] = anyio.CapacityLimiter(run.max_concurrency)
        async with _slot(limiter), _slot(self._caps.slots):  # the run's, then the server's
            await self.executor.run(self, ctx, runtime)

    async def _wait_for_dependencies(self, ctx: RepoContext, agent: AgentRecord) -> str | None:
        """Wait until every agent it depends on (or the rerun that replaced it) is merged; the
        reason it must stop instead when one failed, was cancelled or was discarded."""
        store = ctx.store
        shown: str | None = None
        # A dependency and the reruns that replace it are agents of its run: only those runs are
        # read at each change (parsed again only where they changed), not every agent the
        # repository ever had.
        runs = sorted(
            {found.run_id for dep in agent.depends_on if (found := store.agent(dep)) is not None}
        )
        while True:
            cursor = store.cursor()
            every = {a.agent_id: a for run in runs for a in store.agents_snapshot(run, cursor)}
            reruns = reruns_of(every.values())
            pending: list[AgentRecord] = []
            for dep in agent.depends_on:
                record = current_agent(dep, every, reruns)
                if record is None:
                    return f"its dependency {dep} is gone from the repository's state"
                if record.status is AgentStatus.MERGED:
                    continue
                if record.status in (
                    AgentStatus.FAILED,
                    AgentStatus.CANCELLED,
                    AgentStatus.DISCARDED,
                ):
                    why = f": {record.status_reason}" if record.status_reason else ""
                    return (
                        f"its dependency {record.name} ({record.agent_id}) "
                        f"{record.status.value}{why}. Once the dependency is redone and merged, "
                        "rerun_subagent this agent"
                    )
                pending.append(record)
            if not pending:
                return None
            detail = "waits until merged: " + ", ".join(
                f"{r.name} ({r.agent_id}, {r.status.value})" for r in pending
            )
            if detail != shown:
                store.mark_waiting(
                    agent.agent_id,
                    "depends on " + ", ".join(r.agent_id for r in pending),
                    f"{detail} (depends_on); it then starts from the head that contains them",
                )
                shown = detail
            await store.wait_for_change(cursor, 1.0, runs[0] if len(runs) == 1 else None)

    async def run_in_process(self, ctx: RepoContext, runtime: AgentRuntime) -> None:
        """Create the workspace while the first model turn is in flight, then run the loop.

        The first request needs only the prompts; the loop waits for the workspace before it
        records that turn or runs a tool, and the agent shows `running` once the workspace exists.
        """
        agent = find_agent(ctx, runtime.agent_id)
        run = find_run(ctx, agent.run_id)
        ready = anyio.Event()
        made: list[AgentBus] = []
        failed: list[Exception] = []
        loop_scope = anyio.CancelScope()
        # The run's first request leaves before its agent's workspace is made: making it (the
        # run's base, for the first) takes the event loop and a core for a while, and every
        # other agent of the run waits for that request.
        warmup = ctx.warmups.get(agent.run_id)
        first = warmup if warmup is not None and warmup.first_to_leave(agent.agent_id) else None

        async def prepare() -> None:
            try:
                if first is not None:
                    await first.until_left()
                made.append(await self._prepare_workspace(ctx, runtime, agent))
            except Exception as exc:  # the agent fails at once, its first turn abandoned
                log.exception("agent %s: its workspace could not be made", agent.agent_id)
                failed.append(exc)
                loop_scope.cancel()
            finally:
                ready.set()

        async def workspace_ready() -> AgentBus:
            if not ready.is_set():  # (waiting on a set event still yields to the event loop)
                await ready.wait()
            if failed:
                raise failed[0]
            return made[0]

        # The prefix describes the run's base for every agent, so it is byte-identical.
        prefix = await run_prefix(ctx, run)
        runtime.external_tools = tuple(await self.external_tools(run))
        loop = AgentLoop(
            model=await self._models.for_agent(agent.model, agent.index),
            model_name=agent.model,
            bus=None,
            workspace_ready=workspace_ready,
            budget=self.budget(ctx, agent.run_id),
            retry=RetryPolicy(
                max_attempts=self.settings.retry_max_attempts,
                retry_after_cap_s=self.settings.retry_after_cap_s,
                rate_limited_max_s=self.settings.rate_limit_wait_s,
            ),
            system_prefix=prefix,
            system_task=task_prompt_of(agent),
            tools=[*agent_tool_specs(runtime.external_tools), FINISH_TOOL],
            max_turns=agent.max_turns,
            max_output_tokens=self.settings.max_output_tokens,
            on_turn=lambda p, reserved, used: self._on_turn(
                ctx, runtime.agent_id, p, reserved, used
            ),
            transcript=Transcript(transcript_path(ctx, agent.agent_id), batched=True),
            warmup=warmup,
            rate_gate=self._models.gate(agent.model),
            cache_ttl=run.cache_ttl or "5m",
            while_waiting=partial(self.commit_ahead, ctx, runtime),
            owner_records_last_turn=True,
        )
        runtime.loop = loop
        runtime.started_at = self.clock.monotonic()
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
                finally:
                    if first is not None:  # (its loop ended before its request left)
                        first.starter_stops(agent.agent_id)
        if failed and loop_scope.cancelled_caught:
            error = failed[0]
            outcome = LoopOutcome(
                StopReason.INTERNAL_ERROR,
                error=f"its workspace could not be made: {type(error).__name__}: {error}",
            )
        with anyio.CancelScope(shield=True):
            await self.finish(ctx, runtime, outcome)

    async def _prepare_workspace(
        self, ctx: RepoContext, runtime: AgentRuntime, agent: AgentRecord
    ) -> AgentBus:
        """The agent's worktree and bus; the agent is `running` from here."""
        start = await self.start_commit(ctx, agent)
        audit = AuditLog(ctx.repo.state_dir / "audit" / f"{agent.agent_id}.jsonl")
        home = ctx.repo.state_dir / "homes" / agent.agent_id

        def make(wait: bool) -> tuple[ws_mod.Workspace, Terminal]:
            workspace = ws_mod.create_workspace(
                ctx.repo,
                base_commit=start,
                run_id=agent.run_id,
                agent_id=agent.agent_id,
                include=self.settings.include,
                wait=wait,
                # the run's kind, or (a run this process did not spawn) the setting's
                kind=ctx.workspace_kinds.get(agent.run_id)
                or ws_mod.view_support(ctx.repo, self.settings.workspaces).kind,
                agents_work=resumes_work(agent, start),
            )
            # a view's git registration is made when git is first needed inside it
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
                    git_common_dir=ctx.repo.git_dir,
                    home=home,
                    limits=self.settings.command_limits,
                ),
                register_git=partial(ws_mod.ensure_registered, workspace),
            )
            return workspace, terminal

        workspace, terminal = await quick_or_thread(
            make, ctx.workspace_threads, ctx.workspace_turns, start
        )
        run = find_run(ctx, agent.run_id)
        holder = agent.lease_holder or agent.agent_id
        if runtime.external_tools and self.external is not None:
            # the downstream servers are told the workspace, and may run git there themselves
            await anyio.to_thread.run_sync(ws_mod.ensure_registered, workspace)
            runtime.external = self.external.session(agent.agent_id, workspace=str(workspace.path))
        base = agent.base_commit if agent.start_commit else start
        agent = ctx.store.mark_running(
            agent.agent_id,
            started_at=self.clock.time(),
            workspace=str(workspace.path),
            included=workspace.included,
            branch=workspace.branch,
            base_commit=base,
            start_commit=start,
            commit=start if start != base else None,
        )
        if agent.rerun_of is not None and self.replace_rerun is not None:
            # it has started: the agent it replaces goes before it records a turn or runs a
            # tool, whatever happens to it next (a failure is the hook's to log)
            with anyio.CancelScope(shield=True):
                await self.replace_rerun(ctx, agent.rerun_of, agent.agent_id)
        assert runtime.fence is not None
        runtime.audit = audit
        return AgentBus(
            agent_id=agent.agent_id,
            workspace=workspace.path,
            write_scope=WriteScope.of(agent.write_scope),
            fence=runtime.fence,
            audit=audit,
            terminal=terminal,
            git_dir=partial(ws_mod.listing_git_dir, workspace),
            policy=self.policy(run, agent),
            gate=AgentGate(ctx, agent.agent_id, holder, self.settings.approval_timeout_s),
            external=runtime.external,
            external_tools=runtime.external_tools,
            resources=[r.name for r in agent.resources],
            held_resources=[r.name for r in agent.resources if r.hold == "agent"],
            network=agent.network and not self.settings.allow_network,
            quick_files=ws_mod.quick_files(workspace),
        )

    @staticmethod
    async def start_commit(ctx: RepoContext, agent: AgentRecord) -> str:
        """The commit the agent's workspace starts from: the run's base; the head, for an agent
        that waited for others to be merged; its last work, for a rerun that resumes."""
        start = agent.base_commit
        if (agent.waits_for or agent.depends_on) and not agent.rerun_of:
            start = await anyio.to_thread.run_sync(ctx.repo.head_commit)
        if agent.rerun_of is not None and agent.start_commit is not None:
            start = agent.start_commit
        return start

    def commit_ahead(self, ctx: RepoContext, runtime: AgentRuntime) -> None:
        """Make the agent's commit but for its message (`ws_mod.prepare_commit`) while its
        model call is in flight, so that if the call is its last and the view is unchanged
        by then, its finish has only the commit object to make. Only for an agent whose bus
        ran nothing but its file tools: a command, or a downstream server's tool, may leave a
        process behind that changes the view later, unseen."""
        audit = runtime.audit
        if audit is None:
            return
        records = audit.records()
        if any(r.op not in FILE_TOOLS for r in records):
            return
        agent = find_agent(ctx, runtime.agent_id)
        if agent.workspace is None or not agent.status.active:
            return
        runtime.drop_ahead()
        scope = self._guarded_scope(ctx, agent, records)
        prepared = ws_mod.prepare_commit(workspace_of(agent), write_scope=scope)
        if prepared is not None:
            runtime.ahead = CommitAhead(records=len(records), scope=scope, prepared=prepared)

    @staticmethod
    def _take_ahead(runtime: AgentRuntime, records: list[AuditRecord]) -> CommitAhead | None:
        """The commit made ahead, if the bus has only read since: the view is as it was."""
        ahead, runtime.ahead = runtime.ahead, None
        if ahead is None:
            return None
        if len(records) >= ahead.records and all(
            r.op in READ_ONLY_TOOLS for r in records[ahead.records :]
        ):
            return ahead
        ahead.prepared.close()
        return None

    def _guarded_scope(
        self, ctx: RepoContext, agent: AgentRecord, records: list[AuditRecord]
    ) -> GuardedScope:
        """The agent's write scope for its commit, guarded by its permission policy: what a
        command changed where writes are denied, or asked and not approved, is dropped."""
        policy = self.policy(find_run(ctx, agent.run_id), agent)
        return GuardedScope.after(WriteScope.of(agent.write_scope), policy, records)

    def budget(self, ctx: RepoContext, run_id: str) -> Budget:
        """The run's token budget as an agent's loop sees it (and the server's cap)."""
        store = ctx.store

        caps = self._caps

        def describe() -> str:
            total, used, reserved = store.budget(run_id)
            run = f"{used} of {total} tokens used, {reserved} reserved by running turns"
            return run + caps.describe()

        def reserve(tokens: int) -> bool:
            if not store.reserve_budget(run_id, tokens):
                return False
            if not caps.reserve(tokens):
                store.settle_budget(run_id, tokens, 0)
                return False
            return True

        def settle(reserved: int, used: int) -> None:
            store.settle_budget(run_id, reserved, used)
            caps.settle(reserved, used)

        return Budget(reserve=reserve, settle=settle, describe=describe)

    def record_remote_turn(self, ctx: RepoContext, agent_id: str, turn: dict[str, Any]) -> None:
        """A turn of an agent that runs elsewhere, as its worker reported it."""
        reserved, used = (int(v) for v in turn["settle"])
        progress = Progress(
            turns=int(turn["turns"]), tokens=TokenUsage.model_validate(turn["tokens"])
        )
        runtime = self._registry.get(agent_id)
        if runtime is not None:
            runtime.remote_progress = progress
        self._record_turn(
            ctx,
            agent_id,
            progress,
            (reserved, used),
            written=list(turn["written"]),
            read=list(turn["read"]),
        )

    def _on_turn(
        self, ctx: RepoContext, agent_id: str, progress: Progress, reserved: int, used: int
    ) -> None:
        runtime = self._registry.get(agent_id)
        loop = runtime.loop if runtime is not None else None
        # files written through the bus so far (final, git-based facts replace them at the end)
        bus = loop.bus if loop is not None else None
        written = bus.written_paths() if bus is not None else []
        read = bus.read_paths() if bus is not None else []
        self._record_turn(ctx, agent_id, progress, (reserved, used), written=written, read=read)

    def _record_turn(
        self,
        ctx: RepoContext,
        agent_id: str,
        progress: Progress,
        settle: tuple[int, int],
        *,
        written: list[str],
        read: list[str],
    ) -> None:
        """Record a turn and settle its reservation (the server's share here, the run's in the
        store, with the turn)."""
        self._caps.settle(*settle)
        ctx.store.record_turn(
            agent_id,
            settle=settle,
            turns=progress.turns,
            tokens=progress.tokens,
            changed_files=sorted(set(written)),
            read_files=read,
        )

    def on_lease_lost(self, ctx: RepoContext, runtime: AgentRuntime, lost: LeaseLost) -> None:
        current = ctx.store.agent(runtime.agent_id)
        if current is None or current.status.closed:
            return  # given back on purpose (by the server that merged or discarded it)
        record = ctx.store.mark_lease_lost(runtime.agent_id, str(lost))
        if record.status.active:
            runtime.cancel_reason = f"its write lease was lost ({lost}); it cannot land"
            runtime.lost_lease = True
            runtime.scope.cancel()

    async def _finish_cancelled(self, ctx: RepoContext, runtime: AgentRuntime) -> None:
        reason = runtime.cancel_reason or "cancelled by cancel_subagents"
        lease_lost = runtime.lost_lease
        outcome = LoopOutcome(
            StopReason.INTERNAL_ERROR if lease_lost else StopReason.CANCELLED, error=reason
        )
        with anyio.CancelScope(shield=True):
            await self.finish(
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
        await self.finish(ctx, runtime, outcome, status=AgentStatus.INTERRUPTED)

    async def finish(
        self,
        ctx: RepoContext,
        runtime: AgentRuntime,
        outcome: LoopOutcome,
        status: AgentStatus | None = None,
        *,
        remote_dropped: list[str] | None = None,
        remote_refused: dict[str, str] | None = None,
    ) -> None:
        """Commit the agent's work on its branch and record its result, built from facts. An
        agent that ran elsewhere committed and landed its work there: what its commit dropped
        comes with it (`remote_dropped`, `remote_refused`)."""
        try:
            await self._finish(
                ctx,
                runtime,
                outcome,
                status,
                remote_dropped=remote_dropped,
                remote_refused=remote_refused,
            )
        finally:
            if runtime.loop is not None:
                runtime.loop.record_last_turn()  # if the final state did not take it

    async def _finish(
        self,
        ctx: RepoContext,
        runtime: AgentRuntime,
        outcome: LoopOutcome,
        status: AgentStatus | None,
        *,
        remote_dropped: list[str] | None,
        remote_refused: dict[str, str] | None,
    ) -> None:
        agent = find_agent(ctx, runtime.agent_id)
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
        dropped: list[str] = list(remote_dropped or [])
        records = runtime.audit.records() if runtime.audit is not None else []
        ahead = self._take_ahead(runtime, records)
        guarded = ahead.scope if ahead is not None else self._guarded_scope(ctx, agent, records)
        refused = dict(remote_refused or {})
        work: ws_mod.WorkCommit | None = None
        try:
            if agent.workspace is not None and Path(agent.workspace).exists():
                work = await commit_work(
                    agent,
                    first_line(outcome.summary or agent.prompt),
                    guarded,
                    ahead.prepared if ahead is not None else None,
                )
                commit = work.commit or commit
                dropped = [*work.dropped, *work.planted]
                refused = guarded.refused
        finally:
            if ahead is not None:
                ahead.prepared.close()  # (the commit closes it too, once it has used it)
        if work is not None and work.commit is not None and work.parent == agent.base_commit:
            changes = work.changes  # the commit's own changes are those against the base
        elif commit is not None:
            changes = await anyio.to_thread.run_sync(file_changes, ctx, agent.base_commit, commit)
        # (a name that is not UTF-8, which git takes, is recorded and reported escaped: the
        # records and the answers are JSON)
        changes = [c.shown() for c in changes]
        dropped = [shown_path(p) for p in dropped]
        refused = {shown_path(p): why for p, why in refused.items()}
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
        progress = runtime.loop.progress if runtime.loop is not None else runtime.remote_progress
        duration = self.clock.monotonic() - runtime.started_at if runtime.started_at else 0.0
        result = AgentResult(
            status=status,
            stop_reason=outcome.stop_reason,
            summary=outcome.summary,
            follow_ups=outcome.follow_ups,
            changed_files=changes,
            dropped_files=dropped,
            commands=commands,
            refused_calls=sum(1 for r in records if r.outcome != "ok"),
            permissions=[
                *(
                    PermissionDecision(
                        tool=r.op,
                        subject=r.command or r.path or r.args_brief,
                        decision=r.permission,
                    )
                    for r in records
                    if r.permission is not None
                    and ("ask (" in r.permission or "deny (" in r.permission)
                ),
                *(
                    PermissionDecision(
                        tool="commit",
                        subject=path,
                        decision=f"{why}: a command's change, not committed"
                        + (
                            " (the policy denies writes there)"
                            if why.startswith("deny")
                            else " (write it with write_file or edit_file, which ask the person)"
                        ),
                    )
                    for path, why in sorted(refused.items())
                ),
            ][:MAX_DECISIONS],
            tokens=progress.tokens,
            turns=progress.turns,
            duration_s=round(duration, 3),
            error=reason,
            commit=commit,
            branch=agent.branch,
        )
        # the loop's last turn is recorded in the same step (one transaction, not two); if
        # that fails, `finish` records it on its own
        loop = runtime.loop
        last = loop.waiting_turn if loop is not None else None
        bus = loop.bus if loop is not None else None
        ctx.store.mark_final(
            agent.agent_id,
            status,
            reason or outcome.stop_reason.value,
            stop_reason=outcome.stop_reason,
            reason=reason,
            last_turn=(
                LastTurn(
                    settle=last,
                    read_files=bus.read_paths() if bus is not None else [],
                    turns=progress.turns,
                    tokens=progress.tokens,
                )
                if last is not None
                else None
            ),
            result=result,
            commit=commit,
            finished_at=self.clock.time(),
            turns=progress.turns,
            tokens=progress.tokens,
            changed_files=[c.path for c in changes],
        )
        if loop is not None and last is not None:
            loop.last_turn_recorded()
            self._caps.settle(*last)
        if status != AgentStatus.SUCCEEDED and not has_work(commit, agent.base_commit):
            # nothing to merge or keep: its scope goes to whoever waits for it
            await self._registry.release_leases(ctx, agent)
            self._registry.signal_released(agent.agent_id)
