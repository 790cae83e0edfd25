"""The API's request rate limit, as the real one enforces it: a token bucket that refills
continuously up to its size; a request that finds it empty is refused with 429
`rate_limit_error` and a `retry-after` in whole seconds, and every refusal says how the limit
stands in the `anthropic-ratelimit-requests-*` headers."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from fakeapi.faults import ErrorReply


class RequestRateLimit:
    """`per_minute` requests a minute, refilled continuously (`per_minute / 60` a second) into a
    bucket of `burst` (default: a second's worth, at least one), full at the start. The API may
    enforce a per-minute limit over shorter intervals: `burst` is how short."""

    def __init__(
        self,
        per_minute: float,
        *,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_minute <= 0:
            raise ValueError(f"per_minute must be positive, got {per_minute}")
        self.per_minute = per_minute
        self.burst = burst if burst is not None else max(1.0, per_minute / 60.0)
        if self.burst < 1:
            raise ValueError(f"burst must be at least one request, got {self.burst}")
        self._clock = clock
        self._level = self.burst
        self._at = clock()
        self._lock = threading.Lock()
        self.refused = 0

    def take(self) -> ErrorReply | None:
        """Admit one request (None), or the 429 that refuses it."""
        with self._lock:
            now = self._clock()
            rate = self.per_minute / 60.0
            self._level = min(self.burst, self._level + (now - self._at) * rate)
            self._at = now
            if self._level >= 1.0:
                self._level -= 1.0
                return None
            self.refused += 1
            wait_s = (1.0 - self._level) / rate
        return _refusal(self.per_minute, wait_s)


def _refusal(per_minute: float, wait_s: float) -> ErrorReply:
    reset = datetime.now(UTC) + timedelta(seconds=wait_s)
    return ErrorReply(
        429,
        "rate_limit_error",
        "Number of requests has exceeded your per-minute rate limit (fake)",
        retry_after_s=float(max(1, math.ceil(wait_s))),  # the API says whole seconds
        ms_header=False,
        extra_headers=(
            ("anthropic-ratelimit-requests-limit", f"{per_minute:g}"),
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-reset", reset.isoformat(timespec="seconds")),
        ),
    )
