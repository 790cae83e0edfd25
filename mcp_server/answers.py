"""The tools' answers as the orchestrating model reads them: compact, bounded, the same facts in
the structured content and in the text (a client shows one or the other).

Per agent an answer holds what the orchestrator decides with: id, name, status, a one-line
summary, changed files with lines added and removed as counts, total tokens, and flags that need
attention. Everything else is one request away: `get_status(detail=[ids])`, and the agent's
result, diff and transcript resources. Fields at their default are left out of the JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from orchestration.contracts import (
    AgentBrief,
    AgentMergeResult,
    AgentResultView,
    AgentStatus,
    AgentView,
    Approval,
    CancelResult,
    MergeOutcome,
    MergeResult,
    RerunResult,
    RunTotals,
    RunView,
    ServerLoad,
    SpawnResult,
    StatusResult,
    TokenUsage,
)
from orchestration.prompts import SUMMARY_ANSWER_CHARS

LINE_CHARS = 120
"""The most of an agent's summary an agent's line shows (its first line)."""
# a merge reason longer than this, shared by several agents, is given whole once
SHARED_REASON_MIN_CHARS = 40
FOLLOW_UPS_SHOWN = 10
FOLLOW_UP_CHARS = 300
COMMANDS_SHOWN = 10


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


def dump(model: BaseModel) -> dict[str, Any]:
    """The structured content: JSON, fields at their default left out."""
    return model.model_dump(mode="json", exclude_defaults=True)


def one_line(text: str | None, limit: int = LINE_CHARS) -> str:
    """The first non-empty line of `text`, at most `limit` characters."""
    for raw in (text or "").splitlines():
        line = raw.strip()
        if line:
            return line if len(line) <= limit else line[: limit - 1] + "…"
    return ""


def _total(tokens: TokenUsage) -> int:
    return tokens.input + tokens.output + tokens.cache_read + tokens.cache_write


# --- get_status --------------------------------------------------------------------------------


class AgentLine(_Answer):
    """One agent in a compact answer."""

    agent_id: str
    name: str
    status: AgentStatus
    summary: str = Field(
        default="", description="one line: the result's first line, the error, or what it waits for"
    )
    files: int = Field(default=0, description="files changed")
    added: int = Field(default=0, description="lines added")
    removed: int = Field(default=0, description="lines removed")
    tokens: int = Field(default=0, description="total tokens (input, output, cache)")
    flags: list[str] = Field(
        default_factory=list[str],
        description="what needs attention: lease_lost, conflict, error, dropped files, waits",
    )


class RunTotalsLine(_Answer):
    """A run's totals in a compact answer."""

    agents: int
    by_status: dict[str, int]
    tokens: int
    budget_remaining: int
    spent: str | None = Field(
        default=None, description="once settled: what the run spent against spawn's estimate"
    )


class RunLine(_Answer):
    """One run in a compact `get_status` answer."""

    run_id: str
    settled: bool = Field(description="true when nothing in the run moves without you: do `next`")
    next: str = Field(description="the call to make next, naming the agents")
    totals: RunTotalsLine
    agents: list[AgentLine] = Field(
        description="the agents that changed since `since` (all of them without it)"
    )


class AgentDetail(_Answer):
    """The full record of one agent, asked for with `detail`; its summary and follow-ups are
    bounded here (the whole result is the agent's result resource)."""

    agent: AgentView
    result_resource: str


class ServerLine(_Answer):
    """The server's limits across runs."""

    running: int
    max_running: int
    tokens: int = Field(description="tokens all runs of this server used")
    budget_remaining: int | None = None
    rate_limited: str | None = Field(
        default=None, description="while the model API's rate limit holds requests back: how"
    )


class StatusAnswer(_Answer):
    """Result of `get_status`."""

    cursor: int = Field(
        description="pass as `since` (with `wait_s`) to wait until the run needs you after this "
        "answer; agents that did not change since are not repeated"
    )
    changed: bool = Field(description="false when a long-poll ended at wait_s with nothing to do")
    runs: list[RunLine]
    closed_runs: int = Field(
        default=0,
        description="runs left out because none is named and nothing is left to do in them "
        "(every agent merged or discarded, none changed after `since`); get_status with "
        "`run_id` shows one",
    )
    last_closed_run: str | None = Field(default=None, description="the newest of those runs")
    detail: list[AgentDetail] = Field(default_factory=list[AgentDetail])
    server: ServerLine | None = Field(
        default=None,
        description="the limits across every run of this server, shown when one binds: all "
        "its agent slots taken (more wait, queued) or a server-wide token budget set",
    )


def server_line(load: ServerLoad) -> ServerLine | None:
    """The server's line, when a limit across runs binds or is set, or the model API's rate
    limit holds requests back."""
    if load.budget_tokens is None and load.running < load.max_running and load.rate_limited is None:
        return None
    return ServerLine(
        running=load.running,
        max_running=load.max_running,
        tokens=load.tokens_used,
        budget_remaining=load.budget_remaining,
        rate_limited=load.rate_limited,
    )


def agent_line(view: AgentView) -> AgentLine:
    """An agent's compact line from its full view."""
    result = view.result
    flags: list[str] = []
    summary = ""
    files = added = removed = 0
    if result is not None:
        summary = one_line(result.summary)
        files = len(result.changed_files)
        added = sum(c.lines_added for c in result.changed_files)
        removed = sum(c.lines_removed for c in result.changed_files)
        if not summary:
            summary = one_line(result.error)  # (the error once: not as a flag as well)
        elif result.error and view.status is not AgentStatus.SUCCEEDED:
            flags.append("error: " + one_line(result.error, 80))
        if result.dropped_files:
            flags.append(f"dropped {len(result.dropped_files)} (see detail)")
        if result.stop_reason.value not in ("finished",):
            flags.append(f"stop: {result.stop_reason.value}")
    else:
        files = len(view.changed_files)
        if view.status is AgentStatus.WAITING or view.status_reason:
            summary = one_line(view.status_reason)
    if view.approval is not None:
        flags.append(f"asks approval {view.approval.approval_id}")
    if view.lease_lost:
        flags.append("lease_lost")
    if view.status is AgentStatus.CONFLICTED:
        flags.append("conflict")
    if view.status is AgentStatus.STALE:
        flags.append("stale")
    elif view.reads_changing:
        flags.append("read what another changes: " + "; ".join(view.reads_changing[:3]))
    if view.status is AgentStatus.VERIFY_FAILED:
        flags.append("verify_failed")
    return AgentLine(
        agent_id=view.agent_id,
        name=view.name,
        status=view.status,
        summary=summary,
        files=files,
        added=added,
        removed=removed,
        tokens=_total(view.tokens),
        flags=flags,
    )


def bounded_result(result: AgentResultView, agent_id: str) -> AgentResultView:
    """A result as `detail` shows it: the summary at most `SUMMARY_ANSWER_CHARS`, at most
    `FOLLOW_UPS_SHOWN` follow-ups of `FOLLOW_UP_CHARS`, the last `COMMANDS_SHOWN` commands."""
    summary = result.summary
    if len(summary) > SUMMARY_ANSWER_CHARS:
        rest = len(summary) - (SUMMARY_ANSWER_CHARS - 100)
        summary = (
            summary[: SUMMARY_ANSWER_CHARS - 100]
            + f"… ({rest} more characters in fanout://agents/{agent_id}/result)"
        )
    follow_ups = [one_line(f, FOLLOW_UP_CHARS) for f in result.follow_ups[:FOLLOW_UPS_SHOWN]]
    if len(result.follow_ups) > FOLLOW_UPS_SHOWN:
        follow_ups.append(f"… {len(result.follow_ups) - FOLLOW_UPS_SHOWN} more in the result")
    return result.model_copy(
        update={
            "summary": summary,
            "follow_ups": follow_ups,
            "commands": result.commands[-COMMANDS_SHOWN:],
            "error": None if result.error is None else result.error[:SUMMARY_ANSWER_CHARS],
        }
    )


def _spent(totals: RunTotals) -> str | None:
    estimate = totals.estimate_tokens
    if not estimate:
        return None
    off = (totals.budget_used - estimate) / estimate
    return (
        f"{totals.budget_used} budget units spent against spawn's estimate of {estimate} "
        f"({off:+.0%})"
    )


def _run_line(run: RunView, changed: set[str] | None) -> RunLine:
    totals = run.totals
    return RunLine(
        run_id=run.run_id,
        settled=run.settled,
        next=run.next,
        totals=RunTotalsLine(
            agents=totals.agents,
            by_status=totals.by_status,
            tokens=_total(totals.tokens),
            budget_remaining=totals.budget_remaining,
            spent=_spent(totals) if run.settled else None,
        ),
        agents=[
            agent_line(view) for view in run.agents if changed is None or view.agent_id in changed
        ],
    )


def status_answer(
    result: StatusResult, detail: Sequence[str] = (), *, every_run: bool = True
) -> StatusAnswer:
    """The compact answer of `get_status` from the orchestrator's full status. Unless
    `every_run` (a run or agents were named), runs with nothing left to do and nothing new are
    counted, not shown: without that, every answer would grow with the server's history."""
    wanted = set(detail)
    details: list[AgentDetail] = []
    runs: list[RunLine] = []
    closed: list[str] = []
    for run in result.runs:
        changed = None if run.changed_agents is None else set(run.changed_agents)
        if (
            not every_run
            and not changed
            and run.agents
            and all(view.status.closed for view in run.agents)
            and not wanted.intersection(view.agent_id for view in run.agents)
        ):
            closed.append(run.run_id)
            continue
        runs.append(_run_line(run, changed))
        for view in run.agents:
            if view.agent_id in wanted:
                shown = view
                if view.result is not None:
                    shown = view.model_copy(
                        update={"result": bounded_result(view.result, view.agent_id)}
                    )
                details.append(
                    AgentDetail(
                        agent=shown, result_resource=f"fanout://agents/{view.agent_id}/result"
                    )
                )
    return StatusAnswer(
        cursor=result.cursor,
        changed=result.changed,
        runs=runs,
        closed_runs=len(closed),
        last_closed_run=closed[-1] if closed else None,
        detail=details,
        server=server_line(result.server),
    )


def _line_text(a: AgentLine) -> str:
    parts = [a.agent_id, a.name, a.status.value]
    if a.files:
        parts.append(f"{a.files} files +{a.added} -{a.removed}")
    if a.tokens:
        parts.append(f"{a.tokens} tok")
    text = " · ".join(parts)
    if a.summary:
        text += f": {a.summary}"
    if a.flags:
        text += f" [{'; '.join(a.flags)}]"
    return text


def status_text(answer: StatusAnswer) -> str:
    """The same answer as text."""
    if not answer.runs and not answer.closed_runs:
        return f"no runs yet (cursor {answer.cursor})"
    lines: list[str] = []
    for run in answer.runs:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(run.totals.by_status.items()))
        state = "settled" if run.settled else "moving"
        spent = f"; {run.totals.spent}" if run.totals.spent else ""
        lines.append(
            f"run {run.run_id} {state}: {counts}; {run.totals.tokens} tokens, "
            f"{run.totals.budget_remaining} left in the budget{spent}"
        )
        lines.extend(_line_text(a) for a in run.agents)
        lines.append(f"next: {run.next}")
    if answer.closed_runs:
        lines.append(
            f"{answer.closed_runs} closed runs not shown (every agent merged or discarded; the "
            f"newest {answer.last_closed_run}): get_status with run_id shows one"
        )
    for item in answer.detail:
        lines.append(f"detail of {item.agent.agent_id}: {item.agent.model_dump_json()}")
    if answer.server is not None:
        server = answer.server
        budget = (
            ""
            if server.budget_remaining is None
            else f", {server.budget_remaining} left in the server's budget"
        )
        limited = "" if server.rate_limited is None else f"; {server.rate_limited}"
        lines.append(
            f"server: {server.running} of {server.max_running} agent slots taken "
            f"(FANOUT_MAX_RUNNING); {server.tokens} tokens used by all runs{budget}{limited}"
        )
    lines.append(f"cursor {answer.cursor}" + ("" if answer.changed else " (nothing to do yet)"))
    return "\n".join(lines)


# --- spawn, cancel, rerun ----------------------------------------------------------------------


class AgentBriefLine(_Answer):
    """An agent as spawn, cancel and rerun report it."""

    agent_id: str
    name: str
    status: AgentStatus
    waits_for: list[str] = Field(
        default_factory=list[str], description="agents whose scope this one waits for"
    )
    depends_on: list[str] = Field(
        default_factory=list[str], description="agents merged before it starts"
    )


def _brief(a: AgentBrief) -> AgentBriefLine:
    return AgentBriefLine(
        agent_id=a.agent_id,
        name=a.name,
        status=a.status,
        waits_for=list(a.waits_for),
        depends_on=list(a.depends_on),
    )


class EstimateLine(_Answer):
    """The cost estimate of a run, before it starts."""

    total_tokens: int
    uncached_tokens: int
    budget_tokens: int
    prompt_cache: str = Field(default="", description="how the shared prefix is cached, or not")
    note: str = ""


class SpawnAnswer(_Answer):
    """Result of `spawn_subagents`."""

    run_id: str
    base_commit: str
    snapshot_of_uncommitted_changes: bool = False
    agents: list[AgentBriefLine]
    estimate: EstimateLine
    warnings: list[str] = Field(default_factory=list[str])
    permissions: str = ""
    mcp_tools: list[str] = Field(default_factory=list[str])
    next: str


def spawn_answer(result: SpawnResult) -> SpawnAnswer:
    est = result.estimate
    return SpawnAnswer(
        run_id=result.run_id,
        base_commit=result.base_commit,
        snapshot_of_uncommitted_changes=result.snapshot_of_uncommitted_changes,
        agents=[_brief(a) for a in result.agents],
        estimate=EstimateLine(
            total_tokens=est.estimated_total_tokens,
            uncached_tokens=est.estimated_uncached_tokens,
            budget_tokens=est.budget_tokens,
            prompt_cache=est.prompt_cache,
            note=est.note,
        ),
        warnings=result.warnings,
        permissions=result.permissions,
        mcp_tools=result.mcp_tools,
        next=(
            f'get_status(run_id="{result.run_id}", since=0, wait_s=600): it answers once the '
            "run needs you (settled), then do its `next`"
        ),
    )


def spawn_text(answer: SpawnAnswer) -> str:
    est = answer.estimate
    lines = [
        f"run {answer.run_id} started on {answer.base_commit[:12]} with {len(answer.agents)} "
        f"agents (running in the background); estimate ~{est.total_tokens} tokens of a "
        f"{est.budget_tokens}-token budget"
    ]
    if est.prompt_cache:
        lines.append(f"prompt cache: {est.prompt_cache}")
    for a in answer.agents:
        waits = f" (waits for {', '.join(a.waits_for)})" if a.waits_for else ""
        if a.depends_on:
            waits += f" (depends on {', '.join(a.depends_on)})"
        lines.append(f"{a.agent_id} {a.name} {a.status.value}{waits}")
    lines.extend(f"warning: {w}" for w in answer.warnings)
    if answer.permissions:
        lines.append(f"permissions: {answer.permissions}")
    if answer.mcp_tools:
        lines.append(f"MCP tools: {', '.join(answer.mcp_tools)}")
    lines.append(f"next: {answer.next}")
    return "\n".join(lines)


class ApprovalAnswer(_Answer):
    """Result of `answer_approval`."""

    approval_id: str
    agent_id: str
    decision: str
    what: str


def approval_answer(approval: Approval) -> ApprovalAnswer:
    return ApprovalAnswer(
        approval_id=approval.approval_id,
        agent_id=approval.agent_id,
        decision=approval.decision or "pending",
        what=f"{approval.kind} {approval.subject[:200]}",
    )


def approval_text(answer: ApprovalAnswer) -> str:
    return (
        f"{answer.approval_id}: {answer.decision} ({answer.what}); the agent {answer.agent_id} "
        "goes on at once"
    )


class CancelAnswer(_Answer):
    """Result of `cancel_subagents`."""

    run_id: str
    agents: list[AgentBriefLine]


def cancel_answer(result: CancelResult) -> CancelAnswer:
    return CancelAnswer(run_id=result.run_id, agents=[_brief(a) for a in result.agents])


def cancel_text(answer: CancelAnswer) -> str:
    lines = [f"run {answer.run_id}:"]
    lines.extend(f"{a.agent_id} {a.name} {a.status.value}" for a in answer.agents)
    return "\n".join(lines)


class RerunAnswer(_Answer):
    """Result of `rerun_subagent`."""

    run_id: str
    replaces: str
    agent: AgentBriefLine
    base_commit: str


def rerun_answer(result: RerunResult) -> RerunAnswer:
    return RerunAnswer(
        run_id=result.run_id,
        replaces=result.replaces,
        agent=_brief(result.agent),
        base_commit=result.base_commit,
    )


def rerun_text(answer: RerunAnswer) -> str:
    a = answer.agent
    return (
        f"{a.agent_id} ({a.name}) replaces {answer.replaces} in run {answer.run_id}, based on "
        f"{answer.base_commit[:12]}; status {a.status.value}; next: get_status(run_id="
        f'"{answer.run_id}", since=<cursor>, wait_s=600)'
    )


# --- merge_results -----------------------------------------------------------------------------


class MergeLine(_Answer):
    """One agent's outcome in `merge_results`."""

    agent_id: str
    name: str
    outcome: MergeOutcome
    files: int = 0
    added: int = 0
    removed: int = 0
    conflicts: list[str] = Field(default_factory=list[str])
    stale_reads: list[str] = Field(
        default_factory=list[str], description="stale: files it read that changed since its base"
    )
    reason: str = ""


class MergeAnswer(_Answer):
    """Result of `merge_results`."""

    run_id: str
    dry_run: bool = False
    head: str
    branch: str | None = None
    agents: list[MergeLine]
    files: int = 0
    added: int = 0
    removed: int = 0
    verification: str | None = None


def merge_answer(result: MergeResult) -> MergeAnswer:
    # a reason several agents share (the checkout not brought forward, say) is given whole
    # once, on the first of them; the others refer to it
    first_with: dict[str, str] = {}
    lines: list[MergeLine] = []
    for a in result.agents:
        reason = _merge_reason(a)
        if len(reason) > SHARED_REASON_MIN_CHARS:
            first = first_with.setdefault(reason, a.agent_id)
            if first != a.agent_id:
                reason = f"the same as {first}"
        lines.append(
            MergeLine(
                agent_id=a.agent_id,
                name=a.name,
                outcome=a.outcome,
                files=a.diffstat.files,
                added=a.diffstat.insertions,
                removed=a.diffstat.deletions,
                conflicts=a.conflicts[:20],
                stale_reads=a.stale_reads[:20],
                reason=reason,
            )
        )
    return MergeAnswer(
        run_id=result.run_id,
        dry_run=result.dry_run,
        verification=result.verification,
        head=result.head,
        branch=result.branch,
        agents=lines,
        files=result.diffstat.files,
        added=result.diffstat.insertions,
        removed=result.diffstat.deletions,
    )


def _merge_reason(a: AgentMergeResult) -> str:
    """An outcome's reason as the answer shows it: the output's tail of a failed verification
    (its last lines), else one line."""
    if a.outcome is MergeOutcome.VERIFY_FAILED and a.reason:
        return a.reason[-1_200:]
    return one_line(a.reason, 500 if a.stale_reads else 200)


def merge_text(answer: MergeAnswer) -> str:
    verb = "dry run" if answer.dry_run else "merge"
    lines = [
        f"{verb} of run {answer.run_id}: head {answer.head[:12]}"
        + (f" on {answer.branch}" if answer.branch else "")
        + f"; {answer.files} files +{answer.added} -{answer.removed}"
    ]
    for a in answer.agents:
        text = f"{a.agent_id} {a.name} {a.outcome.value}"
        if a.files:
            text += f" {a.files} files +{a.added} -{a.removed}"
        if a.conflicts:
            text += f": conflicts in {', '.join(a.conflicts)}"
        elif a.reason and a.outcome in (MergeOutcome.STALE, MergeOutcome.VERIFY_FAILED):
            text += f": {a.reason}"
        elif a.reason:
            text += f": {a.reason}"
        lines.append(text)
    if answer.verification:
        lines.append(f"verification: {answer.verification}")
    redo = (MergeOutcome.CONFLICTED, MergeOutcome.STALE, MergeOutcome.VERIFY_FAILED)
    conflicted = [a.agent_id for a in answer.agents if a.outcome in redo]
    if conflicted:
        lines.append(
            "they keep their branch: rerun_subagent(agent_id) each on the new head (do not "
            "merge by hand): " + ", ".join(conflicted)
        )
    return "\n".join(lines)


class PingResult(BaseModel):
    """Result of `ping`."""

    ok: bool
    server: str
    version: str
