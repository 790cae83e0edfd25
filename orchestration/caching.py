"""Prompt caching across a run: which prefixes the API caches, the lifetime a run's shared
prefix asks for, and the warm-up that has the prefix written once instead of once per agent.

The Messages API makes a cache entry readable only once the response of the request that wrote
it has begun; agents whose first requests leave together all pay the write. So a run's first
request goes alone and the others wait until its response begins (at most
`FANOUT_CACHE_WARMUP_MAX_S`): the cost is about one time-to-first-byte, once per run.

That first request is then on every agent's path, so nothing delays it: the run's other agents
start (take their leases, record their state, make their workspaces) only once it has left,
inside the wait they make anyway; otherwise their set-up steps would run between its steps on
the event loop."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Literal

import anyio

CacheTtl = Literal["5m", "1h"]
FIVE_MINUTES_S = 300.0
DEFAULT_MIN_CACHEABLE_TOKENS = 1024
# The API's minimum cacheable prefix per model family (a prefix of the model's name, the longest
# match wins); other models get `DEFAULT_MIN_CACHEABLE_TOKENS`. FANOUT_CACHE_MIN_TOKENS overrides.
MIN_CACHEABLE_TOKENS: Mapping[str, int] = {
    "claude-opus-4-5": 4096,
    "claude-opus-4-6": 4096,
    "claude-haiku-4-5": 4096,
    "claude-3-5-haiku": 2048,
    "claude-3-haiku": 2048,
}
# What a cache write costs against plain input, per lifetime (the API's price list).
WRITE_PRICE: Mapping[CacheTtl, float] = {"5m": 1.25, "1h": 2.0}
READ_PRICE = 0.1


def min_cacheable_tokens(model: str, override: int | None = None) -> int:
    """The shortest prefix the API caches for `model`."""
    if override is not None:
        return override
    for family in sorted(MIN_CACHEABLE_TOKENS, key=len, reverse=True):
        if model.startswith(family):
            return MIN_CACHEABLE_TOKENS[family]
    return DEFAULT_MIN_CACHEABLE_TOKENS


def choose_ttl(setting: str, *, expected_s: float, has_waits: bool) -> CacheTtl:
    """The shared prefix's lifetime for a run. Every request of every agent reads the prefix and
    so refreshes its 5 minutes; only a pause of the whole run lets it expire. Agents that wait
    for others to be merged make such pauses (the merge is the orchestrator's, minutes later),
    so a run with waiting agents that is expected to outlast 5 minutes asks for an hour (a write
    at 2x instead of 1.25x, paid once, against a rewrite at 1.25x after each expiry)."""
    if setting in ("5m", "1h"):
        return "5m" if setting == "5m" else "1h"
    return "1h" if has_waits and expected_s > FIVE_MINUTES_S else "5m"


LEAVING_S = 0.005
"""How long after the first request is handed to the HTTP client the others start: its
connection and its bytes take a few turns of the event loop."""


class PrefixWarmup:
    """One run's first model request goes alone; the others wait until its response begins,
    and start only once it has left (`before_start`)."""

    def __init__(self, max_wait_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._begun = anyio.Event()
        self._left = anyio.Event()  # the first request has left, or will not
        self._starter: str | None = None
        self._writer_chosen = False
        self._sent_at: float | None = None
        self.first_byte_s: float | None = None  # the writer's time to its response's start
        self.held_s = 0.0  # the longest any other agent waited for it
        self.held_agents = 0

    @property
    def done(self) -> bool:
        return self._begun.is_set()

    async def before_start(self, agent_id: str) -> None:
        """Call when an agent of the run starts, past any wait for other agents. The first goes
        on at once (it makes the run's first request); the others return once that request
        has left (`sent`), or its agent waits for leases or ended (`starter_stops`), or its call
        failed, at most `max_wait_s` later."""
        if self._left.is_set() or self._begun.is_set() or self.max_wait_s <= 0:
            return
        if self._starter is None:
            self._starter = agent_id
            return
        await self.until_left()

    async def until_left(self) -> None:
        """Return once the first request has left (or will not), and `LEAVING_S` more, at most
        `max_wait_s` later."""
        with anyio.move_on_after(self.max_wait_s):
            await self._left.wait()
            await anyio.sleep(LEAVING_S)

    def first_to_leave(self, agent_id: str) -> bool:
        """Whether `agent_id` makes the run's first request and it has not left yet."""
        return agent_id == self._starter and not self._left.is_set()

    def sent(self) -> None:
        """The run's first request is handed to the HTTP client."""
        self._left.set()

    def starter_stops(self, agent_id: str) -> None:
        """`agent_id` has to wait (for leases) or ended: if it started first, the others go
        on."""
        if agent_id == self._starter:
            self._left.set()

    async def before_first_call(self) -> Callable[[bool], None] | None:
        """Call before an agent's first model request. Returns the callback the writer calls
        when its response begins (True) or its request failed (False), or None: go now."""
        if self._begun.is_set() or self.max_wait_s <= 0:
            return None
        if not self._writer_chosen:
            self._writer_chosen = True
            self._sent_at = self._clock()
            return self._release
        started = self._clock()
        with anyio.move_on_after(self.max_wait_s):
            await self._begun.wait()
        self.held_s = max(self.held_s, self._clock() - started)
        self.held_agents += 1
        return None

    def _release(self, begun: bool) -> None:
        self._left.set()
        if self._begun.is_set():
            return
        if begun and self._sent_at is not None:
            self.first_byte_s = self._clock() - self._sent_at
        self._begun.set()

    def describe(self) -> str:
        """What status says of it."""
        if self.first_byte_s is None:
            return "" if not self._begun.is_set() else "the first request failed: no warm-up"
        return (
            f"shared prefix written once: {self.held_agents} agents waited up to "
            f"{self.held_s:.2f} s for the first response to begin ({self.first_byte_s:.2f} s)"
        )
