"""Handlers: functions of a request that answer a reply or a fault; scripted conversations
that pick the reply by turn, and a keyed dispatch that gives each agent its own script."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeAlias

from fakeapi.faults import Fault, api_error
from fakeapi.replies import Reply, finish, text, tool_use
from fakeapi.request import FakeRequest

Answer: TypeAlias = Reply | Fault | str
Handler: TypeAlias = Callable[[FakeRequest], Answer | Awaitable[Answer]]
Step: TypeAlias = Answer | Handler


def as_reply(answer: Answer) -> Reply | Fault:
    """A bare string is a text reply that ends the turn."""
    return text(answer) if isinstance(answer, str) else answer


async def resolve(step: Step, request: FakeRequest) -> Reply | Fault:
    """Run a handler (sync or async) or take a fixed answer."""
    if callable(step):
        result = step(request)
        if inspect.isawaitable(result):
            result = await result
        return as_reply(result)
    return as_reply(step)


def echo(request: FakeRequest) -> Reply:
    """The default handler: echoes the last user text and ends the turn."""
    return text(f"echo: {request.last_user_text}")


class ScriptedConversation:
    """Steps picked by how many assistant turns the request already holds: step 0 answers the
    first request, step 1 the request carrying the first answer back, and so on. Retries of a
    turn get the same step. Past the end, `after_end` answers (default: a 400 naming the turn)."""

    def __init__(self, *steps: Step, after_end: Step | None = None) -> None:
        self.steps = steps
        self.after_end = after_end

    async def __call__(self, request: FakeRequest) -> Reply | Fault:
        turn = request.assistant_turns
        if turn < len(self.steps):
            return await resolve(self.steps[turn], request)
        if self.after_end is not None:
            return await resolve(self.after_end, request)
        return api_error(
            400,
            "invalid_request_error",
            f"fake script exhausted: turn {turn} asked, the script has {len(self.steps)} steps",
        )


def by_turn(*steps: Step, after_end: Step | None = None) -> ScriptedConversation:
    """`by_turn(tool_use("write_file", path="a", content="x"), finish("done"))`."""
    return ScriptedConversation(*steps, after_end=after_end)


def writes_file(path: str, content: str, *, summary: str = "done") -> ScriptedConversation:
    """The script of an agent that writes one file, then calls `finish`, then says the summary."""
    return by_turn(
        tool_use("write_file", path=path, content=content),
        finish(summary),
        text(summary),
    )


class KeyedHandler:
    """Dispatches to the handler whose key occurs in the system prompt or the first user message
    (the longest matching key wins), so agents with different tasks get different scripts."""

    def __init__(self, scripts: Mapping[str, Step], *, default: Step | None = None) -> None:
        self.scripts = dict(scripts)
        self.default = default

    async def __call__(self, request: FakeRequest) -> Reply | Fault:
        haystack = f"{request.system_text}\n{request.first_user_text}"
        for key in sorted(self.scripts, key=len, reverse=True):
            if key in haystack:
                return await resolve(self.scripts[key], request)
        if self.default is not None:
            return await resolve(self.default, request)
        return api_error(
            400,
            "invalid_request_error",
            f"no fake script matches this request (keys: {sorted(self.scripts)})",
        )


def by_key(scripts: Mapping[str, Step], *, default: Step | None = None) -> KeyedHandler:
    """`by_key({"task-a": writes_file("a.py", "..."), "task-b": by_turn(...)})`."""
    return KeyedHandler(scripts, default=default)
