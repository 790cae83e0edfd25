"""The fake's request log, for assertions: each request, what it was answered and what it cost."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from pydantic import JsonValue

from fakeapi.cache import Charge
from fakeapi.faults import Fault
from fakeapi.replies import Reply

HEADERS_OF_INTEREST = (
    "anthropic-version",
    "anthropic-beta",
    "content-type",
    "user-agent",
    "x-stainless-os",
    "x-stainless-retry-count",
    "x-stainless-timeout",
)


@dataclass
class LoggedRequest:
    """One request. The outcome fields are filled in once it is answered (a stall's fault is
    recorded before the stall starts)."""

    index: int
    path: str
    body: dict[str, JsonValue]
    headers: dict[str, str]
    at: float = field(default_factory=time.monotonic)
    status: int | None = None
    reply: Reply | None = None
    fault: Fault | None = None
    usage: Charge | None = None
    output_tokens: int = 0
    error: str | None = None

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True


class RequestLog:
    """Thread-safe: the server appends from its event loop, tests read from anywhere."""

    def __init__(self) -> None:
        self._entries: list[LoggedRequest] = []
        self._lock = threading.Lock()

    def add(self, path: str, body: dict[str, JsonValue], headers: dict[str, str]) -> LoggedRequest:
        with self._lock:
            entry = LoggedRequest(len(self._entries), path, body, headers)
            self._entries.append(entry)
            return entry

    def entries(self, path: str | None = "/v1/messages") -> list[LoggedRequest]:
        """A snapshot of the log (by default the Messages requests only; `None` for all)."""
        with self._lock:
            return [e for e in self._entries if path is None or e.path == path]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
