"""Limits across every run of this server process: agents running at once and, when set, a
token budget shared by all runs (each run keeps its own budget and concurrency cap too)."""

from __future__ import annotations

from collections.abc import Callable

import anyio

from orchestration.contracts import ServerLoad


class ServerCaps:
    """The server-wide slot pool and token pool. Reservations follow the runs' budgets: reserve
    before a turn, settle after it with what the turn used."""

    def __init__(self, max_running: int, budget_tokens: int | None) -> None:
        self.slots = anyio.CapacityLimiter(max_running)
        self.budget_tokens = budget_tokens
        # what holds the model requests back, if anything (`ModelPool.pacing`)
        self.pacing: Callable[[], str | None] | None = None
        self._used = 0
        self._reserved = 0

    def reserve(self, tokens: int) -> bool:
        """Reserve `tokens` for a turn; False when the server budget cannot cover it."""
        if (
            self.budget_tokens is not None
            and self._used + self._reserved + tokens > self.budget_tokens
        ):
            return False
        self._reserved += tokens
        return True

    def settle(self, reserved: int, used: int) -> None:
        """A turn ended: give back its reservation, count what it used."""
        self._reserved = max(self._reserved - reserved, 0)
        self._used += used

    def describe(self) -> str:
        if self.budget_tokens is None:
            return ""
        return (
            f"; the server's budget across runs: {self._used} of {self.budget_tokens} tokens "
            f"used, {self._reserved} reserved"
        )

    def load(self) -> ServerLoad:
        """What status shows of the caps."""
        remaining = (
            None
            if self.budget_tokens is None
            else max(self.budget_tokens - self._used - self._reserved, 0)
        )
        # built on every status poll from plain ints: no validation needed
        return ServerLoad.model_construct(
            running=int(self.slots.borrowed_tokens),
            max_running=int(self.slots.total_tokens),
            tokens_used=self._used,
            budget_tokens=self.budget_tokens,
            budget_remaining=remaining,
            rate_limited=None if self.pacing is None else self.pacing(),
        )
