"""The engine's clocks and timings, passed in so that tests set them instead of patching modules."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol


class Clock(Protocol):
    """Wall-clock time (shown to clients, compared across processes) and monotonic time
    (durations and cache ages within this process)."""

    def time(self) -> float: ...

    def monotonic(self) -> float: ...


class SystemClock:
    """The process's clocks."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK = SystemClock()


@dataclass(frozen=True)
class Timing:
    """How often the engine beats, polls and re-measures, and how long it waits."""

    # a server beats this often; one whose heartbeat is older than `server_stale_s` is dead
    server_heartbeat_s: float = 5.0
    server_stale_s: float = 20.0
    # status shows the workspaces' disk usage measured at most this long ago
    disk_usage_cache_s: float = 10.0
    # cancel_subagents waits this long for the agents to stop, then answers with where they are
    cancel_wait_s: float = 30.0
    # how often a server looks for cancel requests made from other servers (an indexed query)
    cancel_poll_s: float = 0.5
