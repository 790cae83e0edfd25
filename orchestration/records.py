"""Facts read off an agent's durable record: its leases, its work, its workspace, its brief."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TypeGuard

from orchestration import workspace as ws_mod
from orchestration.contracts import AgentBrief, AgentStatus, Approval
from orchestration.prompts import task_prompt
from orchestration.state import AgentRecord
from toolbus.leases import LeaseRequest
from toolbus.resources import WriteScope


def scope_requests(write_scope: list[str] | None) -> list[LeaseRequest]:
    """The write leases that a write scope takes (none for a read-only agent)."""
    return list(_scope_requests(None if write_scope is None else tuple(write_scope)))


@functools.lru_cache(maxsize=4096)
def _scope_requests(write_scope: tuple[str, ...] | None) -> tuple[LeaseRequest, ...]:
    """`scope_requests`, made once per scope (frozen requests): spawn asks it of every agent
    twice (its waves, its warnings), the runner and the status polls again."""
    scope = WriteScope.of(write_scope)
    if scope.read_only:
        return ()
    return tuple(LeaseRequest.write(p) for p in scope.lease_paths())


def has_work(commit: str | None, base_commit: str) -> TypeGuard[str]:
    """Whether an agent's branch holds committed work: a commit other than its base."""
    return bool(commit) and commit != base_commit


def scope_freed(agent: AgentRecord) -> bool:
    """Whether a later wave may start: the agent was merged or discarded, or it ended without
    any work to merge (its leases are then released at once)."""
    if agent.status.closed:
        return True
    ended_empty = agent.status in (
        AgentStatus.FAILED,
        AgentStatus.CANCELLED,
        AgentStatus.INTERRUPTED,
    ) and not has_work(agent.commit, agent.base_commit)
    return ended_empty


def workspace_of(agent: AgentRecord) -> ws_mod.Workspace:
    """The agent's worktree as the workspace module describes it, from the durable record."""
    return ws_mod.Workspace(
        path=Path(agent.workspace or ""),
        branch=agent.branch or "",
        base_commit=agent.base_commit,
        run_id=agent.run_id,
        agent_id=agent.agent_id,
        included=agent.included,
    )


def brief(agent: AgentRecord) -> AgentBrief:
    """The agent as spawn, cancel and rerun answer it."""
    return AgentBrief(
        agent_id=agent.agent_id,
        name=agent.name,
        status=agent.status,
        write_scope=agent.write_scope,
        waits_for=agent.waits_for,
        depends_on=agent.depends_on,
    )


def pending_approval(agent: AgentRecord) -> Approval | None:
    """The call the agent holds for the person's answer, if any."""
    approval = agent.approval
    if approval is None or approval.decision is not None or not agent.status.active:
        return None
    return approval


def first_line(text: str, limit: int = 72) -> str:
    """The first line of `text`, cut to `limit` characters (commit subjects, task summaries)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def current_agent(
    agent_id: str, agents: Mapping[str, AgentRecord], reruns: Mapping[str, str]
) -> AgentRecord | None:
    """The agent that now stands for `agent_id`: itself, or the rerun that replaced it (and so
    on, for a rerun that was rerun). `reruns` maps an agent id to its rerun's."""
    record = agents.get(agent_id)
    seen: set[str] = set()
    while record is not None and record.agent_id in reruns and record.agent_id not in seen:
        if record.status is not AgentStatus.DISCARDED:
            break
        seen.add(record.agent_id)
        record = agents.get(reruns[record.agent_id], record)
    return record


def ended_unstarted(agent: AgentRecord) -> bool:
    """Whether the agent ended without having run: cancelled while queued or waiting, or
    failed before its workspace was ready. A rerun that ended so replaced nothing."""
    return not agent.status.active and agent.started_at is None


def replaces_its_agent(agent: AgentRecord) -> bool:
    """Whether `agent` is a rerun that stands for the agent it reruns (`rerun_of`): not
    discarded, and not ended before it ran (such a rerun replaced nothing)."""
    return (
        agent.rerun_of is not None
        and agent.status is not AgentStatus.DISCARDED
        and not ended_unstarted(agent)
    )


def reruns_of(agents: Iterable[AgentRecord]) -> dict[str, str]:
    """agent id -> the id of its latest rerun."""
    found: dict[str, str] = {}
    for agent in sorted(agents, key=lambda a: a.index):
        if agent.rerun_of is not None:
            found[agent.rerun_of] = agent.agent_id
    return found


def task_prompt_of(agent: AgentRecord) -> str:
    """The agent's own part of its system prompt (its task, scope and bounds)."""
    return task_prompt(
        name=agent.name,
        prompt=agent.prompt,
        scope=WriteScope.of(agent.write_scope),
        max_turns=agent.max_turns,
        rerun_context=agent.rerun_context,
    )


def resumes_work(agent: AgentRecord, start: str) -> bool:
    """Whether the agent starts from an agent's own work, not the user's: a rerun resumed from
    the commit its interrupted or cancelled predecessor left (`Orchestrator.rerun`)."""
    return agent.rerun_of is not None and start != agent.base_commit
