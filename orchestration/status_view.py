"""The status view of one repository: runs and agents as `get_status` shows them, the waiting
of long-polls, and the one cache of what answers are built from (so that a poll in which little
changed rebuilds little)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio

from orchestration import workspace as ws_mod
from orchestration.attention import WakeOn
from orchestration.caps import ServerCaps
from orchestration.clock import Clock, Timing
from orchestration.context import RepoContext, find_run
from orchestration.contracts import (
    AgentStatus,
    AgentView,
    LeaseView,
    PromptCacheView,
    RunTotals,
    RunView,
    StatusResult,
    TokenUsage,
)
from orchestration.errors import AgentNotFound
from orchestration.records import pending_approval, scope_requests
from orchestration.state import AgentRecord, RunRecord
from orchestration.wakeup import COALESCE_MAX_S, COALESCE_S, Wakeups
from toolbus.leases import Lease, LeaseMode

log = logging.getLogger("fanout.orchestrator")

# status answers kept, one per question (run_id, agent_ids, since) asked
STATUS_ANSWERS_KEPT = 64
# views of runs with no active agent kept per run, at least (see `StatusView.answer`): one
# for polls with a cursor, one for polls without, and some for polls naming agents
QUIET_VIEWS_PER_RUN = 4

_QuietAsked = tuple[str, bool, frozenset[str] | None]


class StatusView:
    """Status answers for one repository, and everything cached to build them: the last read
    of leases and budgets, each agent's view, the last answer per question, the wake-up
    questions of long-polls, the workspaces' disk usage. Records, views and answers are built
    once and shared between answers: read them, never mutate them."""

    def __init__(
        self,
        ctx: RepoContext,
        *,
        caps: ServerCaps,
        clock: Clock,
        timing: Timing,
        start_soon: Callable[..., None],
    ) -> None:
        self._ctx = ctx
        self._caps = caps
        self._clock = clock
        self._timing = timing
        self._start_soon = start_soon
        self._wakeups = Wakeups(ctx.store, ctx.leases.table, scope_requests)
        self._views: dict[str, _BuiltView] = {}
        # (run_id, asked without a cursor, the agents asked for) -> the view of a run with no
        # active agent, and what it was built from
        self._quiet_views: dict[_QuietAsked, tuple[tuple[object, ...], RunView]] = {}
        self._runs_shown = 0  # the most runs an answer showed: what the kept views scale with
        self._answers: dict[_StatusAsked, tuple[object, StatusResult]] = {}
        self._read: _StatusRead | None = None
        # the agents' workspaces on disk: (when measured, bytes), None until measured; the
        # measurement under way, if any (one at a time serves every poll); and a thread of
        # their own, so that it never waits behind the agents' git work
        self._disk_figure: tuple[float, int] | None = None
        self._disk_measuring: anyio.Event | None = None
        self._disk_thread = anyio.CapacityLimiter(1)

    async def answer(
        self,
        *,
        run_id: str | None,
        agent_ids: Sequence[str] | None,
        since: int | None,
        wake_on: WakeOn,
        called: float,
        deadline: float | None,
        wait: float,
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
        ctx = self._ctx
        due = called
        self._measure_disk_usage_if_old()  # while the poll waits
        changed = True
        if since is not None and deadline is not None:
            changed, due = await self._wait_for_attention(
                run_id, since, wake_on=wake_on, deadline=deadline, called=called, wait=wait
            )
        elif since is not None:
            changed = ctx.store.cursor() > since
        disk = await self._disk_usage(deadline)
        read = self._read
        if read is None or read.at < due:
            read = await self._read_status(read)
        cursor = read.cursor
        runs = ctx.store.runs_snapshot(run_id, cursor)
        if run_id and not runs:
            find_run(ctx, run_id)  # raises RunNotFound
        wanted = set(agent_ids) if agent_ids else None
        snapshots = {r.run_id: ctx.store.agents_snapshot(r.run_id, cursor) for r in runs}
        if wanted:
            known = {a.agent_id for agents in snapshots.values() for a in agents}
            missing = sorted(wanted - known)
            if missing:
                raise AgentNotFound(f"agent_ids: no such agent(s) {', '.join(missing)}")
        budgets = tuple(read.budgets.get(run.run_id, (0, 0, 0)) for run in runs)
        # The same question, asked again while everything it shows is the same, gets the same
        # answer object: runs and agents change only with an event (the cursor), the budget's
        # reservations and the leases without one.
        asked = (run_id, tuple(sorted(wanted)) if wanted else None, since)
        server = self._caps.load()
        shows = (cursor, changed, read.lease_keys, budgets, disk, server)
        answers = self._answers
        last = answers.get(asked)
        if last is not None and last[0] == shows:
            return last[1]
        views: list[RunView] = []
        self._runs_shown = max(self._runs_shown, len(runs))
        for run, budget in zip(runs, budgets, strict=True):
            agents = snapshots[run.run_id]
            # a run with no active agent: its view of the last poll while nothing it shows
            # changed, so the server's history of finished runs costs a lookup per run
            key = self._quiet_key(run, agents, read, since)
            kept_as = (run.run_id, since is None, None if wanted is None else frozenset(wanted))
            kept = self._quiet_views.get(kept_as) if key is not None else None
            if kept is not None and kept[0] == key:
                views.append(kept[1])
                continue
            view = await self._run_view(run, agents, budget, read, wanted=wanted, since=since)
            if key is not None:
                if len(self._quiet_views) >= QUIET_VIEWS_PER_RUN * max(self._runs_shown, 64):
                    self._quiet_views.clear()
                self._quiet_views[kept_as] = (key, view)
            views.append(view)
        result = StatusResult(
            cursor=cursor, changed=changed, runs=views, workspace_disk_bytes=disk, server=server
        )
        if len(answers) >= STATUS_ANSWERS_KEPT:
            answers.clear()
        answers[asked] = (shows, result)
        return result

    def _quiet_key(
        self, run: RunRecord, agents: list[AgentRecord], read: _StatusRead, since: int | None
    ) -> tuple[object, ...] | None:
        """What the view of a run with no active agent is built from, None for a run with one
        (kept apart per poll with a cursor or without, and per agents asked for). Its agents'
        records and its attention change only with an event of the run (its newest is in the
        key); its leases, budget and prompt cache are compared as they are; which of its agents
        changed after `since` is none when its newest event is not after `since`."""
        if any(a.status.active for a in agents):
            return None
        last = self._ctx.store.last_change(run.run_id, read.cursor)
        if last is None:
            return None
        seen: object = None if since is None else ("nothing new" if last <= since else since)
        warmup = self._ctx.warmups.get(run.run_id)
        cache = (
            None if warmup is None else (warmup, warmup.done, warmup.first_byte_s, warmup.held_s)
        )
        leases = tuple(
            tuple(read.leases_by_holder.get(a.lease_holder or a.agent_id, ())) for a in agents
        )
        budget = read.budgets.get(run.run_id, (0, 0, 0))
        return (last, seen, budget, leases, cache)

    async def _run_view(
        self,
        run: RunRecord,
        agents: list[AgentRecord],
        budget: tuple[int, int, int],
        read: _StatusRead,
        *,
        wanted: set[str] | None,
        since: int | None,
    ) -> RunView:
        """The run as status shows it. Views are built with model_construct: every value comes
        from an already validated record or lease, so validating them again per poll would be
        wasted work."""
        total, used, reserved = budget
        attention = await self._wakeups.attention(run.run_id, read.cursor)
        changed_agents = (
            None
            if since is None
            else sorted(self._wakeups.changes(since, run.run_id, read.cursor).agents)
        )
        changing = reads_changing(agents)
        spent = [a.tokens for a in agents]
        tokens = TokenUsage.model_construct(
            input=sum(t.input for t in spent),
            output=sum(t.output for t in spent),
            cache_read=sum(t.cache_read for t in spent),
            cache_write=sum(t.cache_write for t in spent),
            cache_write_1h=sum(t.cache_write_1h for t in spent),
        )
        return RunView.model_construct(
            run_id=run.run_id,
            repo=run.repo,
            created_at=run.created_at,
            base_commit=run.base_commit,
            max_concurrency=run.max_concurrency,
            totals=RunTotals.model_construct(
                agents=len(agents),
                by_status={s.value: n for s, n in Counter(a.status for a in agents).items()},
                tokens=tokens,
                budget_tokens=total,
                budget_used=used,
                budget_remaining=max(total - used - reserved, 0),
                estimate_tokens=run.estimate_tokens,
            ),
            prompt_cache=self._prompt_cache(run),
            agents=[
                _agent_view(
                    self._views,
                    a,
                    read.leases_by_holder.get(a.lease_holder or a.agent_id, []),
                    changing.get(a.agent_id, []),
                )
                for a in agents
                if wanted is None or a.agent_id in wanted
            ],
            settled=attention.settled,
            next=attention.next,
            changed_agents=changed_agents,
        )

    def _prompt_cache(self, run: RunRecord) -> PromptCacheView | None:
        """The run's prompt caching, as far as this process knows it."""
        if run.estimate_tokens is None:
            return None  # a run of an earlier version, estimated otherwise
        warmup = self._ctx.warmups.get(run.run_id)
        if warmup is None or not warmup.done:
            return PromptCacheView.model_construct(
                ttl=run.cache_ttl, first_byte_s=None, held_s=0.0, note=run.cache_note
            )
        return PromptCacheView.model_construct(
            ttl=run.cache_ttl,
            first_byte_s=warmup.first_byte_s,
            held_s=round(warmup.held_s, 3),
            note=warmup.describe() or run.cache_note,
        )

    async def _wait_for_attention(
        self,
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
        ctx, wakeups = self._ctx, self._wakeups
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
            # (at `seen`, after `since`, the run was found not settled: the loop went on)
            unsettled = seen if seen > since else None
            if await wakeups.wakes(since, run_id, wake_on, cursor, unsettled_at=unsettled):
                if wake_on is WakeOn.FINISHED:
                    await self._coalesce(run_id, since=since, cursor=cursor, deadline=deadline)
                return True, max(called, change)
            seen = cursor

    async def _coalesce(
        self,
        run_id: str | None,
        *,
        since: int,
        cursor: int,
        deadline: float,
    ) -> None:
        """After a completion, wait while more arrive within COALESCE_S of each other (at most
        COALESCE_MAX_S, never past the deadline), so that they wake the poll once."""
        ctx, wakeups = self._ctx, self._wakeups
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

    async def _read_status(self, last: _StatusRead | None) -> _StatusRead:
        """Read what status answers are built from: the change cursor, the leases, the budgets."""
        ctx = self._ctx
        at = self._clock.monotonic()
        cursor = ctx.store.cursor()  # read once, before the rows (see runs_snapshot)
        now = self._clock.time()
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
        self._read = read
        return read

    async def _disk_usage(self, deadline: float | None) -> int:
        """The workspaces' disk usage, measured again once older than the timing says.

        The walk of every worktree runs in the background, one at a time for all polls; a poll
        answers with the last figure meanwhile, and waits only for the first one, until its
        deadline at most."""
        measuring = self._measure_disk_usage_if_old()
        if measuring is not None and self._disk_figure is None:
            with anyio.move_on_after(None if deadline is None else deadline - anyio.current_time()):
                await measuring.wait()
        known = self._disk_figure
        return 0 if known is None else known[1]

    def _measure_disk_usage_if_old(self) -> anyio.Event | None:
        """Start measuring the disk usage unless its figure is recent or a measurement is under
        way; the event of the measurement under way, if any."""
        known = self._disk_figure
        max_age = self._timing.disk_usage_cache_s
        if known is not None and self._clock.monotonic() - known[0] <= max_age:
            return None
        if self._disk_measuring is None:
            self._disk_measuring = anyio.Event()
            self._start_soon(self._measure_disk_usage, self._disk_measuring)
        return self._disk_measuring

    async def _measure_disk_usage(self, done: anyio.Event) -> None:
        try:
            value = await anyio.to_thread.run_sync(
                ws_mod.workspace_disk_usage, self._ctx.repo, limiter=self._disk_thread
            )
            self._disk_figure = (self._clock.monotonic(), value)
        except Exception:  # the last figure stays; the next poll measures again
            log.exception("measuring the workspaces' disk usage failed")
        finally:
            self._disk_measuring = None
            done.set()


# a status question: (run_id, the sorted agent_ids or None, since)
_StatusAsked = tuple[str | None, tuple[str, ...] | None, int | None]
# what a lease's view shows: (holder, token, resource, mode, expires in whole seconds)
_LeaseShown = tuple[str, int, str, str, float]


@dataclass(frozen=True)
class _StatusRead:
    """What status answers are built from, read at `at` (the monotonic clock), all at once."""

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
    reads_changing: list[str]
    view: AgentView


# the fields of an agent's status view that show its record as stored
_SHOWN_AS_STORED = (
    "agent_id",
    "run_id",
    "name",
    "status",
    "status_reason",
    "turns",
    "max_turns",
    "tokens",
    "write_scope",
    "lease_lost",
    "changed_files",
    "model",
    "base_commit",
    "branch",
    "node",
    "rerun_of",
)


def reads_changing(agents: list[AgentRecord]) -> dict[str, list[str]]:
    """Per agent that has not landed: the files it read that another agent of the run changes
    (`path (by name)`, at most 10), the early sign of a stale read at merge."""
    changed_by: dict[str, list[AgentRecord]] = {}
    for agent in agents:
        if agent.status in (AgentStatus.DISCARDED, AgentStatus.CANCELLED):
            continue
        for path in agent.changed_files:
            changed_by.setdefault(path, []).append(agent)
    found: dict[str, list[str]] = {}
    if not changed_by:
        return found
    for agent in agents:
        if not agent.read_files or agent.status.closed:
            continue
        shown: list[str] = []
        for path in agent.read_files:
            others = [o.name for o in changed_by.get(path, []) if o.agent_id != agent.agent_id]
            if others:
                shown.append(f"{path} (by {', '.join(others)})")
                if len(shown) == 10:
                    break
        if shown:
            found[agent.agent_id] = shown
    return found


def _agent_view(
    built: dict[str, _BuiltView],
    agent: AgentRecord,
    leases: list[LeaseView],
    changing: list[str],
) -> AgentView:
    """The agent's status view: the one built last time while its record and leases are the same.

    The record is compared by identity: the store's snapshot hands out the same record object
    until the agent's stored row changes, and a changed row is parsed into a new object. Leases
    come from the lease table on each call and are compared by value (a held lease's expiry
    moves, so its holder's view is rebuilt)."""
    last = built.get(agent.agent_id)
    if (
        last is not None
        and last.record is agent
        and last.leases == leases
        and last.reads_changing == changing
    ):
        return last.view
    view = AgentView.model_construct(
        **{name: getattr(agent, name) for name in _SHOWN_AS_STORED},
        waits_for=agent.waits_for if agent.status.active else [],
        approval=pending_approval(agent),
        leases=leases,
        result=agent.result.view() if agent.result is not None else None,
        reads_changing=changing,
    )
    built[agent.agent_id] = _BuiltView(agent, leases, changing, view)
    return view


def lease_expires_in(lease: Lease, now: float) -> float:
    """How long until `lease` expires, as status shows it: whole seconds (the TTL is tens of
    seconds, renewed every third of it)."""
    return float(round(lease.expires_at - now))
