"""Token estimates and prompt-cache accounting that behave as the Messages API documents.

The request is cut into blocks in API order (tools, system blocks, message content blocks). A
block marked with `cache_control` (or the last block, for a top-level `cache_control`) ends a
cacheable prefix, keyed by a hash of the model and the prefix's canonical JSON (cache_control
itself left out). As the API does:
- the longest cached prefix ending at a marked block or at one of the 20 blocks before it is
  read; marked prefixes longer than that are written;
- a written entry can be read only once the response of the request that wrote it has begun
  (`publish`), so requests that leave together all pay the write;
- a prefix shorter than the model's minimum cacheable length is neither written nor read;
- an entry lives 5 minutes (`ttl: "5m"`, the default) or an hour (`ttl: "1h"`, written at a
  higher price), refreshed on each read; a longer lifetime may not follow a shorter one;
- at most four blocks may carry `cache_control`.
Breaking one of these rules is a `CacheRequestError` (the API answers 400)."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

MAX_BREAKPOINTS = 4
LOOKBACK_BLOCKS = 20
TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}
DEFAULT_MIN_CACHEABLE_TOKENS = 1024
# Minimum cacheable prefix per model family (matched as a prefix of the model name, the longest
# first); other models get `DEFAULT_MIN_CACHEABLE_TOKENS`. `PromptCache(min_tokens=...)` adds
# entries or replaces them.
MIN_CACHEABLE_TOKENS: Mapping[str, int] = {
    "claude-opus-4-5": 4096,
    "claude-opus-4-6": 4096,
    "claude-haiku-4-5": 4096,
    "claude-3-5-haiku": 2048,
    "claude-3-haiku": 2048,
}


def estimate_tokens(text: str) -> int:
    """ceil(characters / 4)."""
    return math.ceil(len(text) / 4)


class CacheRequestError(ValueError):
    """A request the API refuses for its cache_control (400 invalid_request_error)."""


@dataclass(frozen=True)
class Charge:
    """The input side of a request's usage. `cache_creation_1h_input_tokens` is the part of
    `cache_creation_input_tokens` written with the one-hour lifetime. `pending` holds the entries
    this request writes; they become readable when `PromptCache.publish` is called with it."""

    input_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_1h_input_tokens: int = 0
    pending: tuple[tuple[str, float], ...] = field(default=(), compare=False, repr=False)

    @property
    def total_input(self) -> int:
        return self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens

    @property
    def cache_creation_5m_input_tokens(self) -> int:
        return self.cache_creation_input_tokens - self.cache_creation_1h_input_tokens


@dataclass(frozen=True)
class _Block:
    json: str
    ttl: str | None  # None: not marked


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _without_cache_control(block: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in block.items() if k != "cache_control"}


def _as_blocks(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if isinstance(value, list):
        return [cast(dict[str, Any], b) for b in cast(list[Any], value) if isinstance(b, dict)]
    return []


def _ttl(block: dict[str, Any]) -> str | None:
    raw = block.get("cache_control")
    if raw is None:
        return None
    control = cast(dict[str, Any], raw) if isinstance(raw, dict) else {}
    if control.get("type") != "ephemeral":
        raise CacheRequestError("cache_control.type: Input should be 'ephemeral'")
    ttl = control.get("ttl", "5m")
    if ttl not in TTL_SECONDS:
        raise CacheRequestError(f"cache_control.ttl: Input should be '5m' or '1h' (got {ttl!r})")
    return cast(str, ttl)


def request_blocks(body: dict[str, Any]) -> list[_Block]:
    """The request's cacheable blocks in API order, each serialized without its cache_control."""
    blocks: list[_Block] = []
    for tool in _as_blocks(body.get("tools")):
        blocks.append(_Block(_canonical(_without_cache_control(tool)), _ttl(tool)))
    for part in _as_blocks(body.get("system")):
        blocks.append(_Block(_canonical(_without_cache_control(part)), _ttl(part)))
    for message in _as_blocks(body.get("messages")):
        role = message.get("role")
        for part in _as_blocks(message.get("content")):
            serialized = _canonical({"role": role, **_without_cache_control(part)})
            blocks.append(_Block(serialized, _ttl(part)))
    if blocks and body.get("cache_control"):
        blocks[-1] = _Block(blocks[-1].json, _ttl(body))
    return blocks


def count_input_tokens(body: dict[str, Any]) -> int:
    """The request's input size, the same estimate the cache charges from."""
    return estimate_tokens("".join(b.json for b in request_blocks(body)))


def min_cacheable_tokens(model: str, table: Mapping[str, int] = MIN_CACHEABLE_TOKENS) -> int:
    """The shortest prefix the API caches for `model`."""
    for family in sorted(table, key=len, reverse=True):
        if model.startswith(family):
            return table[family]
    return DEFAULT_MIN_CACHEABLE_TOKENS


class PromptCache:
    """The cache of one fake server: prefix keys with an expiry, refreshed on a read.

    `ttl_s` replaces the 5-minute lifetime (None: entries never expire); `min_tokens` adds or
    replaces minimum cacheable lengths by model family (see `MIN_CACHEABLE_TOKENS`)."""

    def __init__(
        self,
        ttl_s: float | None = TTL_SECONDS["5m"],
        clock: Callable[[], float] = time.monotonic,
        *,
        min_tokens: Mapping[str, int] | None = None,
    ) -> None:
        self.ttl_s = ttl_s
        self.min_tokens: dict[str, int] = {**MIN_CACHEABLE_TOKENS, **(min_tokens or {})}
        self._clock = clock
        self._entries: dict[str, tuple[float, float]] = {}  # key: (expiry, lifetime)
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _lifetime(self, ttl: str) -> float:
        if ttl == "5m":
            return self.ttl_s if self.ttl_s is not None else math.inf
        return TTL_SECONDS[ttl]

    def charge(self, body: dict[str, Any]) -> Charge:
        """Account one request: read the longest cached prefix; the newer marked prefixes it
        writes are in the charge's `pending` until `publish`."""
        blocks = request_blocks(body)
        marks = [i for i, b in enumerate(blocks) if b.ttl is not None]
        if len(marks) > MAX_BREAKPOINTS:
            raise CacheRequestError(
                f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. "
                f"Found {len(marks)}."
            )
        ttls = [cast(str, blocks[m].ttl) for m in marks]
        for earlier, later in itertools.pairwise(ttls):
            if TTL_SECONDS[later] > TTL_SECONDS[earlier]:
                raise CacheRequestError(
                    "a ttl='1h' cache_control block must not come after a ttl='5m' "
                    "cache_control block"
                )
        model = str(body.get("model", ""))
        chars: list[int] = []
        keys: list[str] = []
        running = 0
        digest = hashlib.sha256(model.encode())
        for block in blocks:
            running += len(block.json)
            chars.append(running)
            digest.update(b"\x00" + block.json.encode())
            keys.append(digest.copy().hexdigest())
        total = math.ceil(running / 4)

        def tokens(position: int) -> int:
            return math.ceil(chars[position] / 4) if position >= 0 else 0

        floor = min_cacheable_tokens(model, self.min_tokens)
        marks = [m for m in marks if tokens(m) >= floor]
        if not marks:
            return Charge(input_tokens=total)
        ttl_of = {m: cast(str, blocks[m].ttl) for m in marks}
        now = self._clock()
        candidates = sorted(
            {p for m in marks for p in range(max(0, m - LOOKBACK_BLOCKS + 1), m + 1)},
            reverse=True,
        )
        with self._lock:
            read_at = -1
            for position in candidates:
                entry = self._entries.get(keys[position])
                if entry is not None and entry[0] > now:
                    read_at = position
                    self._entries[keys[position]] = (now + entry[1], entry[1])  # refreshed
                    break
        written_5m = written_1h = 0
        boundary = read_at
        pending: list[tuple[str, float]] = []
        for position in marks:
            if position <= read_at:
                continue
            size = tokens(position) - tokens(boundary)
            if ttl_of[position] == "1h":
                written_1h += size
            else:
                written_5m += size
            boundary = position
            pending.append((keys[position], self._lifetime(ttl_of[position])))
        read = tokens(read_at)
        written = written_5m + written_1h
        return Charge(
            input_tokens=max(0, total - read - written),
            cache_creation_input_tokens=written,
            cache_read_input_tokens=read,
            cache_creation_1h_input_tokens=written_1h,
            pending=tuple(pending),
        )

    def publish(self, charge: Charge) -> None:
        """The response of the request charged `charge` has begun: what it wrote is readable."""
        if not charge.pending:
            return
        now = self._clock()
        with self._lock:
            for key, written in charge.pending:
                expiry, known = self._entries.get(key, (0.0, 0.0))
                lifetime = max(written, known)
                self._entries[key] = (max(expiry, now + lifetime), lifetime)
