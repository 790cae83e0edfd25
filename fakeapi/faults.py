"""Injected faults: HTTP errors in the API's shape, stalls, malformed bodies, errors mid-stream;
and a `FaultPlan` that injects them into the next N requests or at a seeded rate."""

from __future__ import annotations

import random
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ErrorReply:
    """An HTTP error with the body `{"type": "error", "error": {"type": …, "message": …}}`.
    A `retry_after_s` is sent as `retry-after` (and `retry-after-ms` when `ms_header`), beside
    `extra_headers`."""

    status: int
    error_type: str
    message: str
    retry_after_s: float | None = None
    ms_header: bool = True
    extra_headers: tuple[tuple[str, str], ...] = ()

    def headers(self) -> dict[str, str]:
        headers = dict(self.extra_headers)
        if self.retry_after_s is None:
            return headers
        headers["retry-after"] = f"{self.retry_after_s:g}"
        if self.ms_header:
            headers["retry-after-ms"] = f"{self.retry_after_s * 1000:g}"
        return headers

    def body(self) -> dict[str, object]:
        return {"type": "error", "error": {"type": self.error_type, "message": self.message}}


def rate_limited(retry_after_s: float | None = 1.0, *, ms_header: bool = True) -> ErrorReply:
    """429 rate_limit_error."""
    return ErrorReply(429, "rate_limit_error", "Rate limited (fake)", retry_after_s, ms_header)


def overloaded() -> ErrorReply:
    """529 overloaded_error."""
    return ErrorReply(529, "overloaded_error", "Overloaded (fake)")


def server_error(status: int = 500) -> ErrorReply:
    """500 (or another 5xx) api_error."""
    return ErrorReply(status, "api_error", "Internal server error (fake)")


def api_error(status: int, error_type: str, message: str) -> ErrorReply:
    """Any error, e.g. `api_error(401, "authentication_error", "invalid x-api-key")`."""
    return ErrorReply(status, error_type, message)


@dataclass(frozen=True)
class Stall:
    """Answer nothing for `seconds` (past the client's timeout); ends early on shutdown."""

    seconds: float = 600.0


@dataclass(frozen=True)
class Malformed:
    """A 200 whose body is not valid JSON (for a stream: an event whose data is not JSON)."""

    body: str = '{"id": "msg_broken", "type": "message", "content": [{"type": "te'


_STREAM_ERROR_STATUS = {"overloaded_error": 529, "rate_limit_error": 429, "api_error": 500}


@dataclass(frozen=True)
class StreamError:
    """An `event: error` after the stream has started (a 200 already sent). On a
    non-streaming request it becomes the matching HTTP error."""

    error_type: str = "overloaded_error"
    message: str = "Overloaded (fake, mid-stream)"

    def as_http(self) -> ErrorReply:
        return ErrorReply(
            _STREAM_ERROR_STATUS.get(self.error_type, 500), self.error_type, self.message
        )


Fault = ErrorReply | Stall | Malformed | StreamError


class FaultPlan:
    """Faults chosen independently of the handler: queued ones first (`queue(f, times=n)` → the
    next n requests), then with probability `rate` one of `faults`, drawn with a seeded RNG."""

    def __init__(
        self,
        *,
        rate: float = 0.0,
        seed: int = 0,
        faults: Sequence[Fault] = (overloaded(), rate_limited(0.05)),
    ) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"fault rate must be within [0, 1], got {rate}")
        if rate > 0 and not faults:
            raise ValueError("a fault rate needs at least one fault to draw from")
        self.rate = rate
        self._faults = tuple(faults)
        self._rng = random.Random(seed)
        self._queued: deque[Fault] = deque()
        self._lock = threading.Lock()

    def queue(self, fault: Fault, times: int = 1) -> None:
        with self._lock:
            self._queued.extend([fault] * times)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._queued)

    def next(self) -> Fault | None:
        """The fault for the request being served, if any."""
        with self._lock:
            if self._queued:
                return self._queued.popleft()
            if self.rate > 0 and self._rng.random() < self.rate:
                return self._rng.choice(self._faults)
            return None
