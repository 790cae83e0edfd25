"""Token estimates and prompt-cache accounting that mimic the Messages API.

The request is cut into blocks in API order (tools, system blocks, message content blocks). A
block marked with `cache_control` (or the last block, for a top-level `cache_control`) ends a
cacheable prefix, keyed by a hash of the model and the prefix's canonical JSON (cache_control
itself left out). Like the API, the longest cached prefix ending at a marked block or at one of
the 20 blocks before it is read; marked prefixes longer than that are written."""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

MAX_BREAKPOINTS = 4
LOOKBACK_BLOCKS = 20


def estimate_tokens(text: str) -> int:
    """ceil(characters / 4)."""
    return math.ceil(len(text) / 4)


class TooManyBreakpoints(ValueError):
    """More than four `cache_control` blocks (the API answers 400)."""


@dataclass(frozen=True)
class Charge:
    """The input side of a request's usage."""

    input_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    @property
    def total_input(self) -> int:
        return self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens


@dataclass(frozen=True)
class _Block:
    json: str
    marked: bool


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


def request_blocks(body: dict[str, Any]) -> list[_Block]:
    """The request's cacheable blocks in API order, each serialized without its cache_control."""
    blocks: list[_Block] = []
    for tool in _as_blocks(body.get("tools")):
        blocks.append(_Block(_canonical(_without_cache_control(tool)), "cache_control" in tool))
    for part in _as_blocks(body.get("system")):
        blocks.append(_Block(_canonical(_without_cache_control(part)), "cache_control" in part))
    for message in _as_blocks(body.get("messages")):
        role = message.get("role")
        for part in _as_blocks(message.get("content")):
            serialized = _canonical({"role": role, **_without_cache_control(part)})
            blocks.append(_Block(serialized, "cache_control" in part))
    if body.get("cache_control") and blocks:
        blocks[-1] = _Block(blocks[-1].json, True)
    return blocks


def count_input_tokens(body: dict[str, Any]) -> int:
    """The request's input size, the same estimate the cache charges from."""
    return estimate_tokens("".join(b.json for b in request_blocks(body)))


class PromptCache:
    """The cache of one fake server: prefix keys with an optional TTL (refreshed on a read)."""

    def __init__(
        self, ttl_s: float | None = 300.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._expiry: dict[str, float] = {}
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._expiry.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._expiry)

    def charge(self, body: dict[str, Any]) -> Charge:
        """Account one request: read the longest cached prefix, write newer marked ones."""
        blocks = request_blocks(body)
        marks = [i for i, b in enumerate(blocks) if b.marked]
        if len(marks) > MAX_BREAKPOINTS:
            raise TooManyBreakpoints(
                f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. "
                f"Found {len(marks)}."
            )
        chars: list[int] = []
        keys: list[str] = []
        running = 0
        digest = hashlib.sha256(str(body.get("model", "")).encode())
        for block in blocks:
            running += len(block.json)
            chars.append(running)
            digest.update(b"\x00" + block.json.encode())
            keys.append(digest.copy().hexdigest())
        total = math.ceil(running / 4)
        if not marks:
            return Charge(input_tokens=total)

        def tokens(position: int) -> int:
            return math.ceil(chars[position] / 4) if position >= 0 else 0

        now = self._clock()
        expires = now + self.ttl_s if self.ttl_s is not None else math.inf
        candidates = sorted(
            {p for m in marks for p in range(max(0, m - LOOKBACK_BLOCKS + 1), m + 1)},
            reverse=True,
        )
        with self._lock:
            read_at = -1
            for position in candidates:
                expiry = self._expiry.get(keys[position])
                if expiry is not None and expiry > now:
                    read_at = position
                    self._expiry[keys[position]] = expires
                    break
            for position in marks:
                if position > read_at:
                    self._expiry[keys[position]] = expires
        read = tokens(read_at)
        written = max(0, tokens(marks[-1]) - read)
        return Charge(
            input_tokens=max(0, total - read - written),
            cache_creation_input_tokens=written,
            cache_read_input_tokens=read,
        )
