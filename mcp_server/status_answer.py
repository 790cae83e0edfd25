"""The `get_status` answer: its structured content and its text, built per agent once.

The orchestrator hands out the same `AgentView` object for an agent until something of it changes
(see `Orchestrator.status`); the JSON dump and the table row of such a view are kept and reused,
so a poll of a large, mostly settled run serializes only what changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mcp_server import status_table
from orchestration.contracts import AgentView, StatusResult

# model_dump's `exclude` for everything but the agents of each run
_BUT_AGENTS: dict[str, Any] = {"runs": {"__all__": {"agents"}}}


@dataclass(frozen=True)
class _AgentPart:
    view: AgentView
    dumped: dict[str, Any]
    row: list[str]


class StatusAnswers:
    """Builds `get_status` answers for one server, remembering each agent's last part."""

    def __init__(self) -> None:
        self._parts: dict[str, _AgentPart] = {}
        self._tables: dict[str, tuple[list[_AgentPart], str]] = {}
        # the last answer built, and its structured content and text (the orchestrator hands
        # out the same StatusResult while nothing it shows changed)
        self._last: tuple[StatusResult, dict[str, Any], str] | None = None

    def answer(self, status: StatusResult) -> tuple[dict[str, Any], str]:
        """(`structured(status)`, `text(status)`), both kept for the next poll of the same
        answer."""
        last = self._last
        if last is not None and last[0] is status:
            return last[1], last[2]
        structured, text = self.structured(status), self.text(status)
        self._last = (status, structured, text)
        return structured, text

    def _part(self, view: AgentView) -> _AgentPart:
        part = self._parts.get(view.agent_id)
        if part is None or part.view is not view:
            part = _AgentPart(view, view.model_dump(mode="json"), status_table.agent_row(view))
            self._parts[view.agent_id] = part
        return part

    def structured(self, status: StatusResult) -> dict[str, Any]:
        """`status.model_dump(mode="json")`, with the agents' dumps shared between answers
        (the SDK serializes the answer into new objects before it leaves the server)."""
        dumped = status.model_dump(mode="json", exclude=_BUT_AGENTS)
        for run, out in zip(status.runs, dumped["runs"], strict=True):
            out["agents"] = [self._part(view).dumped for view in run.agents]
        return dumped

    def text(self, status: StatusResult) -> str:
        """`status_table.status_text(status)`, with each run's agent table kept while its
        agents' parts are the same."""
        return status_table.status_text(status, agents_table=self._table)

    def _table(self, views: Sequence[AgentView]) -> str:
        parts = [self._part(view) for view in views]
        run_id = views[0].run_id if views else ""
        last = self._tables.get(run_id)
        if (
            last is not None
            and len(last[0]) == len(parts)
            and all(a is b for a, b in zip(last[0], parts, strict=True))
        ):
            return last[1]
        text = status_table.table(status_table.AGENT_COLUMNS, [part.row for part in parts])
        self._tables[run_id] = (parts, text)
        return text
