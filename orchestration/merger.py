"""The join of a run's agents into the canonical branch, and the discards: what merge_results
does once the agents are chosen, and what a merge or discard leaves behind (nothing held)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

import anyio

from orchestration import workspace as ws_mod
from orchestration.config import Settings
from orchestration.context import RepoContext, find_agent, find_run
from orchestration.contracts import (
    AgentMergeResult,
    AgentStatus,
    DiffStat,
    MergeOutcome,
    MergeRequest,
    MergeResult,
)
from orchestration.errors import AgentNotFound, InvalidState
from orchestration.join import JoinCandidate, Joiner, JoinOutcome, MergedReader
from orchestration.records import ended_unstarted, first_line, workspace_of
from orchestration.registry import AgentRegistry
from orchestration.state import AgentRecord
from orchestration.verify import Verifier, first_failing
from toolbus.audit import reads_of
from toolbus.errors import LeaseError
from toolbus.terminal import remove_home

log = logging.getLogger("fanout.orchestrator")

OnProgress = Callable[[int, int, str], None]


class Merger:
    """Merges, discards and replaces agents' work; releases what they hold once they land."""

    def __init__(self, settings: Settings, registry: AgentRegistry) -> None:
        self.settings = settings
        self._registry = registry
        self._replacing: set[str] = set()  # the agents whose replacement is under way

    async def merge(
        self, ctx: RepoContext, request: MergeRequest, on_progress: OnProgress | None = None
    ) -> MergeResult:
        """Join the chosen agents' work into the canonical branch, one fenced writer at a time:
        discards first, then each agent in the order it finished."""
        agents = ctx.store.agents(request.run_id)
        by_id = {a.agent_id: a for a in agents}
        unknown = [i for i in [*(request.agent_ids or []), *request.discard] if i not in by_id]
        if unknown:
            raise AgentNotFound(
                f"agent_ids/discard: {', '.join(unknown)} not in run {request.run_id}"
            )
        results = [
            await self.discard(ctx, by_id[agent_id], dry_run=request.dry_run)
            for agent_id in request.discard
        ]
        candidates: list[JoinCandidate] = []
        for agent in _chosen(request, agents):
            skip = _precheck(agent)
            if skip is not None:
                results.append(
                    AgentMergeResult(
                        agent_id=agent.agent_id,
                        name=agent.name,
                        outcome=MergeOutcome.SKIPPED,
                        reason=skip,
                    )
                )
            elif agent.commit is None or agent.commit == agent.base_commit:
                results.append(await self._merge_empty(ctx, agent, dry_run=request.dry_run))
            else:
                candidates.append(_candidate(agent, agent.commit))
        command = request.verify_command or find_run(ctx, request.run_id).verify_command
        verification: str | None = None
        # Once more if the branch moved while the command ran (the user committing, another
        # server's merge): those skipped for it are verified again, on the new head, and land
        # if it passes there and the branch holds still this time.
        for attempt in range(2):
            if attempt:  # (the agents the first attempt landed read files too)
                agents = ctx.store.agents(request.run_id)
            merged: list[AgentRecord] = [a for a in agents if a.status == AgentStatus.MERGED]
            candidates, readers = await anyio.to_thread.run_sync(
                _with_reads, ctx, candidates, merged
            )
            ordered = writers_first(candidates)
            rejected: list[JoinOutcome] = []
            verified: dict[str, str] | None = None
            if command and ordered:
                ordered, rejected, summary, verified = await self._verify(
                    ctx, ordered, request, readers=readers, command=command
                )
                verification = (
                    summary
                    if verification is None
                    else f"{verification}; the branch moved while it ran, so again on the new "
                    f"head: {summary}"
                )
            outcomes = await self._join(
                ctx,
                by_id,
                ordered,
                request,
                readers=readers,
                on_progress=on_progress,
                verified=verified,
            )
            again: set[str] = (
                {o.agent_id for o in outcomes if o.unverified} if attempt == 0 else set()
            )
            for outcome in [*outcomes, *rejected]:
                if outcome.agent_id in again:
                    continue
                result = _result_of(by_id[outcome.agent_id], outcome)
                results.append(result)
                if not request.dry_run:
                    await self._record(ctx, by_id[outcome.agent_id], result)
            if not again:
                break
            candidates = [c for c in ordered if c.agent_id in again]
        head = await anyio.to_thread.run_sync(ctx.repo.head_commit)
        return MergeResult(
            run_id=request.run_id,
            dry_run=request.dry_run,
            agents=results,
            head=head,
            branch=ctx.repo.head_branch(),
            diffstat=_total(results),
            verification=verification,
        )

    async def _join(
        self,
        ctx: RepoContext,
        by_id: dict[str, AgentRecord],
        candidates: list[JoinCandidate],
        request: MergeRequest,
        *,
        readers: list[MergedReader],
        on_progress: OnProgress | None,
        verified: dict[str, str] | None,
    ) -> list[JoinOutcome]:
        """The joiner's outcomes for the candidates, in their order; an agent whose write lease
        was lost does not land (another agent may have written its paths since), nor one whose
        merge is not the tree the verification passed on (`verified`, when one ran)."""

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
        return await anyio.to_thread.run_sync(
            lambda: joiner.merge(
                candidates,
                dry_run=request.dry_run,
                can_land=can_land,
                on_progress=progress,
                merged_readers=readers,
                accept_stale=request.accept_stale,
                verified=verified,
            )
        )

    async def _verify(
        self,
        ctx: RepoContext,
        candidates: list[JoinCandidate],
        request: MergeRequest,
        *,
        readers: list[MergedReader],
        command: str,
    ) -> tuple[list[JoinCandidate], list[JoinOutcome], str, dict[str, str]]:
        """The candidates that pass verification together, the outcomes of those that do not,
        what the verification did, and the tree each landing candidate's merge made in the
        batch that passed. The batch that would land is verified once; on a failure, halving
        finds the agent whose change makes it fail, and the rest is verified again without
        it."""
        timeout = request.verify_timeout_s or self.settings.command_timeout_s
        verifier = Verifier(ctx.repo, self.settings, command, timeout, owner=ctx.store.server_id)
        remaining = list(candidates)
        rejected: list[JoinOutcome] = []
        verified: dict[str, str] = {}
        for _ in range(len(candidates)):
            joiner = Joiner(ctx.repo)
            batch = list(remaining)
            await anyio.to_thread.run_sync(
                functools.partial(
                    joiner.merge,
                    batch,
                    dry_run=True,
                    merged_readers=readers,
                    accept_stale=request.accept_stale,
                )
            )
            landing = [
                (cand, tree)
                for cand, tree in zip(batch, joiner.preview_trees, strict=True)
                if tree is not None
            ]
            if not landing or joiner.preview_head_tree is None:
                break
            found = await first_failing(
                verifier, [tree for _, tree in landing], joiner.preview_head_tree
            )
            if found is None:
                verified = {cand.agent_id: tree for cand, tree in landing}
                break
            at, verdict = found
            if at == 0:
                reason = (
                    "the verification command fails on the branch's head itself, before any "
                    f"agent's change: {verdict.describe()}\nFix the branch, or merge without "
                    "verify_command"
                )
                held = {cand.agent_id for cand, _ in landing}
                rejected.extend(
                    JoinOutcome(agent_id=i, outcome=MergeOutcome.SKIPPED, reason=reason)
                    for i in sorted(held)
                )
                remaining = [c for c in remaining if c.agent_id not in held]
                break
            culprit = landing[at - 1][0]
            rejected.append(
                JoinOutcome(
                    agent_id=culprit.agent_id,
                    outcome=MergeOutcome.VERIFY_FAILED,
                    reason=f"with its change merged, {verdict.describe()}\nNothing of it was "
                    "applied; its branch is kept: rerun_subagent gives it this output",
                )
            )
            remaining = [c for c in remaining if c.agent_id != culprit.agent_id]
        failed = sum(1 for r in rejected if r.outcome is MergeOutcome.VERIFY_FAILED)
        summary = f"`{command[:200]}` ran {verifier.runs} time(s) on would-be merged trees; " + (
            f"{failed} agent(s) made it fail" if failed else "it passed"
        )
        return remaining, rejected, summary, verified

    async def _record(self, ctx: RepoContext, agent: AgentRecord, result: AgentMergeResult) -> None:
        """Record what the join did to the agent (merged or conflicted)."""
        if result.outcome == MergeOutcome.MERGED:
            await self._after_merge(ctx, agent, result.commit)
        elif result.outcome == MergeOutcome.VERIFY_FAILED:
            ctx.store.mark_verify_failed(agent.agent_id, result.reason or "verification failed")
        elif result.outcome == MergeOutcome.STALE:
            ctx.store.mark_stale(agent.agent_id, result.stale_reads, result.reason or "stale")
        elif result.outcome == MergeOutcome.CONFLICTED:
            ctx.store.mark_conflicted(
                agent.agent_id,
                result.conflicts,
                "conflicts with the canonical head in "
                + ", ".join(result.conflicts)
                + ": rerun_subagent re-runs it on the new head",
            )

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
        await self.remove_workspace(ctx, agent)
        ctx.store.mark_merged(
            agent.agent_id,
            commit,
            f"merged as {commit[:12]}" if commit else "nothing to merge",
        )
        await self._registry.release_leases(ctx, agent)
        self._registry.signal_released(agent.agent_id)

    async def remove_workspace(self, ctx: RepoContext, agent: AgentRecord) -> None:
        """Remove the agent's worktree and its HOME (its branch stays unless settings say
        otherwise)."""
        home = ctx.repo.state_dir / "homes" / agent.agent_id
        await anyio.to_thread.run_sync(remove_home, home)
        if agent.workspace is None or not Path(agent.workspace).exists():
            return
        workspace = workspace_of(agent)
        await anyio.to_thread.run_sync(
            lambda: ws_mod.remove_workspace(
                ctx.repo, workspace, delete_branch=self.settings.delete_merged_branches
            )
        )

    async def discard(
        self, ctx: RepoContext, agent: AgentRecord, *, dry_run: bool
    ) -> AgentMergeResult:
        """Give up the agent's work: its worktree and leases go, its branch is kept."""
        if agent.status.active:
            raise InvalidState(
                f"discard: {agent.agent_id} is still {agent.status.value}; cancel it first"
            )
        if agent.status == AgentStatus.MERGED:
            raise InvalidState(f"discard: {agent.agent_id} is already merged")
        if not dry_run and agent.status != AgentStatus.DISCARDED:
            await self.remove_workspace(ctx, agent)
            ctx.store.mark_discarded(
                agent.agent_id,
                "explicit discard",
                "discarded by merge_results(discard=...); its branch "
                + (agent.branch or "")
                + " is kept",
            )
            await self._registry.release_leases(ctx, agent)  # after the record, as for a merge
            self._registry.signal_released(agent.agent_id)
        return AgentMergeResult(
            agent_id=agent.agent_id,
            name=agent.name,
            outcome=MergeOutcome.DISCARDED,
            reason="explicitly discarded",
        )

    async def replace_when_running(self, ctx: RepoContext, old_id: str, new_id: str) -> None:
        """Discard the agent a rerun replaces, once the rerun has started; a rerun that ended
        without having run (cancelled while queued, say) leaves it as it was. The runner
        replaces it as the rerun starts (`replace`); this catches the starts it does not see
        (another executor's)."""
        while (new := find_agent(ctx, new_id)).status in (
            AgentStatus.QUEUED,
            AgentStatus.WAITING,
        ):
            await ctx.store.wait_for_change(ctx.store.cursor(), 1.0)
        if ended_unstarted(new):
            return
        await self.replace(ctx, old_id, new_id)

    async def replace(self, ctx: RepoContext, old_id: str, new_id: str) -> None:
        """Discard `old_id`, which its rerun `new_id` replaces now that it has started: its
        workspace removed, then its record; its branch kept. Once: nothing when it is closed
        already, or its replacement is under way. A failure is logged, not raised: the callers
        are a rerun's start and the server's own tasks, none of which it may stop; the agent
        keeps its status, is shown so, and the next recovery tries again."""
        if old_id in self._replacing:
            return
        self._replacing.add(old_id)
        try:
            old = find_agent(ctx, old_id)
            if old.status.closed:
                return
            await self.remove_workspace(ctx, old)
            ctx.store.mark_discarded(
                old_id,
                f"replaced by {new_id}",
                f"replaced by {new_id} (rerun_subagent); its branch is kept",
            )
            self._registry.signal_released(old_id)
        except Exception:
            log.exception("agent %s: discarding %s failed", new_id, old_id)
        finally:
            self._replacing.discard(old_id)


def _with_reads(
    ctx: RepoContext, candidates: list[JoinCandidate], merged: list[AgentRecord]
) -> tuple[list[JoinCandidate], list[MergedReader]]:
    """The candidates with what they read, and the run's merged agents as readers."""
    audit = ctx.repo.state_dir / "audit"
    with_reads: list[JoinCandidate] = []
    for cand in candidates:
        reads, ran = reads_of(audit / f"{cand.agent_id}.jsonl")
        with_reads.append(cand.model_copy(update={"reads": reads, "ran_commands": ran}))
    readers = [
        MergedReader(
            agent_id=agent.agent_id,
            name=agent.name,
            commit=agent.merged_commit,
            reads=reads_of(audit / f"{agent.agent_id}.jsonl")[0],
            changed=frozenset(agent.changed_files),
        )
        for agent in merged
    ]
    return with_reads, readers


def writers_first(candidates: list[JoinCandidate]) -> list[JoinCandidate]:
    """The candidates in their order, except that an agent whose changes another read lands
    before that reader (a reader landing first would not look stale, and its work would rest on
    the old version). In a cycle (each read what the other changes), the earlier goes first and
    the other is found stale."""
    changes = {c.agent_id: set(c.changed) for c in candidates}
    placed: list[JoinCandidate] = []
    waiting = list(candidates)
    while waiting:
        for i, cand in enumerate(waiting):
            blocked = any(
                other is not cand and cand.reads & changes[other.agent_id] for other in waiting
            )
            if not blocked:
                placed.append(waiting.pop(i))
                break
        else:
            placed.append(waiting.pop(0))  # a cycle: keep the given order
    return placed


def _chosen(request: MergeRequest, agents: list[AgentRecord]) -> list[AgentRecord]:
    """The agents to merge: those named, or every succeeded one in the order they finished."""
    discarded = set(request.discard)
    if request.agent_ids is not None:
        by_id = {a.agent_id: a for a in agents}
        return [by_id[i] for i in request.agent_ids if i not in discarded]
    return sorted(
        (a for a in agents if a.status == AgentStatus.SUCCEEDED and a.agent_id not in discarded),
        key=lambda a: (a.finish_seq or 0, a.index),
    )


def _precheck(agent: AgentRecord) -> str | None:
    """Why the agent is skipped, if it is."""
    if agent.status.active:
        return f"it is still {agent.status.value}; wait for it (get_status wait_s) or cancel it"
    if agent.status == AgentStatus.MERGED:
        return "already merged"
    if agent.status == AgentStatus.DISCARDED:
        return "discarded"
    if agent.lease_lost:
        return (
            "its write lease was lost while it ran, so its writes are not fenced: rerun_subagent it"
        )
    return None


def _candidate(agent: AgentRecord, commit: str) -> JoinCandidate:
    return JoinCandidate(
        agent_id=agent.agent_id,
        name=agent.name,
        task_summary=first_line(agent.prompt),
        model_summary=agent.result.summary if agent.result else "",
        base_commit=agent.base_commit,
        branch=agent.branch or "",
        commit=commit,
        changed=tuple(agent.changed_files),
    )


def _result_of(agent: AgentRecord, outcome: JoinOutcome) -> AgentMergeResult:
    return AgentMergeResult(
        agent_id=agent.agent_id,
        name=agent.name,
        outcome=outcome.outcome,
        commit=outcome.commit,
        conflicts=list(outcome.conflicts),
        stale_reads=list(outcome.stale_reads),
        reason=outcome.reason,
        diffstat=outcome.diffstat,
    )


def _total(results: list[AgentMergeResult]) -> DiffStat:
    """The diffstat of everything that landed (or would land, in a dry run)."""
    landed = [r.diffstat for r in results if r.outcome in (MergeOutcome.MERGED, MergeOutcome.CLEAN)]
    return DiffStat(
        files=sum(d.files for d in landed),
        insertions=sum(d.insertions for d in landed),
        deletions=sum(d.deletions for d in landed),
        paths=[p for d in landed for p in d.paths],
    )
