"""Whether a long-poll of `get_status` has something to answer, and what changed since its cursor.

A long-poll answers when the orchestrator has something to do (see `attention`): by default when
the run is settled; with `WakeOn.FINISHED` when any agent reached a final status; always when a
lease was lost or the budget ran out. An agent's turn never wakes it. Completions that arrive
close together wake once: after a final status, a `FINISHED` poll waits until no other arrived
for `COALESCE_S` (at most `COALESCE_MAX_S`).

The facts are computed once per state cursor and shared by every waiter asking the same.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from orchestration.attention import (
    ATTENTION_KINDS,
    FINAL_KINDS,
    RunAttention,
    WakeOn,
    run_attention,
)
from orchestration.contracts import AgentStatus, StopReason
from orchestration.state import AgentRecord, StateStore
from toolbus.lease_store import Lease, LeaseRequest

__all__ = ["COALESCE_MAX_S", "COALESCE_S", "Wakeups"]

COALESCE_S = 0.3
COALESCE_MAX_S = 2.0
_KEPT = 256
# Events that leave a run that is not settled unsettled: an agent's turn, and its start (from
# queued to running). Each tells that an agent moved, so the run is not settled at it.
_NEUTRAL_KINDS = frozenset({"turn", "running"})
# the events of an agent that is not final (its lease, its start, its turns): an agent with
# only these after a cursor was not final at any of them
_ACTIVE_KINDS = _NEUTRAL_KINDS | {"leased"}


def _settling_agents(pairs: list[tuple[str | None, str]]) -> frozenset[str]:
    """The agents of `pairs` ((agent_id, kind) of events) with an event of a kind that an
    active agent's start and turns do not make (`_ACTIVE_KINDS`)."""
    return frozenset(a for a, k in pairs if a is not None and k not in _ACTIVE_KINDS)


@dataclass(frozen=True)
class _Changes:
    """What happened after a cursor: the agents that changed and the kinds of their events."""

    agents: frozenset[str]
    kinds: frozenset[str]


def _moving(agents: list[AgentRecord]) -> bool:
    """Whether an agent of the run is running or queued to start: the run is then not settled
    (`run_attention`), and the whole question, the lease table included, need not be asked
    (a long-poll asks it at every event)."""
    return any(a.status in (AgentStatus.RUNNING, AgentStatus.QUEUED) for a in agents)


class Wakeups:
    """The wake-up questions of one state store, answered once per cursor."""

    def __init__(
        self,
        store: StateStore,
        leases: Callable[[], Awaitable[list[Lease]]],
        scope_requests: Callable[[list[str] | None], list[LeaseRequest]],
    ) -> None:
        self._store = store
        self._leases = leases
        self._scope_requests = scope_requests
        self._attention: dict[tuple[str, int], RunAttention] = {}
        self._changes: dict[tuple[int, str | None, int], _Changes] = {}
        # (since, run_id) -> the newest cursor its changes were read up to, and those changes
        self._newest: dict[tuple[int, str | None], tuple[int, _Changes]] = {}
        # (since, run_id, cursor) -> the cursor its changes were last read from, the kinds of
        # the events read then (those after it), and their agents with an event other than an
        # active agent's (`_settling_agents`)
        self._fresh: dict[
            tuple[int, str | None, int], tuple[int, frozenset[str], frozenset[str]]
        ] = {}
        # (since, run_id) -> the cursor up to which its changed agents were looked at for a
        # budget that ran out, and whether one had
        self._budget_seen: dict[tuple[int, str | None], tuple[int, bool]] = {}
        # run_id -> its newest event when it was seen with no active agent
        self._quiet: dict[str, int] = {}

    def changes(self, since: int, run_id: str | None, cursor: int) -> _Changes:
        """The agents with an event after `since` (up to `cursor`), and the events' kinds."""
        key = (since, run_id, cursor)
        known = self._changes.get(key)
        if known is None:
            # Events are appended in order and never removed, and every event up to a cursor
            # was committed when it was read: the changes up to an earlier cursor of this
            # question are read again only after it (a long-poll asks at every event).
            last = self._newest.get((since, run_id))
            start, before = (
                last if last is not None and since <= last[0] < cursor else (since, None)
            )
            pairs = self._store.changes_after(start, cursor, run_id)
            agents = frozenset(a for a, _ in pairs if a is not None)
            kinds = fresh = frozenset(k for _, k in pairs)
            fresh_settling = _settling_agents(pairs)
            if before is not None:
                agents, kinds = agents | before.agents, kinds | before.kinds
            known = _Changes(agents, kinds)
            if len(self._changes) >= _KEPT:
                self._changes.clear()
                self._newest.clear()
                self._fresh.clear()
            self._changes[key] = known
            self._fresh[key] = (start, fresh, fresh_settling)
            if last is None or last[0] < cursor:
                self._newest[(since, run_id)] = (cursor, known)
        return known

    async def attention(self, run_id: str, cursor: int) -> RunAttention:
        """The run's attention state as of `cursor`."""
        key = (run_id, cursor)
        known = self._attention.get(key)
        if known is None:
            mine = self._store.agents_snapshot(run_id, cursor)
            if any(a.status is AgentStatus.WAITING for a in mine):
                every: dict[str, AgentRecord] = {}
                for run in self._store.runs_snapshot(None, cursor):
                    for agent in self._store.agents_snapshot(run.run_id, cursor):
                        every[agent.agent_id] = agent
                leases = await self._leases()
            else:
                # only a waiting agent looks past its run (at whom it waits for: other runs'
                # agents, the lease table); without one the answer is the same from the run
                # alone, and a status answer asks at every change
                every, leases = {a.agent_id: a for a in mine}, []
            known = run_attention(run_id, mine, every, leases, self._scope_requests)
            if len(self._attention) >= _KEPT:
                self._attention.clear()
            self._attention[key] = known
        return known

    async def settled(self, run_id: str | None, cursor: int) -> bool:
        """Whether the run (every run with agents, without `run_id`) is settled."""
        if run_id is not None:
            if _moving(self._store.agents_snapshot(run_id, cursor)):
                return False
            return (await self.attention(run_id, cursor)).settled
        for run in self._store.runs_snapshot(None, cursor):
            # a run seen with no active agent stays so until its next event: the server's
            # history of finished runs costs a lookup each, not a look at their agents
            last = self._store.last_change(run.run_id, cursor)
            if last is not None and self._quiet.get(run.run_id) == last:
                continue
            agents = self._store.agents_snapshot(run.run_id, cursor)
            if _moving(agents):
                return False
            if not any(a.status.active for a in agents):
                if last is not None:
                    self._quiet[run.run_id] = last
                continue
            if not (await self.attention(run.run_id, cursor)).settled:
                return False
        return True

    async def wakes(
        self,
        since: int,
        run_id: str | None,
        wake_on: WakeOn,
        cursor: int,
        *,
        unsettled_at: int | None = None,
    ) -> bool:
        """Whether a long-poll waiting after `since` has something to answer at `cursor`.
        `unsettled_at`: a later cursor at which this same question found the run (every run)
        not settled: when the events after it are only agents' turns and starts, it is not
        settled now either, and its agents are not read again (a poll asks at every event)."""
        if cursor <= since:
            return False
        kinds = self.changes(since, run_id, cursor).kinds
        if kinds & ATTENTION_KINDS:
            return True
        if kinds & FINAL_KINDS and self._budget_ran_out(since, run_id, cursor):
            return True
        if wake_on is WakeOn.FINISHED and kinds & FINAL_KINDS:
            return True
        if unsettled_at is not None and since < unsettled_at < cursor:
            start, fresh, _ = self._fresh.get((since, run_id, cursor), (None, None, None))
            if start == unsettled_at and fresh is not None and fresh <= _NEUTRAL_KINDS:
                return False
        return await self.settled(run_id, cursor)

    def finals(self, since: int, run_id: str | None, cursor: int) -> int:
        """How many agents reached a final status after `since` (for coalescing)."""
        return len(
            [
                a
                for a in self.changes(since, run_id, cursor).agents
                if (record := self._store.agent(a)) is not None
                and record.status.value in FINAL_KINDS
            ]
        )

    def _budget_ran_out(self, since: int, run_id: str | None, cursor: int) -> bool:
        """Whether an agent changed after `since` (up to `cursor`) stopped because the budget
        ran out. Such a stop is final, and a poll asks at every event: asked again at a later
        cursor, only the agents changed since the last look are looked at (their records as
        stored now, which still show it), not every changed agent again."""
        key = (since, run_id)
        last = self._budget_seen.get(key)
        start = since
        if last is not None and since <= last[0] <= cursor:
            if last[1] or last[0] == cursor:
                return last[1]
            start = last[0]
        # (an agent with only the events of an active one after the last look has not
        # stopped since: it was looked at then, or stopped before `since`)
        fresh_from, _, fresh_settling = self._fresh.get((since, run_id, cursor), (None,) * 3)
        if fresh_from == start and fresh_settling is not None:
            looked = fresh_settling  # what `changes` just read after the last look
        else:
            looked = _settling_agents(self._store.changes_after(start, cursor, run_id))
        ran_out = any(
            (agent := self._store.agent(agent_id)) is not None
            and agent.stop_reason is StopReason.BUDGET_EXHAUSTED
            for agent_id in sorted(looked)
        )
        if len(self._budget_seen) >= _KEPT:
            self._budget_seen.clear()
        self._budget_seen[key] = (cursor, ran_out)
        return ran_out
