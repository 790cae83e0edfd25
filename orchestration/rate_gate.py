"""The pace of the requests to one model API, shared by every agent that calls it.

Until the API refuses a request for its rate limit (429), requests leave as they come. A
refusal stops every agent's next request until the `retry-after` it gave has passed, instead of
each agent finding the limit on its own, and from then on requests leave one at a time, spaced:
half the pause at first; each refusal of a request sent at the current pace widens the spacing
(by 1/0.7), each request let through narrows it by a tenth, until it is gone. So a fan-out
that meets the limit slows to the rate the API allows, rather than its agents failing one by
one as their retries run out together."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from orchestration.errors import ModelRateLimited

T = TypeVar("T")

# without a retry-after, a refusal pauses the requests this long
DEFAULT_PAUSE_S = 1.0
# the spacing a first refusal sets, as a share of its pause
FIRST_SPACING_SHARE = 0.5
# a refusal of a request sent at the current pace widens the spacing by this factor; a request
# let through narrows it by SPEED_UP, until it is below MIN_SPACING_S and gone
SLOW_DOWN = 1.0 / 0.7
SPEED_UP = 0.9
MIN_SPACING_S = 0.001


class RateGate:
    """Paces the requests to one model API (one per model name and server process): see the
    module's docstring. Requests that wait leave in the order they came. A retry-after is
    honoured up to `max_pause_s` (the server's FANOUT_RETRY_AFTER_CAP_S). `clock` and `sleep`
    are injectable for tests."""

    def __init__(
        self,
        *,
        max_pause_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self._max_pause_s = max_pause_s  # a retry-after is honoured up to this (None: whole)
        self._clock = clock
        self._sleep = sleep
        self._queue = anyio.Lock()  # (fair: its waiters get it in the order they came)
        self._open_at = 0.0  # no request leaves before this (a refusal's retry-after)
        self._spacing = 0.0  # between two requests leaving, once the API refused one
        self._left_at = float("-inf")  # when the last request left
        self._paced_at = float("-inf")  # when a refusal last widened the spacing
        self.refusals = 0
        self.waiting = 0

    @property
    def paced(self) -> bool:
        """Whether requests leave spaced, or wait out a pause, now."""
        return self._spacing > 0.0 or self._clock() < self._open_at

    @property
    def holding(self) -> bool:
        """Whether it holds requests back now: some wait their turn, or a pause runs."""
        return self.waiting > 0 or self._clock() < self._open_at

    async def call(self, send: Callable[[], Awaitable[T]]) -> T:
        """`send()` once its turn comes; a refusal for the rate limit is recorded before it is
        raised (before anyone the caller lets go next can send)."""
        sent_at = await self._turn()
        try:
            result = await send()
        except ModelRateLimited as refusal:
            self._refused(sent_at, refusal.retry_after_s)
            raise
        if self._spacing:
            self._spacing = self._spacing * SPEED_UP if self._spacing > MIN_SPACING_S else 0.0
        return result

    def _leave_at(self) -> float:
        return max(self._open_at, self._left_at + self._spacing)

    async def _turn(self) -> float:
        """Wait until this request may leave; when it leaves. The first in the queue sleeps
        until the pace allows, as the pace is then (a refusal meanwhile pauses it too)."""
        now = self._clock()
        if not self._queue.locked() and now >= self._leave_at():  # no limit met: at once
            self._left_at = now
            return now
        self.waiting += 1
        try:
            async with self._queue:
                while (now := self._clock()) < (leave_at := self._leave_at()):
                    await self._sleep(leave_at - now)
                self._left_at = now
                return now
        finally:
            self.waiting -= 1

    def _refused(self, sent_at: float, retry_after_s: float | None) -> None:
        now = self._clock()
        pause = retry_after_s if retry_after_s and retry_after_s > 0 else DEFAULT_PAUSE_S
        if self._max_pause_s is not None:
            pause = min(pause, self._max_pause_s)
        self.refusals += 1
        self._open_at = max(self._open_at, now + pause)
        if sent_at > self._paced_at:  # sent at the current pace: it is too fast
            self._spacing = max(SLOW_DOWN * self._spacing, FIRST_SPACING_SHARE * pause)
            self._paced_at = now
