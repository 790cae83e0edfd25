"""The state the tools, resources and lifespan of one server share."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import anyio
from mcp.server.elicitation import (
    CancelledElicitation,
    DeclinedElicitation,
    ElicitationResult,
)
from pydantic import BaseModel

from mcp_server.notify import ResourceNotifier
from mcp_server.repository import RepoResolver
from orchestration.config import Settings
from orchestration.contracts import Approval, StatusResult
from orchestration.errors import OrchestrationError
from orchestration.orchestrator import ModelFactory, Orchestrator, RepoContext
from toolbus.external import ExternalTools


class App:
    """What the tools, resources and lifespan share: one orchestrator, one repo resolver."""

    def __init__(self, settings: Settings, model_factory: ModelFactory | None = None) -> None:
        self.settings = settings
        self.model_factory = model_factory
        self.repos = RepoResolver(settings.repo)
        self._orchestrator: Orchestrator | None = None
        self.notifier = ResourceNotifier()
        # the last compact get_status answer built, for the question it answered
        self.last_status: tuple[StatusResult, tuple[str, ...], dict[str, Any], str] | None = None
        self.on_repo: Callable[[RepoContext], None] | None = None
        self._seen: set[Path] = set()
        # approvals whose elicitation the person dismissed: not asked again in this process
        # (they stay answerable with answer_approval until they time out)
        self._dismissed: set[str] = set()

    @property
    def orchestrator(self) -> Orchestrator:
        if self._orchestrator is None:
            raise RuntimeError("the server's lifespan has not started")
        return self._orchestrator

    @asynccontextmanager
    async def running(self) -> AsyncGenerator[App]:
        async with AsyncExitStack() as stack:
            external: ExternalTools | None = None
            config = self.settings.mcp_config
            if config is not None:  # the MCP client machinery only when servers are configured
                from mcp_server.downstream import DownstreamServers, load_downstream_config

                external = await stack.enter_async_context(
                    DownstreamServers(load_downstream_config(config))
                )
            orch = await stack.enter_async_context(
                Orchestrator(self.settings, self.model_factory, external=external)
            )
            self._orchestrator = orch
            try:
                async with anyio.create_task_group() as tg:
                    self.notifier.start(tg)
                    try:
                        yield self
                    finally:
                        tg.cancel_scope.cancel()
            finally:
                self._orchestrator = None
                self._seen.clear()

    async def approval_to_ask(self) -> Approval | None:
        """The oldest pending approval, among the repositories this server already works on,
        that the person has not dismissed here (a tool call never opens a repository just to
        look for approvals)."""
        pending: list[Approval] = []
        for root in sorted(self._seen):
            with suppress(OrchestrationError):
                pending += await self.orchestrator.pending_approvals(root)
        pending.sort(key=lambda a: a.requested_at)
        return next((a for a in pending if a.approval_id not in self._dismissed), None)

    async def take_approval_answer(self, approval: Approval, asked: ElicitationResult[Any]) -> None:
        """Record the person's answer to an elicited approval (dismissed: leave it pending)."""
        if isinstance(asked, CancelledElicitation):
            self._dismissed.add(approval.approval_id)
            return
        if isinstance(asked, DeclinedElicitation):
            allow, note = False, None
        else:
            form: object = asked.data
            if not isinstance(form, BaseModel):
                return  # nothing was asked (no approval pending)
            allow = bool(getattr(form, "allow", False))
            note = str(getattr(form, "note", "") or "") or None
        with suppress(OrchestrationError):  # answered meanwhile (another client, the tool)
            await self.orchestrator.answer_approval(approval.approval_id, allow, note, by="person")

    async def context(self, explicit: str | None = None) -> RepoContext:
        """The repository context (opened, recovered and watched on first use)."""
        path = self.repos.resolve(explicit)
        ctx = await self.orchestrator.context(path)
        if ctx.repo.root not in self._seen:
            self._seen.add(ctx.repo.root)
            if self.on_repo is not None:
                self.on_repo(ctx)
            self.notifier.watch(ctx)
        return ctx
