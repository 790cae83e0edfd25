"""The `fanout-mcp status` report: runs, agents and leases from the durable state, as tables.

(The tools' answers are rendered in `mcp_server.answers`.)
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence

from orchestration.contracts import (
    AgentView,
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


def _files(paths: Sequence[str], limit: int = 4) -> str:
    if not paths:
        return "-"
    shown = ", ".join(paths[:limit])
    return shown + (f" (+{len(paths) - limit})" if len(paths) > limit else "")


def agent_table(agents: Sequence[AgentView] | Sequence[AgentRecord]) -> str:
    return table(AGENT_COLUMNS, [agent_row(a) for a in agents])


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
