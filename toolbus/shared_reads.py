"""Read leases on named resources shared by this process's readers (downstream MCP connections).

A read-only call of a downstream MCP server holds a read lease on the server's connection. Taking
and giving back a lease is two write transactions of the lease store, which would be most of
what the bus adds to a short call. So this process takes the read lease once, under its own
holder name, for every read-only call that overlaps or follows within `linger_s`, and gives it
back when the readers stop. Writers keep their meaning:

- a writer of this process asks first (`before_write`): an idle shared lease is given back at
  once, and while a writer waits no reader joins the shared lease (readers then take their own
  lease, queued behind the writer);
- a writer of another process waits at most `max_share_s` plus the longest read: a shared lease
  older than that admits no new reader, and it is given back `linger_s` after its last one.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncGenerator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio

from toolbus.errors import LeaseError
from toolbus.leases import LeaseGrant, LeaseKeeper, LeaseManager, LeaseMode, LeaseRequest

__all__ = ["SharedReadLeases"]

logger = logging.getLogger(__name__)

StartSoon = Callable[..., object]


@dataclass
class _Shared:
    grant: LeaseGrant
    taken_at: float
    users: int = 0
    last_used: float = 0.0
    lingering: bool = False
    closed: bool = False  # admits no new reader (a writer waits, or it is old); given back soon


@dataclass
class _Name:
    shared: _Shared | None = None
    writers: int = 0  # writers of this process waiting for or holding the resource
    lock: anyio.Lock = field(default_factory=anyio.Lock)


class SharedReadLeases:
    """This process's shared read leases, by resource name (see the module docstring)."""

    def __init__(
        self,
        manager: LeaseManager,
        keeper: LeaseKeeper,
        holder: str,
        start_soon: StartSoon,
        *,
        linger_s: float = 0.05,
        max_share_s: float = 0.5,
    ) -> None:
        self._manager = manager
        self._keeper = keeper
        self._holder = holder
        self._start_soon = start_soon
        self.linger_s = linger_s
        self.max_share_s = max_share_s
        self._names: dict[str, _Name] = {}

    def _name(self, name: str) -> _Name:
        entry = self._names.get(name)
        if entry is None:
            entry = self._names[name] = _Name()
        return entry

    @asynccontextmanager
    async def read(self, name: str, own_holder: str) -> AsyncGenerator[None]:
        """Hold a read lease on `name` around the body: the shared one when it admits readers,
        else `own_holder`'s own (queued fairly behind waiting writers)."""
        entry = self._name(name)
        shared = await self._join(name, entry)
        if shared is None:
            request = [LeaseRequest.named(name, LeaseMode.READ)]
            grant = await self._manager.acquire(own_holder, request)
            try:
                yield
            finally:
                with anyio.CancelScope(shield=True):
                    await self._manager.release(grant)
            return
        try:
            yield
        finally:
            shared.users -= 1
            shared.last_used = anyio.current_time()
            if shared.users == 0 and shared.closed:
                self._start_soon(self._give_back, name, shared)  # a writer waits for it
            elif shared.users == 0 and not shared.lingering:
                shared.lingering = True
                self._start_soon(self._linger, name, shared)

    async def _join(self, name: str, entry: _Name) -> _Shared | None:
        """The shared lease, joined; None when it admits no reader now (a writer waits)."""
        if entry.writers:
            return None
        shared = entry.shared
        now = anyio.current_time()
        if shared is not None and not shared.closed and now - shared.taken_at > self.max_share_s:
            shared.closed = True  # old: let another process's writer in
        if shared is None or shared.closed:
            if shared is not None:
                return None  # the closed one is still held: read under one's own
            async with entry.lock:
                if entry.writers:
                    return None
                if entry.shared is None:
                    request = [LeaseRequest.named(name, LeaseMode.READ)]
                    grant = await self._manager.acquire(self._holder, request)
                    if entry.writers:  # a writer came meanwhile: do not share
                        await self._manager.release(grant)
                        return None
                    entry.shared = _Shared(grant, taken_at=anyio.current_time())
                    self._keeper.track(grant, lambda _lost: self._forget(name, grant))
                shared = entry.shared
                if shared.closed:
                    return None
        shared.users += 1
        return shared

    def _forget(self, name: str, grant: LeaseGrant) -> None:
        entry = self._names.get(name)
        if entry is not None and entry.shared is not None and entry.shared.grant is grant:
            entry.shared = None

    async def _linger(self, name: str, shared: _Shared) -> None:
        """Give the shared lease back once no reader used it for `linger_s`."""
        try:
            while True:
                await anyio.sleep(self.linger_s)
                idle = anyio.current_time() - shared.last_used
                if shared.users == 0 and (idle >= self.linger_s or shared.closed):
                    break
                if shared.users:
                    return  # in use again: its last reader starts the next linger
        finally:
            shared.lingering = False
        await self._give_back(name, shared)

    async def _give_back(self, name: str, shared: _Shared) -> None:
        entry = self._name(name)
        if entry.shared is not shared or shared.users:
            return
        entry.shared = None
        self._keeper.untrack(shared.grant)
        try:
            await self._manager.release(shared.grant)
        except LeaseError:
            logger.debug("a shared read lease on %s was already gone", name)
        except Exception:  # (the lease store busy, say): the lease lapses at its TTL, unrenewed;
            # this runs as a task of the server's, which must not go down with it
            logger.exception("giving back a shared read lease on %s failed", name)

    @asynccontextmanager
    async def before_write(self, name: str) -> AsyncGenerator[None]:
        """Around a write of this process on `name`: no reader joins the shared lease, and an
        idle one is given back at once (a busy one when its readers end)."""
        entry = self._name(name)
        entry.writers += 1
        try:
            shared = entry.shared
            if shared is not None:
                shared.closed = True
                if shared.users == 0:
                    await self._give_back(name, shared)
            yield
        finally:
            entry.writers -= 1

    def close(self) -> None:
        """Give back every shared lease now (at shutdown, once no call runs)."""
        for entry in self._names.values():
            shared, entry.shared = entry.shared, None
            if shared is not None:
                self._keeper.untrack(shared.grant)
                try:
                    self._manager.store.release(shared.grant)
                except (LeaseError, sqlite3.Error):
                    logger.debug("a shared read lease was already gone at shutdown")
