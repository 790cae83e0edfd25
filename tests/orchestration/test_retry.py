"""call_with_retry: capped backoff, retry-after honoured up to the cap, clear exhaustion."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import pytest

from orchestration.errors import (
    ModelConnectionError,
    ModelError,
    ModelFatalError,
    ModelOverloaded,
    ModelRateLimited,
    ModelResponseError,
    ModelTimeout,
)
from orchestration.retry import RetryPolicy, call_with_retry

pytestmark = pytest.mark.anyio


class Recorder:
    """An injected sleep that records the waits and returns at once."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def failing(
    *errors: ModelError, then: str = "ok"
) -> tuple[Callable[[], Awaitable[str]], list[int]]:
    """A call that raises `errors` in turn, then answers."""
    remaining = list(errors)
    calls: list[int] = []

    async def call() -> str:
        calls.append(1)
        if remaining:
            raise remaining.pop(0)
        return then

    return call, calls


async def test_retries_retryable_errors_then_succeeds() -> None:
    sleep = Recorder()
    noted: list[tuple[str, float]] = []
    call, calls = failing(
        ModelOverloaded("529"),
        ModelTimeout("slow"),
        ModelConnectionError("down"),
        ModelResponseError("garbled"),
    )
    result = await call_with_retry(
        call,
        RetryPolicy(jitter=False),
        on_retry=lambda e, d: noted.append((type(e).__name__, d)),
        sleep=sleep,
    )
    assert result == "ok" and len(calls) == 5
    assert sleep.waits == [0.5, 1.0, 2.0, 4.0]
    assert [n for n, _ in noted] == [
        "ModelOverloaded",
        "ModelTimeout",
        "ModelConnectionError",
        "ModelResponseError",
    ]
    assert [d for _, d in noted] == sleep.waits


async def test_backoff_is_capped_and_jittered_within_a_quarter() -> None:
    policy = RetryPolicy(max_attempts=10, base_delay_s=0.5, max_delay_s=3.0)
    sleep = Recorder()
    call, _ = failing(*[ModelOverloaded("x") for _ in range(9)])
    await call_with_retry(call, policy, sleep=sleep, rng=random.Random(1))
    ideal = [min(0.5 * 2**i, 3.0) for i in range(9)]
    assert all(0.75 * i <= w <= i for w, i in zip(sleep.waits, ideal, strict=True))
    assert max(sleep.waits) <= 3.0


async def test_retry_after_is_honoured_when_longer_than_the_backoff() -> None:
    sleep = Recorder()
    call, _ = failing(ModelRateLimited("429", retry_after_s=5.0))
    await call_with_retry(call, RetryPolicy(jitter=False), sleep=sleep)
    assert sleep.waits == [5.0]


async def test_retry_after_is_capped() -> None:
    """A server asking for 120 s never makes us wait beyond the cap."""
    policy = RetryPolicy(max_attempts=5, max_delay_s=1.0, retry_after_cap_s=2.0)
    sleep = Recorder()
    call, calls = failing(*[ModelRateLimited("429", retry_after_s=120.0) for _ in range(4)])
    assert await call_with_retry(call, policy, sleep=sleep) == "ok"
    assert len(calls) == 5
    assert sleep.waits == [2.0, 2.0, 2.0, 2.0]


async def test_a_non_retryable_error_is_raised_at_once() -> None:
    sleep = Recorder()
    fatal = ModelFatalError("401 invalid key")
    call, calls = failing(ModelOverloaded("x"), fatal)
    with pytest.raises(ModelFatalError) as caught:
        await call_with_retry(call, RetryPolicy(), sleep=sleep)
    assert caught.value is fatal
    assert len(calls) == 2 and len(sleep.waits) == 1


async def test_exhaustion_reraises_the_last_error_with_the_attempt_count() -> None:
    sleep = Recorder()
    call, calls = failing(*[ModelRateLimited(f"429 #{i}", retry_after_s=1.0) for i in range(9)])
    policy = RetryPolicy(max_attempts=3, rate_limited_max_s=0)  # (refusals count as attempts)
    with pytest.raises(ModelRateLimited, match=r"429 #2 \(gave up after 3 attempts\)") as caught:
        await call_with_retry(call, policy, sleep=sleep)
    assert caught.value.retry_after_s == 1.0
    assert isinstance(caught.value.__cause__, ModelRateLimited)
    assert len(calls) == 3 and len(sleep.waits) == 2


class Clock:
    """A clock the injected sleep moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


async def test_refusals_for_the_rate_limit_are_waited_out_not_counted() -> None:
    """The API's rate limit asks for waiting: twenty refusals in a row do not use up three
    attempts, while they come within `rate_limited_max_s` of the first; other errors still
    count. The wait after each failure grows with all of them."""
    clock = Clock()
    limited = [ModelRateLimited(f"429 #{i}", retry_after_s=2.0) for i in range(20)]
    call, calls = failing(ModelOverloaded("529"), *limited, ModelOverloaded("529"))
    policy = RetryPolicy(max_attempts=3, rate_limited_max_s=600.0, jitter=False)
    assert await call_with_retry(call, policy, sleep=clock.sleep, clock=clock) == "ok"
    assert len(calls) == 23
    assert clock.now < 600.0  # (the backoff still grows with every failure, to 8 s)


async def test_refusals_for_the_rate_limit_give_up_after_the_wait_with_what_to_do() -> None:
    clock = Clock()
    call, calls = failing(*[ModelRateLimited("429", retry_after_s=10.0) for _ in range(50)])
    policy = RetryPolicy(max_attempts=3, rate_limited_max_s=60.0, jitter=False)
    with pytest.raises(ModelRateLimited, match=r"gave up after 60 s .*FANOUT_RATE_LIMIT_WAIT_S"):
        await call_with_retry(call, policy, sleep=clock.sleep, clock=clock)
    assert len(calls) == 7  # refused at 0, 10, ..., 60 s


async def test_one_attempt_means_no_retry() -> None:
    sleep = Recorder()
    call, _ = failing(ModelOverloaded("x"))
    with pytest.raises(ModelOverloaded, match="gave up after 1 attempt\\)"):
        await call_with_retry(call, RetryPolicy(max_attempts=1), sleep=sleep)
    assert sleep.waits == []


def test_policy_validates() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
