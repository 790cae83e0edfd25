"""The request models of the tools whose requests `orchestration.contracts` does not hold:
they refuse unknown fields."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from orchestration.attention import WakeOn
from orchestration.contracts import MAX_TASKS


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StatusRequest(_Input):
    """Input of `get_status`."""

    run_id: str | None = Field(default=None, min_length=1, max_length=64)
    agent_ids: list[str] | None = Field(default=None, max_length=MAX_TASKS * 4)
    since: int | None = Field(
        default=None,
        ge=0,
        description="the `cursor` of an earlier answer (0 right after spawning): lists only "
        "the agents that changed after it; with `wait_s`, waits until the run needs you",
    )
    wait_s: float | None = Field(
        default=None,
        ge=0,
        le=3600,
        description="long-poll: with `since`, wait up to this many seconds (capped by the "
        "server) for what `wake_on` names; an agent's turn never wakes it",
    )
    wake_on: WakeOn = Field(
        default=WakeOn.SETTLED,
        description="what ends the wait early: 'settled' (the run needs you: everything "
        "finished, or the rest waits on a merge) or 'finished' (any agent finished, to merge as "
        "results arrive); a lost lease or an exhausted budget always does",
    )
    detail: list[str] | None = Field(
        default=None,
        max_length=16,
        description="agent ids whose full record to include (result with commands, leases, "
        "follow-ups); ask only when an agent's line gives a reason",
    )


class CancelRequest(_Input):
    """Input of `cancel_subagents`."""

    run_id: str = Field(min_length=1, max_length=64)
    agent_ids: list[str] | None = Field(default=None, max_length=MAX_TASKS * 4)


class RerunRequest(_Input):
    """Input of `rerun_subagent`."""

    agent_id: str = Field(min_length=1, max_length=80)
    instructions: str | None = Field(
        default=None,
        max_length=100_000,
        description="extra guidance for the new attempt (what to do differently)",
    )


class PingRequest(_Input):
    """Input of `ping` (none)."""


class AnswerApprovalRequest(_Input):
    """Input of `answer_approval`."""

    approval_id: str = Field(min_length=1, max_length=120)
    allow: bool = Field(description="true lets the agent's call run; false refuses it")
    note: str | None = Field(
        default=None, max_length=2_000, description="a word for the agent (why, or what instead)"
    )
