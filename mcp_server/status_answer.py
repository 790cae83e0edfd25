"""The `get_status` answer: its structured content and its text, built per agent once.

The orchestrator hands out the same `AgentView` object for an agent until something of it changes
(see `Orchestrator.status`); the JSON dump and the table row of such a view are kept and reused,
so a poll of a large, mostly settled run serializes only what changed.
"""

from __future__ import annotations

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
        return status_table.status_text(status, row=lambda view: self._part(view).row)
