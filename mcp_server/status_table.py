"""Short human-readable renderings of the tools' results (tables of agents, merge reports).

Clients that show text show these; the structured content carries every field.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence

from orchestration.contracts import (
    AgentBrief,
    AgentView,
    CancelResult,
    MergeResult,
    RerunResult,
    SpawnResult,
    StatusResult,
    TokenUsage,
)
from orchestration.state import AgentRecord, RunRecord
from toolbus.lease_store import Lease

AGENT_COLUMNS = ("agent", "name", "status", "turns", "tokens in/out/cr/cw", "changed")


def agent_row(a: AgentView | AgentRecord) -> list[str]:
    """An agent's row of the agent table: the same columns for a live status and for the
    durable state."""
    return [
        a.agent_id,
        a.name,
        a.status.value,
        f"{a.turns}/{a.max_turns}",
        _tokens(a.tokens),
        _files(a.changed_files),
    ]


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain fixed-width table (one format string for every row: a status of many agents is
    rendered on each `get_status`)."""
    widths = [max(map(len, column)) for column in zip(headers, *rows, strict=True)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(line.format(*row).rstrip() for row in (headers, *rows))


def _tokens(t: TokenUsage) -> str:
    return f"{t.input}/{t.output}/{t.cache_read}/{t.cache_write}"


def _scope(scope: list[str] | None) -> str:
    if scope is None:
        return "(whole repo)"
    if not scope:
        return "(read-only)"
    return ",".join(scope)


def _files(paths: Sequence[str], limit: int = 4) -> str:
    if not paths:
        return "-"
    shown = ", ".join(paths[:limit])
    return shown + (f" (+{len(paths) - limit})" if len(paths) > limit else "")


def _briefs(agents: Sequence[AgentBrief]) -> str:
    return table(
        ["agent", "name", "status", "write scope", "waits for"],
        [
            [a.agent_id, a.name, a.status.value, _scope(a.write_scope), ",".join(a.waits_for)]
            for a in agents
        ],
    )


def spawn_text(result: SpawnResult) -> str:
    est = result.estimate
    lines = [
        f"run {result.run_id} started on {result.base_commit[:12]} "
        f"({len(result.agents)} agents; they run in the background)",
        _briefs(result.agents),
        f"estimate: ~{est.estimated_total_tokens} tokens of a {est.budget_tokens}-token budget",
    ]
    lines.extend(f"warning: {w}" for w in result.warnings)
    lines.append(
        f"next: get_status(run_id={result.run_id!r}, since=<cursor>, wait_s=30) until no agent "
        "is queued/waiting/running, then merge_results."
    )
    return "\n".join(lines)


def agent_table(agents: Sequence[AgentView] | Sequence[AgentRecord]) -> str:
    return table(AGENT_COLUMNS, [agent_row(a) for a in agents])


def status_text(
    result: StatusResult, agents_table: Callable[[Sequence[AgentView]], str] = agent_table
) -> str:
    """Per run a line of totals and its agent table (the server passes an `agents_table` that
    keeps the tables and rows of unchanged agents)."""
    if not result.runs:
        return f"no runs yet (cursor {result.cursor})"
    parts: list[str] = []
    for run in result.runs:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(run.totals.by_status.items()))
        parts.append(
            f"run {run.run_id} (base {run.base_commit[:12]}): {counts}; budget "
            f"{run.totals.budget_used}/{run.totals.budget_tokens} tokens used"
        )
        parts.append(agents_table(run.agents))
    changed = "" if result.changed else " (nothing changed)"
    parts.append(f"cursor {result.cursor}{changed}")
    return "\n".join(parts)


def merge_text(result: MergeResult) -> str:
    verb = "dry run" if result.dry_run else "merge"
    rows = [
        [
            a.agent_id,
            a.name,
            a.outcome.value,
            ", ".join(a.conflicts) if a.conflicts else (a.reason or _files(a.diffstat.paths)),
        ]
        for a in result.agents
    ]
    lines = [
        f"{verb} of run {result.run_id}: head {result.head[:12]}"
        + (f" on {result.branch}" if result.branch else ""),
        table(["agent", "name", "outcome", "detail"], rows),
        f"{result.diffstat.files} files, +{result.diffstat.insertions} "
        f"-{result.diffstat.deletions}",
    ]
    conflicted = [a.agent_id for a in result.agents if a.outcome.value == "conflicted"]
    if conflicted:
        lines.append(
            "conflicted agents keep their branch: rerun_subagent(agent_id) each one on the new "
            "head (do not merge by hand): " + ", ".join(conflicted)
        )
    return "\n".join(lines)


def cancel_text(result: CancelResult) -> str:
    return f"run {result.run_id}:\n" + _briefs(result.agents)


def rerun_text(result: RerunResult) -> str:
    a = result.agent
    return (
        f"{a.agent_id} ({a.name}) replaces {result.replaces} in run {result.run_id}, based on "
        f"{result.base_commit[:12]}; status {a.status.value}"
    )


def store_text(
    runs: Sequence[RunRecord],
    agents: Sequence[AgentRecord],
    leases: Sequence[Lease],
    live_servers: Collection[str] | None = None,
) -> str:
    """The `fanout-mcp status` report, from the durable state; with `live_servers`, it says
    which agents shown active belong to a server that is gone."""
    if not runs:
        return "no runs in this repository"
    parts: list[str] = []
    now = time.time()
    for run in runs:
        mine = [a for a in agents if a.run_id == run.run_id]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.created_at))
        parts.append(f"run {run.run_id}  created {when}  base {run.base_commit[:12]}")
        parts.append(agent_table(mine))
        parts.append("")
    if leases:
        parts.append("leases")
        parts.append(
            table(
                ["holder", "resource", "mode", "token", "expires in"],
                [
                    [
                        lease.holder,
                        lease.resource or "(whole repo)",
                        lease.mode.value,
                        str(lease.token),
                        f"{lease.expires_at - now:.0f}s",
                    ]
                    for lease in leases
                ],
            )
        )
    else:
        parts.append("no leases held")
    if live_servers is not None:
        orphans = [a.agent_id for a in agents if a.status.active and a.owner not in live_servers]
        if orphans:
            parts.append("")
            one = len(orphans) == 1
            them, their = ("it", "its") if one else ("them", "their")
            parts.append(
                f"{', '.join(orphans)}: shown active, but {their} server is gone; the next "
                f"fanout-mcp server on this repository marks {them} interrupted "
                f"(rerun_subagent resumes {them})"
            )
    return "\n".join(parts)
