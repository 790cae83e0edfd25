"""When the orchestrator must act: a run is settled, and what to call next.

A run is settled when nothing in it moves without the orchestrator: no agent runs or is about to
start, and every waiting agent waits on an agent that has finished but still holds its scope
(unmerged, or failed, cancelled or interrupted with work on its branch), in this run or another.
The documented loop (long-poll until settled, then do `next`) then always ends: waves of
overlapping scopes start once the orchestrator merges the wave before them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from orchestration.contracts import AgentStatus, StopReason
from orchestration.records import (
    current_agent,
    pending_approval,
    replaces_its_agent,
    reruns_of,
    scope_freed,
)
from orchestration.state import AgentRecord
from toolbus.lease_store import Lease, LeaseRequest, conflicts

__all__ = [
    "ATTENTION_KINDS",
    "FINAL_KINDS",
    "RunAttention",
    "WakeOn",
    "run_attention",
]


class WakeOn(StrEnum):
    """What ends a long-poll of `get_status` early (besides its `wait_s`)."""

    SETTLED = "settled"
    """The run needs the orchestrator (see the module docstring), or something needs attention."""
    FINISHED = "finished"
    """Any agent reached a final status (for an orchestrator that merges as results arrive)."""


# The event kinds of an agent reaching a final status (see `Orchestrator._finish`).
FINAL_KINDS = frozenset(
    {
        AgentStatus.SUCCEEDED.value,
        AgentStatus.FAILED.value,
        AgentStatus.CANCELLED.value,
        AgentStatus.INTERRUPTED.value,
    }
)
# Agents that ended and need the orchestrator: redo (rerun_subagent) or discard.
REDO = (
    AgentStatus.FAILED,
    AgentStatus.CONFLICTED,
    AgentStatus.STALE,
    AgentStatus.VERIFY_FAILED,
)
# Event kinds that always wake a long-poll: something went wrong that the orchestrator should see.
ATTENTION_KINDS = frozenset({"lease_lost", "approval"})
# the length at which the next step shows the one error several agents ended with
COMMON_ERROR_CHARS = 400
_HOLDS_SCOPE = (
    AgentStatus.SUCCEEDED,
    AgentStatus.FAILED,
    AgentStatus.CANCELLED,
    AgentStatus.INTERRUPTED,
    AgentStatus.CONFLICTED,
    AgentStatus.STALE,
    AgentStatus.VERIFY_FAILED,
)


@dataclass(frozen=True)
class RunAttention:
    """Whether a run is settled, the call to make next, and who waits on whom."""

    settled: bool
    next: str
    mergeable: tuple[str, ...]
    """Agents `merge_results` would merge now (succeeded, not yet merged)."""
    blocked_by: Mapping[str, tuple[str, ...]]
    """Waiting agent -> the agents (or other holders) whose scope it waits for."""
    attention: tuple[str, ...] = ()
    """Agents whose state needs a look: lease lost, out of budget, failed."""


def _names(ids: Sequence[str], by_id: Mapping[str, AgentRecord], limit: int = 8) -> str:
    shown = [by_id[i].name if i in by_id else i for i in ids[:limit]]
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return ", ".join(shown) + more


def run_attention(
    run_id: str,
    agents: Sequence[AgentRecord],
    every_agent: Mapping[str, AgentRecord],
    leases: Sequence[Lease],
    scope_requests: Callable[[list[str] | None], list[LeaseRequest]],
) -> RunAttention:
    """The run's attention state from its agents, every agent of the repository (by id: a
    scope may be held by another run's agent) and the live lease table."""
    holders: dict[str, AgentRecord] = {}
    for record in every_agent.values():
        holders[record.lease_holder or record.agent_id] = record
    blocked: dict[str, tuple[str, ...]] = {}
    moving = False
    reruns = reruns_of(every_agent.values()) if any(a.depends_on for a in agents) else {}
    asking: list[AgentRecord] = []
    for agent in agents:
        if agent.status in (AgentStatus.RUNNING, AgentStatus.QUEUED):
            moving = True
        if agent.status is not AgentStatus.WAITING:
            continue
        if pending_approval(agent) is not None:
            asking.append(agent)  # waits for the person: only the orchestrator moves it
            continue
        if agent.started_at is not None and not agent.approval:
            moving = True  # a running agent's command waits for a named resource: it runs
            continue
        mine = agent.lease_holder or agent.agent_id
        blockers: list[str] = []
        for dep in agent.depends_on:  # an unmerged dependency: merged by the orchestrator
            record = current_agent(dep, every_agent, reruns)
            if record is not None and record.status is not AgentStatus.MERGED:
                blockers.append(record.agent_id)
        for other_id in agent.waits_for:
            other = every_agent.get(other_id)
            if other is not None and not scope_freed(other):
                blockers.append(other_id)
        requests = scope_requests(agent.write_scope)
        for lease in leases:
            if lease.holder == mine:
                continue
            if any(conflicts(request, lease.request) for request in requests):
                holder = holders.get(lease.holder)
                blockers.append(holder.agent_id if holder is not None else lease.holder)
        unique = tuple(dict.fromkeys(blockers))
        blocked[agent.agent_id] = unique
        if not unique:
            moving = True  # nothing holds it back: it starts by itself
        for blocker in unique:
            record = every_agent.get(blocker)
            if record is None or record.status.active:
                moving = True  # an agent that will finish by itself, or an unknown holder
    mergeable = tuple(a.agent_id for a in agents if a.status is AgentStatus.SUCCEEDED)
    redone = _being_redone(agents)
    attention = tuple(
        a.agent_id
        for a in agents
        if a.lease_lost
        or a.stop_reason is StopReason.BUDGET_EXHAUSTED
        or (a.status in REDO and a.agent_id not in redone)
        or pending_approval(a) is not None
    )
    by_id = dict(every_agent)
    if asking:
        step = _approval_step(asking)
        if moving:
            return RunAttention(False, step, mergeable, blocked, attention)
        rest = _next_step(run_id, agents, by_id, blocked, mergeable, redone=redone)
        return RunAttention(True, f"{step}; {rest}", mergeable, blocked, attention)
    if moving:
        running = sum(1 for a in agents if a.status.active)
        step = (
            f'get_status(run_id="{run_id}", since=<cursor>, wait_s=600): {running} agent(s) '
            "still queued, waiting or running; it answers once the run needs you"
        )
        return RunAttention(False, step, mergeable, blocked, attention)
    return RunAttention(
        True,
        _next_step(run_id, agents, by_id, blocked, mergeable, redone=redone),
        mergeable,
        blocked,
        attention,
    )


def _being_redone(agents: Sequence[AgentRecord]) -> frozenset[str]:
    """The agents a rerun replaces (one not discarded, and not ended before it ran), whose
    status stays as it was until the rerun starts: nothing to do about them, the rerun is
    under way or done."""
    return frozenset(a.rerun_of for a in agents if a.rerun_of and replaces_its_agent(a))


def _one_error(ids: Sequence[str], by_id: Mapping[str, AgentRecord]) -> str | None:
    """The error several agents (`ids`) all ended with, shown once (at most
    `COMMON_ERROR_CHARS`), None unless there are two or more and they share it."""
    if len(ids) < 2:
        return None
    errors = {
        (record.result.error if record is not None and record.result is not None else None)
        for record in (by_id.get(i) for i in ids)
    }
    if len(errors) != 1:
        return None
    error = errors.pop()
    if not error:
        return None
    error = " ".join(error.split())
    if len(error) > COMMON_ERROR_CHARS:
        error = error[: COMMON_ERROR_CHARS - 1] + "…"
    return error


def _approval_step(asking: Sequence[AgentRecord]) -> str:
    """The call that answers the oldest pending approvals, saying what each agent wants."""
    parts: list[str] = []
    for agent in sorted(asking, key=lambda a: a.approval.requested_at if a.approval else 0)[:3]:
        approval = pending_approval(agent)
        if approval is None:
            continue
        why = f" ({approval.why[:120]})" if approval.why else ""
        parts.append(
            f'answer_approval(approval_id="{approval.approval_id}", allow=true|false): '
            f"{agent.name} asks for {approval.kind} {approval.subject[:160]!r}{why}"
        )
    more = f"; and {len(asking) - 3} more approvals" if len(asking) > 3 else ""
    return "ask the person, then " + "; ".join(parts) + more


def _next_step(
    run_id: str,
    agents: Sequence[AgentRecord],
    by_id: Mapping[str, AgentRecord],
    blocked: Mapping[str, tuple[str, ...]],
    mergeable: tuple[str, ...],
    *,
    redone: frozenset[str],
) -> str:
    """What a settled run needs, naming the agents (`redone`: those a rerun replaces)."""
    parts: list[str] = []
    waiting = [a.agent_id for a in agents if a.status is AgentStatus.WAITING]
    if mergeable:
        then = f"; then {_names(waiting, by_id)} start(s)" if waiting else ""
        parts.append(
            f'merge_results(run_id="{run_id}") merges {_names(list(mergeable), by_id)}{then}'
        )
    elsewhere: dict[str, list[str]] = {}
    stuck: list[str] = []
    for blockers in blocked.values():
        for blocker in blockers:
            record = by_id.get(blocker)
            if record is None or blocker in mergeable:
                continue
            if record.run_id != run_id and record.status is AgentStatus.SUCCEEDED:
                elsewhere.setdefault(record.run_id, []).append(blocker)
            elif record.status in _HOLDS_SCOPE and blocker not in stuck:
                stuck.append(blocker)
    for other_run, ids in elsewhere.items():
        parts.append(
            f'merge_results(run_id="{other_run}") merges {_names(ids, by_id)} of an earlier run, '
            "whose scope agents of this run wait for"
        )
    if stuck:
        ids = ", ".join(f'"{i}"' for i in stuck)
        parts.append(
            f"{_names(stuck, by_id)} ended without being merged and hold(s) a scope others wait "
            f"for: rerun_subagent(agent_id=…) to redo, or merge_results(run_id=…, discard=[{ids}])"
        )
    failed = [
        a.agent_id
        for a in agents
        if (a.status in REDO or a.status is AgentStatus.INTERRUPTED)
        and a.agent_id not in stuck
        and a.agent_id not in redone
    ]
    if failed:
        common = _one_error(failed, by_id)
        if common is not None:
            parts.append(
                f"{_names(failed, by_id)} did not succeed, all with one error ({common}): "
                "once its cause is gone, rerun_subagent each, or discard"
            )
        else:
            parts.append(
                f"{_names(failed, by_id)} did not succeed: read the agent's result, then "
                "rerun_subagent or discard"
            )
    if not parts:
        return "nothing to do: every agent of the run is merged, discarded or cancelled"
    return "; ".join(parts)
