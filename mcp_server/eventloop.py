"""The event loop a server process runs on (`FANOUT_EVENT_LOOP`).

Every agent's model calls, tool calls and state changes are steps of one event loop, so the
loop's own cost per step is paid many times per agent. uvloop (libuv) makes a step, a socket
read and a timer cheaper than asyncio's pure-Python loop; it is a dependency where it builds
(Linux, macOS). anyio, the MCP SDK and the `anthropic` SDK run on it unchanged: it is an
asyncio loop."""

from __future__ import annotations

import importlib.util
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

from orchestration.config import EventLoopSetting
from orchestration.errors import ConfigError

T = TypeVar("T")


def uvloop_installed() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def backend_options(choice: EventLoopSetting) -> dict[str, Any]:
    """anyio's asyncio-backend options for `choice`: `auto`, uvloop where it is installed, else
    asyncio's own loop; `uvloop`, uvloop or a `ConfigError` saying how to get it; `asyncio`,
    asyncio's own loop."""
    if choice == "asyncio":
        return {}
    if not uvloop_installed():
        if choice == "uvloop":
            raise ConfigError(
                "FANOUT_EVENT_LOOP=uvloop, but uvloop is not installed here: install it "
                "(pip install uvloop; it builds on Linux and macOS) or set FANOUT_EVENT_LOOP=auto"
            )
        return {}
    return {"use_uvloop": True}


def describe(choice: EventLoopSetting) -> str:
    """The loop `choice` gives here, for `fanout-mcp status` and the logs."""
    if choice == "asyncio" or not uvloop_installed():
        why = "FANOUT_EVENT_LOOP=asyncio" if choice == "asyncio" else "uvloop is not installed"
        return f"asyncio's own ({why})"
    return "uvloop"


def run(func: Callable[..., Awaitable[T]], *args: object, choice: EventLoopSetting) -> T:
    """`anyio.run(func, *args)` on the loop `choice` gives."""
    return anyio.run(func, *args, backend_options=backend_options(choice))
