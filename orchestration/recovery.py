"""Taking over what dead servers left: their running agents (interrupted, their work
committed), their finished agents' leases, and a merge cut short."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import anyio

from orchestration import workspace as ws_mod
from orchestration.clock import Timing
from orchestration.context import RepoContext, find_agent
from orchestration.contracts import AgentResult, AgentStatus, FileChange, StopReason
from orchestration.join import Joiner
from orchestration.records import (
    has_work,
    replaces_its_agent,
    scope_freed,
    scope_requests,
    workspace_of,
)
from orchestration.registry import AgentRegistry, LeaseFence
from orchestration.runner import AgentRunner, commit_work, file_changes
from orchestration.state import AgentRecord
from orchestration.verify import remove_leftovers
from toolbus.errors import LeaseError
from toolbus.leases import LeaseGrant
from toolbus.terminal import remove_home

log = logging.getLogger("fanout.orchestrator")

ACTIVE_STATUSES = tuple(s for s in AgentStatus if s.active)


def _remove_landed_homes(ctx: RepoContext) -> None:
    homes = ctx.repo.state_dir / "homes"
    if not homes.is_dir():
        return
    agents = {a.agent_id: a for a in ctx.store.all_agents()}
    for entry in homes.iterdir():
        agent_id = entry.name.removesuffix(".sandbox")
        agent = agents.get(agent_id)
        if agent is None or agent.status.closed:
            remove_home(homes / agent_id)


class Recovery:
    """Recovers a repository's agents of dead servers, on opening it and on each heartbeat."""

    def __init__(self, registry: AgentRegistry, runner: AgentRunner, timing: Timing) -> None:
        self._registry = registry
        self._runner = runner
        self._timing = timing

    async def on_open(self, ctx: RepoContext) -> None:
        """On opening a repository: a dead server's agents, then a merge it left cut short."""
        await self.recover_agents(ctx)
        # a merge cut short by a crash: finish bringing the checkout forward, clear git locks
        note = await anyio.to_thread.run_sync(Joiner(ctx.repo).recover)
        if note:
            log.warning("recovery of %s: %s", ctx.repo.root, note)
        # scratch checkouts of verifications cut short (nothing of them was applied)
        live = ctx.store.live_servers() | {ctx.store.server_id}
        await anyio.to_thread.run_sync(remove_leftovers, ctx.repo, live)
        # HOMEs of agents whose workspace is gone (a server died before removing them)
        await anyio.to_thread.run_sync(_remove_landed_homes, ctx)

    async def heartbeat(self, ctx: RepoContext) -> None:
        """Beat, and take over what a server that died since left: its agents would otherwise
        show `running` until another server opened the repository."""
        while True:
            await anyio.sleep(self._timing.server_heartbeat_s)
            ctx.store.heartbeat()
            try:
                if ctx.store.orphaned(ctx.store.live_servers()):
                    await self.recover_agents(ctx)
                # views of this server's that another server merged or discarded: their layers
                # are gone, and only this server can unmount them (its namespace holds them)
                await anyio.to_thread.run_sync(ws_mod.unmount_orphaned_views, ctx.repo)
                # the event loop's kept handle, once agents stopped being made here
                ws_mod.drop_idle_branch_handle(self._timing.server_heartbeat_s)
            except Exception:  # the next beat tries again; the heartbeat itself must go on
                log.exception("recovery of the agents of a dead server failed")

    async def recover_agents(self, ctx: RepoContext) -> None:
        """Mark the active agents of dead servers `interrupted`, committing what their worktrees
        hold, and keep the leases of their finished ones. Each agent is claimed first (this
        server becomes its owner), so two servers never recover the same agent."""
        async with ctx.recovering:
            await self._recover_agents_locked(ctx)

    async def _recover_agents_locked(self, ctx: RepoContext) -> None:
        me = ctx.store.server_id
        live = ctx.store.live_servers() | {me}
        touched_runs: set[str] = set()
        # every agent the repository had: read in a worker thread, not on the event loop
        for found in await anyio.to_thread.run_sync(ctx.store.all_agents):
            runtime = self._registry.get(found.agent_id)
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
        await self._finish_replacements(ctx)
        await self._adopt_leases(ctx, live)

    async def _finish_replacements(self, ctx: RepoContext) -> None:
        """Discard the agents that reruns which started replace, where that was left undone: a
        server that stopped between starting a rerun and discarding the agent it replaces, or a
        discard that failed. Only reruns no server runs any more (a running one's runner does
        it as it starts), and only with the runner's hook (the orchestrator's merger, which
        logs a failure and leaves the agent for the next recovery)."""
        replace = self._runner.replace_rerun
        if replace is None:
            return
        agents = {a.agent_id: a for a in await anyio.to_thread.run_sync(ctx.store.all_agents)}
        for rerun in agents.values():
            if rerun.rerun_of is None or rerun.status.active or not replaces_its_agent(rerun):
                continue
            old = agents.get(rerun.rerun_of)
            if old is None or old.status.closed or old.status.active:
                continue
            await replace(ctx, old.agent_id, rerun.agent_id)

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
            changes = [c.shown() for c in changes]  # (JSON records: see `shown_path`)
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
        ctx.store.mark_final(
            agent.agent_id,
            AgentStatus.INTERRUPTED,
            "the server running this agent stopped",
            stop_reason=StopReason.INTERRUPTED,
            reason=reason,
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
            await anyio.to_thread.run_sync(ws_mod.clear_partial_writes, workspace_of(agent))
            # a commit cut short leaves git's lock files on the branch and worktree
            await anyio.to_thread.run_sync(
                ws_mod.clear_dead_locks, ctx.repo, Path(agent.workspace), agent.branch
            )
            work = await commit_work(agent, "work left by an interrupted agent")
            commit = work.commit or commit
        elif agent.workspace is None:
            # killed while its worktree was being made: nothing of it ran
            await anyio.to_thread.run_sync(
                ws_mod.discard_unstarted_workspace, ctx.repo, agent.run_id, agent.agent_id
            )
        changes: list[FileChange] = []
        if has_work(commit, agent.base_commit):
            changes = await anyio.to_thread.run_sync(file_changes, ctx, agent.base_commit, commit)
        return commit, changes

    async def _adopt_leases(self, ctx: RepoContext, live: set[str]) -> None:
        """Keep the leases of finished, unmerged agents of dead servers alive from here.

        Only a dead server's agents are taken over (including those just marked interrupted
        here, which are this server's now): a live server keeps its own agents' leases
        (its keeper renews them and its merges release them), and a grant renewed from two
        processes would outlive the merge that gives it back. The agent is claimed first (this
        server becomes its owner, atomically), so two servers starting at once cannot both take
        it. A grant still live is renewed by this process's keeper from now on; one that lapsed
        is taken again (a new token) if nobody else holds its paths (its own lock-delay does not
        count), else the agent is marked as having lost it, and merge_results skips it with the
        reason.
        """
        keep = (
            AgentStatus.SUCCEEDED,
            AgentStatus.FAILED,
            AgentStatus.CANCELLED,
            AgentStatus.INTERRUPTED,
            AgentStatus.CONFLICTED,
            AgentStatus.STALE,
            AgentStatus.VERIFY_FAILED,
        )
        for found in await anyio.to_thread.run_sync(ctx.store.all_agents):
            if found.status not in keep or found.lease_token is None or found.lease_lost:
                continue
            if found.agent_id in self._registry:
                continue  # run by this process
            if found.owner in live and found.owner != ctx.store.server_id:
                continue  # kept by the live server that ran it
            agent = ctx.store.claim_agent(found.agent_id, found.owner, keep)
            if agent is None or agent.lease_token is None:
                continue  # claimed by another server, or merged or discarded meanwhile
            if scope_freed(agent):
                await self._registry.release_leases(ctx, agent)  # no work to keep: free its paths
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
                requests = scope_requests(agent.write_scope)
                try:
                    grant = ctx.leases.store.retake(holder, agent.lease_token, requests)
                except LeaseError:
                    grant = None
                if grant is None:
                    ctx.store.mark_lease_lost(agent.agent_id, "lapsed while no server kept it")
                    continue
                ctx.store.record_lease(agent.agent_id, grant.token)
                if scope_freed(find_agent(ctx, agent.agent_id)):
                    # merged or discarded by another server while the grant was taken: that
                    # server's sweep may have run before the grant existed, so give it back here
                    with contextlib.suppress(LeaseError):
                        await ctx.leases.release(grant)
                    continue
            fence = LeaseFence(ctx.leases, holder)
            fence.grant = grant
            runtime = self._registry.keep(agent.agent_id, fence)
            ctx.keeper.track(
                grant, lambda lost, r=runtime: self._runner.on_lease_lost(ctx, r, lost)
            )
