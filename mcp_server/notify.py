"""Resource-update notifications in both protocol eras.

A watcher per repository follows the state store's event log and announces which resources
changed: to `subscriptions/listen` streams (2026-07-28) through the server's subscription bus,
and to sessions that called `resources/subscribe` (handshake era; MCPServer registers no such
handler, so one is added on the low-level server).
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import anyio.abc
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp.server.subscriptions import ResourceUpdated, SubscriptionBus
from mcp_types import EmptyResult, SubscribeRequestParams, UnsubscribeRequestParams

from orchestration.orchestrator import RepoContext

log = logging.getLogger("fanout.mcp")

WATCH_WINDOW_S = 30.0
WATCH_RETRY_S = 1.0  # after a failed read of the events


def uris_for(run_id: str | None, agent_id: str | None) -> list[str]:
    """The resources an event of this run/agent may have changed."""
    uris = ["fanout://runs", "fanout://leases"]
    if run_id:
        uris.append(f"fanout://runs/{run_id}")
    if agent_id:
        uris.append(f"fanout://agents/{agent_id}/result")
        uris.append(f"fanout://agents/{agent_id}/diff")
    return uris


class ResourceNotifier:
    """Follows each watched repository's events and notifies subscribers."""

    def __init__(self) -> None:
        self.bus: SubscriptionBus | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._legacy: dict[int, tuple[Any, set[str]]] = {}

    def start(self, tg: anyio.abc.TaskGroup) -> None:
        self._tg = tg

    def watch(self, ctx: RepoContext) -> None:
        if self._tg is not None:
            self._tg.start_soon(self._follow, ctx)

    async def _follow(self, ctx: RepoContext) -> None:
        store = ctx.store
        cursor = store.cursor()
        while True:
            try:
                if not await store.wait_for_change(cursor, WATCH_WINDOW_S):
                    continue
                events = store.events(since=cursor)
            except Exception:  # (the state busy, say): read again shortly; the watcher, a task
                # of the server's, must not take the server down with it
                log.exception("following the events of %s failed", ctx.repo.root)
                await anyio.sleep(WATCH_RETRY_S)
                continue
            if not events:
                continue
            cursor = events[-1].seq
            changed: list[str] = []
            for event in events:
                for uri in uris_for(event.run_id, event.agent_id):
                    if uri not in changed:
                        changed.append(uri)
            await self.publish(changed)

    async def publish(self, uris: list[str]) -> None:
        for uri in uris:
            if self.bus is not None:
                await self.bus.publish(ResourceUpdated(uri=uri))
            for key, (session, wanted) in list(self._legacy.items()):
                if uri not in wanted:
                    continue
                try:
                    await session.send_resource_updated(uri)
                except Exception:  # the session went away
                    self._legacy.pop(key, None)

    def install_legacy_subscribe(self, server: Server[Any]) -> None:
        """`resources/subscribe` / `unsubscribe` for handshake-era sessions."""

        async def subscribe(
            ctx: ServerRequestContext[Any], params: SubscribeRequestParams
        ) -> EmptyResult:
            session = ctx.session
            entry = self._legacy.setdefault(id(session), (session, set()))
            entry[1].add(str(params.uri))
            return EmptyResult()

        async def unsubscribe(
            ctx: ServerRequestContext[Any], params: UnsubscribeRequestParams
        ) -> EmptyResult:
            entry = self._legacy.get(id(ctx.session))
            if entry is not None:
                entry[1].discard(str(params.uri))
            return EmptyResult()

        server.add_request_handler("resources/subscribe", SubscribeRequestParams, subscribe)
        server.add_request_handler("resources/unsubscribe", UnsubscribeRequestParams, unsubscribe)
