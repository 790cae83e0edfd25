"""The executor seam: the runner hands an agent, once it holds its leases and a slot, to the
executor, which runs it to its end and records its result through `AgentRunner.finish`."""

from __future__ import annotations

from typing import Any, Protocol

from orchestration.agent import Budget, LoopOutcome
from orchestration.clock import Clock
from orchestration.context import RepoContext
from orchestration.contracts import AgentStatus
from orchestration.registry import AgentRuntime
from orchestration.state import AgentRecord, RunRecord
from toolbus.permissions import PermissionPolicy


class AgentRunner(Protocol):
    """What an executor uses of the runner (`orchestration.runner.AgentRunner`)."""

    clock: Clock

    async def run_in_process(self, ctx: RepoContext, runtime: AgentRuntime) -> None: ...

    async def start_commit(self, ctx: RepoContext, agent: AgentRecord) -> str: ...

    def policy(self, run: RunRecord, agent: AgentRecord) -> PermissionPolicy: ...

    def budget(self, ctx: RepoContext, run_id: str) -> Budget: ...

    def record_remote_turn(self, ctx: RepoContext, agent_id: str, turn: dict[str, Any]) -> None: ...

    async def finish(
        self,
        ctx: RepoContext,
        runtime: AgentRuntime,
        outcome: LoopOutcome,
        status: AgentStatus | None = None,
        *,
        remote_dropped: list[str] | None = None,
        remote_refused: dict[str, str] | None = None,
    ) -> None: ...


class Executor(Protocol):
    """Where agents run."""

    name: str
    offers_mcp: bool  # its agents can call the downstream MCP servers (`FANOUT_MCP_CONFIG`)

    def describe(self) -> str:
        """One line for spawn's answer and `fanout-mcp status`: what runs the agents."""
        ...

    async def prepare(self) -> None:
        """Be ready to run agents (connect to a cluster); at spawn, before anything is made."""
        ...

    async def run(self, runner: AgentRunner, ctx: RepoContext, runtime: AgentRuntime) -> None:
        """Run the agent (its workspace, loop, bus and commands) and record its result."""
        ...

    async def aclose(self) -> None: ...


class InProcessExecutor:
    """Agents as tasks of this process, their workspaces on this machine: the default."""

    name = "in-process"
    offers_mcp = True

    def describe(self) -> str:
        return "in-process"

    async def prepare(self) -> None:
        return None

    async def run(self, runner: AgentRunner, ctx: RepoContext, runtime: AgentRuntime) -> None:
        await runner.run_in_process(ctx, runtime)

    async def aclose(self) -> None:
        return None
