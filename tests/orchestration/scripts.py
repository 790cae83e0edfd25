"""Test helpers: git repositories and agents scripted by task, on the real Model interface."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import cast

import anyio
from pydantic import JsonValue

from orchestration.agent import AgentLoop, Budget, Progress, Transcript
from orchestration.model import (
    Model,
    ModelRequest,
    ModelResponse,
    TextBlock,
    ToolUseBlock,
    Usage,
)
from orchestration.providers.function import FunctionModel
from orchestration.retry import RetryPolicy
from orchestration.state import StateStore, host_identity
from toolbus.bus import AgentBus

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test User",
    "GIT_AUTHOR_EMAIL": "user@example.invalid",
    "GIT_COMMITTER_NAME": "Test User",
    "GIT_COMMITTER_EMAIL": "user@example.invalid",
}

Step = tuple[str, dict[str, JsonValue]]


def git(repo: Path, *args: str) -> str:
    """Run git in `repo` as the test user; return stdout."""
    import os

    env = {**os.environ, **GIT_ENV}
    out = subprocess.run(
        ["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True
    )
    return out.stdout


def make_repo(root: Path, files: Mapping[str, str] | None = None) -> Path:
    """A git repository with one commit holding `files`."""
    root.mkdir(parents=True, exist_ok=True)
    git(root, "init", "-q", "-b", "main")
    contents = files or {
        "README.md": "# sample\n",
        "src/app/__init__.py": "",
        "src/app/core.py": "def core():\n    return 1\n",
        "src/lib/util.py": "def util():\n    return 2\n",
        "docs/guide.md": "guide\n",
    }
    for rel, text in contents.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "initial")
    return root


def include_behind_hasconfig(repo: Path, included: Path, text: str) -> None:
    """Write `text` to `included` and make `repo`'s configuration include it behind an
    `includeIf "hasconfig:..."` condition that its remote meets: git reads what it includes,
    libgit2 lists only the section's own key."""
    included.write_text(text)
    git(repo, "remote", "add", "origin", "https://example.invalid/r.git")
    with (repo / ".git" / "config").open("a") as config:
        config.write(
            '[includeIf "hasconfig:remote.*.url:https://example.invalid/**"]\n'
            f"\tpath = {included}\n"
        )


def turn_index(request: ModelRequest) -> int:
    """How many assistant turns the conversation already holds."""
    return sum(1 for m in request.messages if m.role == "assistant")


def tool_reply(name: str, arguments: dict[str, JsonValue], n: int) -> ModelResponse:
    return ModelResponse(
        content=[ToolUseBlock(type="tool_use", id=f"toolu_{n}_{name}", name=name, input=arguments)],
        stop_reason="tool_use",
        usage=Usage(input_tokens=100, output_tokens=20),
        model="scripted",
    )


def text_reply(text: str) -> ModelResponse:
    return ModelResponse(
        content=[TextBlock(type="text", text=text)],
        stop_reason="end_turn",
        usage=Usage(input_tokens=100, output_tokens=20),
        model="scripted",
    )


def by_task(
    scripts: Mapping[str, list[Step]],
    *,
    gate: Callable[[str, int], Awaitable[None]] | None = None,
    seen: list[ModelRequest] | None = None,
) -> FunctionModel:
    """A model whose replies follow, per agent, the script whose key occurs in its task text.

    Each step is a tool call (name, arguments); past the end of a script, the agent finishes.
    `gate(key, turn)` may block a turn (to hold an agent mid-run); `seen` collects requests.
    """

    async def reply(request: ModelRequest) -> ModelResponse:
        if seen is not None:
            seen.append(request)
        key = next((k for k in scripts if k in request.system_task), None)
        if key is None:
            return text_reply("no script for this task")
        turn = turn_index(request)
        if gate is not None:
            await gate(key, turn)
        steps = scripts[key]
        if turn < len(steps):
            name, arguments = steps[turn]
            return tool_reply(name, arguments, turn)
        return tool_reply("finish", {"summary": f"{key} done"}, turn)

    return FunctionModel(reply)


class Gate:
    """Holds chosen agents at a chosen turn until released; tests wait on `reached`."""

    def __init__(self, hold: Mapping[str, int]) -> None:
        self.hold = dict(hold)
        self.reached: dict[str, anyio.Event] = {k: anyio.Event() for k in hold}
        self.release: dict[str, anyio.Event] = {k: anyio.Event() for k in hold}

    async def __call__(self, key: str, turn: int) -> None:
        if self.hold.get(key) == turn:
            self.reached[key].set()
            await self.release[key].wait()


def add_server(store: StateStore, server_id: str, pid: int, host: str | None = None) -> None:
    """Register another server in `store` with a fresh heartbeat, as that server's process
    would: on this machine unless `host` names another. With the pid of a process that has
    exited, it is a server killed a moment ago."""
    now = time.time()
    with store._tx() as db:  # pyright: ignore[reportPrivateUsage]
        db.execute(
            "INSERT INTO servers (server_id, pid, host, started_at, heartbeat) "
            "VALUES (?, ?, ?, ?, ?)",
            (server_id, pid, host or host_identity(), now, now),
        )


async def exited_pid() -> int:
    """The pid of a process that has run and exited."""
    done = await anyio.run_process([sys.executable, "-c", "import os; print(os.getpid())"])
    return int(done.stdout)


def tool_loop(
    model: Model,
    tools: object,
    *,
    budget: Budget | None = None,
    on_turn: Callable[[Progress, int, int], None] | None = None,
    transcript: Transcript | None = None,
    max_turns: int = 3,
) -> AgentLoop:
    """An agent loop over `model` whose tool calls go to `tools` (anything with the bus's
    `call`); by default its budget is unlimited, its turns unrecorded, its transcript none."""

    async def ready() -> AgentBus:
        return cast(AgentBus, tools)

    return AgentLoop(
        model=model,
        model_name="test-model",
        bus=None,
        workspace_ready=ready,
        budget=budget or Budget(lambda amount: True, lambda reserved, used: None, lambda: "none"),
        retry=RetryPolicy(max_attempts=1),
        system_prefix="prefix",
        system_task="task",
        tools=[],
        max_turns=max_turns,
        max_output_tokens=1000,
        on_turn=on_turn or (lambda progress, reserved, used: None),
        transcript=transcript or Transcript(None),
    )
