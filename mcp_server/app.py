"""The state the tools, resources and lifespan of one server share."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from mcp_server.notify import ResourceNotifier
from mcp_server.repository import RepoResolver
from orchestration.config import Settings
from orchestration.contracts import StatusResult
from orchestration.orchestrator import ModelFactory, Orchestrator, RepoContext


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

    @property
    def orchestrator(self) -> Orchestrator:
        if self._orchestrator is None:
            raise RuntimeError("the server's lifespan has not started")
        return self._orchestrator

    @asynccontextmanager
    async def running(self) -> AsyncGenerator[App]:
        async with Orchestrator(self.settings, self.model_factory) as orch:
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
