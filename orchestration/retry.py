"""Retries of model calls: capped exponential backoff, a server's retry-after honoured up to a cap.

The SDK's own retries are off (it would sleep as long as any retry-after says); this is the one
place that decides how long to wait."""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from pydantic import BaseModel, ConfigDict, Field

from orchestration.errors import ModelError, ModelRateLimited

T = TypeVar("T")

OnRetry = Callable[[ModelError, float], None]
Sleep = Callable[[float], Awaitable[None]]


class RetryPolicy(BaseModel):
    """How often and how long to retry a retryable `ModelError`.

    The wait before attempt n+1 is `max(backoff(n), min(retry_after, retry_after_cap_s))` where
    `backoff(n) = min(base_delay_s * 2**(n-1), max_delay_s)`, scaled into [0.75, 1] by jitter.
    No wait exceeds `max(max_delay_s, retry_after_cap_s)`."""

    model_config = ConfigDict(frozen=True)

    max_attempts: int = Field(default=6, ge=1)
    base_delay_s: float = Field(default=0.5, ge=0)
    max_delay_s: float = Field(default=8.0, ge=0)
    retry_after_cap_s: float = Field(default=30.0, ge=0)
    jitter: bool = True
    # Refusals for the API's rate limit (429) are not counted as attempts for this long after
    # a call's first one: the requests are paced meanwhile (`rate_gate`), and waiting is what
    # the API asks. 0: they count like any other error.
    rate_limited_max_s: float = Field(default=900.0, ge=0)

    def delay_s(self, attempt: int, error: ModelError, rng: random.Random | None = None) -> float:
        """The wait after failed attempt number `attempt` (1-based)."""
        backoff = min(self.base_delay_s * 2.0 ** (attempt - 1), self.max_delay_s)
        if self.jitter:
            backoff *= 1.0 - 0.25 * (rng or random).random()
        if error.retry_after_s is not None and error.retry_after_s > 0:
            return max(backoff, min(error.retry_after_s, self.retry_after_cap_s))
        return backoff


async def call_with_retry(
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    on_retry: OnRetry | None = None,
    sleep: Sleep = anyio.sleep,
    rng: random.Random | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Call `fn` until it succeeds, a non-retryable error, or `policy.max_attempts` attempts
    (refusals for the rate limit within `policy.rate_limited_max_s` of the first not counted).

    A non-retryable error is re-raised as is; on exhaustion the last error is re-raised as the
    same type with the number of attempts in its message. `on_retry(error, delay_s)` is called
    before each wait; `sleep` and `clock` are injectable so tests are instant and can record
    the waits."""
    attempts = 0  # the failed attempts that count towards `max_attempts`
    failures = 0  # every failed attempt: the backoff grows with them
    limited_since: float | None = None
    while True:
        try:
            return await fn()
        except ModelError as error:
            if not error.retryable:
                raise
            failures += 1
            if isinstance(error, ModelRateLimited) and policy.rate_limited_max_s > 0:
                # not counted as an attempt (waiting is what the API asks), up to a time
                now = clock()
                limited_since = now if limited_since is None else limited_since
                if now - limited_since >= policy.rate_limited_max_s:
                    raise type(error)(
                        f"{error} (gave up after {now - limited_since:.0f} s of refusals for "
                        "the API's rate limit, FANOUT_RATE_LIMIT_WAIT_S: spawn with a lower "
                        "max_concurrency, or raise the organisation's limit)",
                        retry_after_s=error.retry_after_s,
                    ) from error
            else:
                attempts += 1
                if attempts >= policy.max_attempts:
                    raise type(error)(
                        f"{error} (gave up after {attempts} attempt{'' if attempts == 1 else 's'})",
                        retry_after_s=error.retry_after_s,
                    ) from error
            delay = policy.delay_s(failures, error, rng)
            if on_retry is not None:
                on_retry(error, delay)
            await sleep(delay)
