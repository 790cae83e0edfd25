"""Leases: hierarchical reader/writer locks on paths and named resources, fenced, with a TTL.

`LeaseStore` (in `lease_store`) is the synchronous cross-process core; `LeaseManager` adds fair
waiting, timeouts and cancellation for async callers; `LeaseKeeper` is the live holder's heartbeat.

Waking: a waiter is woken at once by an anyio event when this manager releases, breaks or
dequeues anything, and otherwise polls the store every `poll_interval_s` (default 20 ms), which is
how releases and expiries in other processes are seen. A polling waiter reads without the flock
and only takes a write transaction when it can be granted, or every `waiter_ttl_s / 4` to
heartbeat its queue row (a dead process's waiter row lapses after `waiter_ttl_s`).

Store calls run inline on the event loop: each is one short transaction (well under a
millisecond), cheaper than a hop to a worker thread.
"""

from __future__ import annotations

import logging
import math
import sqlite3
from collections.abc import Callable, Iterable

import anyio
import anyio.abc

from toolbus.errors import LeaseLost, LeaseNotHeld, LeaseTimeout
from toolbus.lease_store import (
    Blockers,
    Lease,
    LeaseGrant,
    LeaseMode,
    LeaseRequest,
    LeaseStore,
    LostGrant,
    Waiter,
    conflicts,
    normalise_requests,
)

__all__ = [
    "Blockers",
    "Lease",
    "LeaseGrant",
    "LeaseKeeper",
    "LeaseManager",
    "LeaseMode",
    "LeaseRequest",
    "LeaseStore",
    "LostGrant",
    "Waiter",
    "conflicts",
]

logger = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL_S = 0.02


class LeaseManager:
    """Async access to a `LeaseStore`: atomic, FIFO-fair, cancellable acquisition with timeouts."""

    def __init__(self, store: LeaseStore, *, poll_interval_s: float = DEFAULT_POLL_INTERVAL_S):
        if not 0 < poll_interval_s <= 1.0:
            raise ValueError(f"poll_interval_s must be in (0, 1], got {poll_interval_s}")
        self._store = store
        self._poll_interval_s = poll_interval_s
        self._changed: anyio.Event | None = None

    @property
    def store(self) -> LeaseStore:
        return self._store

    def _change_event(self) -> anyio.Event:
        if self._changed is None:
            self._changed = anyio.Event()
        return self._changed

    def _notify(self) -> None:
        """Wake this process's waiters: something they may wait for was given back."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def acquire(
        self,
        holder: str,
        requests: Iterable[LeaseRequest],
        timeout_s: float | None = None,
        *,
        on_wait: Callable[[], object] | None = None,
    ) -> LeaseGrant:
        """Take the whole set under one new fencing token, waiting in the FIFO queue if blocked.

        Raises `LeaseTimeout` (naming the blockers) after `timeout_s`, `LeaseSelfConflict` at
        once when the set conflicts with the holder's own live lease. Cancellation leaves the queue.
        `on_wait` is called once if the request has to queue (status can say "waiting").
        """
        normal = normalise_requests(requests)
        # a cancellation point that does not yield when free: an agent's start yields as few
        # times as it can, each a wait behind every other ready agent of a burst
        await anyio.lowlevel.checkpoint_if_cancelled()
        grant = self._store.try_acquire(holder, normal)
        if grant is not None:
            return grant
        waiter_id = self._store.enqueue(holder, normal)
        try:
            if on_wait is not None:
                on_wait()
            with anyio.move_on_after(math.inf if timeout_s is None else timeout_s):
                grant = await self._wait(holder, normal, waiter_id)
                return grant
            store = self._store
            blockers = store.blockers(normal, holder=holder, before_waiter=waiter_id)
            raise LeaseTimeout(
                f"{holder} waited {timeout_s} s for "
                f"{', '.join(r.describe() for r in normal)} and timed out; blocked by: "
                f"{blockers.describe(store.clock())}. Retry later, narrow the request, or ask "
                "an administrator to break a stuck holder"
            )
        finally:
            if grant is None:
                # Leave the queue on timeout, error or cancellation. The cleanup is synchronous,
                # so no cancellation can interrupt it (it needs no shield while it stays so).
                self._store.dequeue(waiter_id)
                self._notify()

    async def _wait(
        self, holder: str, requests: tuple[LeaseRequest, ...], waiter_id: int
    ) -> LeaseGrant:
        store = self._store
        heartbeat_at = store.clock() + store.waiter_ttl_s / 4
        while True:
            event = self._change_event()
            blockers = store.blockers(requests, holder=holder, before_waiter=waiter_id)
            if blockers.empty or blockers.own:
                grant = store.try_acquire(holder, requests, waiter_id=waiter_id)
                if grant is not None:
                    return grant
            elif store.clock() >= heartbeat_at:
                store.keep_waiting(waiter_id, holder, requests)
                heartbeat_at = store.clock() + store.waiter_ttl_s / 4
            with anyio.move_on_after(self._poll_interval_s):
                await event.wait()

    async def renew(self, grant: LeaseGrant) -> LeaseGrant:
        """Extend the grant's TTL, same token; `LeaseLost` if it expired or was broken."""
        return self._store.renew(grant)

    async def release(self, grant: LeaseGrant) -> None:
        """Give the grant back; `LeaseNotHeld` if it is not held (released, expired, broken)."""
        try:
            self._store.release(grant)
        finally:
            self._notify()

    def check(
        self, holder: str, token: int, path: str | None, mode: LeaseMode = LeaseMode.WRITE
    ) -> None:
        """The fence: `LeaseLost` unless a live grant `token` of `holder` covers `path` in `mode`.

        Synchronous (one indexed SELECT, no waiting) so a synchronous `Fence` can call it.
        """
        self._store.check(holder, token, path, mode)

    async def table(self) -> list[Lease]:
        """The live leases."""
        return self._store.table()

    async def blockers(self, requests: Iterable[LeaseRequest]) -> list[Lease]:
        """The leases that conflict with these requests now (live, or lost but in lock-delay)."""
        return list(self._store.blockers(requests).leases)

    async def waiters(self) -> list[Waiter]:
        """The queued acquisitions, oldest first."""
        return self._store.waiters()

    async def lost(self, holder: str | None = None) -> list[LostGrant]:
        """The recorded lost grants (expired or broken) of a holder, or of all."""
        return self._store.lost(holder)

    async def break_holder(self, holder: str, *, immediate: bool = False) -> list[LeaseGrant]:
        """Break a holder's live grants (admin); see `LeaseStore.break_holder`."""
        try:
            return self._store.break_holder(holder, immediate=immediate)
        finally:
            self._notify()


LostCallback = Callable[[LeaseLost], object]


class LeaseKeeper:
    """The heartbeat of a live holder: renews tracked grants every `interval_s` (default ttl/3).

    When a renewal finds a grant lost (expired, broken, or no longer held) the grant is dropped
    from tracking and its `on_lost` is called once with the `LeaseLost`. Untrack a grant before
    releasing it, or its release shows up as a loss. A store error is logged and retried next round.
    """

    def __init__(self, manager: LeaseManager, interval_s: float | None = None) -> None:
        interval = manager.store.ttl_s / 3 if interval_s is None else interval_s
        if not interval > 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self._manager = manager
        self._interval_s = interval
        self._tracked: dict[int, tuple[LeaseGrant, LostCallback]] = {}
        self._rounds_started = 0
        self._rounds_done = 0
        self._round_done: anyio.Event | None = None

    @property
    def interval_s(self) -> float:
        return self._interval_s

    def track(self, grant: LeaseGrant, on_lost: LostCallback) -> None:
        self._tracked[grant.token] = (grant, on_lost)

    def untrack(self, grant: LeaseGrant) -> None:
        self._tracked.pop(grant.token, None)

    def current(self, grant: LeaseGrant) -> LeaseGrant | None:
        """The latest renewal of a tracked grant (its `expires_at` moves), `None` if not tracked."""
        entry = self._tracked.get(grant.token)
        return None if entry is None else entry[0]

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED):
        """Renew every `interval_s` until cancelled; start it with `await tg.start(keeper.run)`."""
        task_status.started()
        while True:
            await anyio.sleep(self._interval_s)
            await self.renew_all()

    async def renew_all(self) -> None:
        """One heartbeat round over every tracked grant."""
        self._rounds_started += 1
        try:
            for token, (grant, on_lost) in list(self._tracked.items()):
                if token not in self._tracked:
                    continue
                try:
                    renewed = await self._manager.renew(grant)
                except LeaseLost as lost:
                    self._drop(token, on_lost, lost)
                except LeaseNotHeld as gone:
                    self._drop(token, on_lost, LeaseLost(str(gone)))
                except sqlite3.Error:
                    logger.warning(
                        "lease renewal of token %s failed; retrying", token, exc_info=True
                    )
                else:
                    if token in self._tracked:
                        self._tracked[token] = (renewed, on_lost)
        finally:
            self._rounds_done += 1
            if self._round_done is not None:
                self._round_done.set()
                self._round_done = None

    def _drop(self, token: int, on_lost: LostCallback, error: LeaseLost) -> None:
        if self._tracked.pop(token, None) is not None:
            on_lost(error)

    async def next_round(self) -> None:
        """Wait until a heartbeat round that starts after this call has finished."""
        target = self._rounds_started + 1
        while self._rounds_done < target:
            if self._round_done is None:
                self._round_done = anyio.Event()
            await self._round_done.wait()
