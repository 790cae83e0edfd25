"""`fanout-mcp demo`: the whole product with no API key.

A temporary sample repository; the server started as a subprocess with a deterministic demo
model (`--model-provider demo`), driven by a real MCP client over stdio: spawn three agents,
watch them live, merge, meet one conflict, rerun and merge again.

The conflict is deterministic: while the agents work, "you" commit a change to the line of
`src/greet.py` that the `greeting` agent also rewrites. Its merge then conflicts (the canonical
branch moved under it), its branch is kept, and `rerun_subagent` redoes the task on the new head.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from mcp import Client, StdioServerParameters
from mcp_types import CallToolResult, TextContent
from pydantic import JsonValue

from orchestration.model import Model, ModelRequest, ModelResponse
from orchestration.orchestrator import ModelFactory
from orchestration.providers.function import FunctionModel
from orchestration.providers.scripted import reply_finish, reply_text, reply_tool
from orchestration.workspace import run_git

_GREET = (
    'GREETING = "{word}"\n\n\ndef greet(name: str) -> str:\n'
    '    return f"{{GREETING}}, {{name}}{end}"\n'
)
GREET_BASE = _GREET.format(word="hello", end="")
GREET_AGENT = _GREET.format(word="Hello", end="!")
GREET_USER = _GREET.format(word="hi", end="")
GREET_RERUN = _GREET.format(word="hi", end="!")

SAMPLE_FILES: dict[str, str] = {
    "README.md": "# sample\n\nA tiny project for the fanout demo.\n",
    "src/greet.py": GREET_BASE,
    "src/mathx.py": "def add(a: int, b: int) -> int:\n    return a + b\n",
    "docs/.keep": "",
}

Call = tuple[str, dict[str, JsonValue]]


@dataclass(frozen=True)
class DemoTask:
    """A demo task and the tool calls its agent makes, one per turn, before `finish`."""

    prompt: str
    write_scope: list[str]
    calls: list[Call]
    summary: str


# task key (found in the agent's task as "[key]") -> the task
DEMO_TASKS: dict[str, DemoTask] = {
    "greeting": DemoTask(
        prompt="[greeting] Make greet() capitalise the greeting and end with '!'.",
        write_scope=["src/greet.py"],
        calls=[("write_file", {"path": "src/greet.py", "content": GREET_AGENT})],
        summary="greet() now says 'Hello, <name>!'",
    ),
    "mathx": DemoTask(
        prompt="[mathx] Add a mul(a, b) function next to add() in src/mathx.py.",
        write_scope=["src/mathx.py"],
        calls=[
            (
                "write_file",
                {
                    "path": "src/mathx.py",
                    "content": "def add(a: int, b: int) -> int:\n    return a + b\n\n\n"
                    "def mul(a: int, b: int) -> int:\n    return a * b\n",
                },
            )
        ],
        summary="added mul()",
    ),
    "docs": DemoTask(
        prompt="[docs] Write docs/usage.md describing greet() and add().",
        write_scope=["docs/"],
        calls=[
            (
                "write_file",
                {
                    "path": "docs/usage.md",
                    "content": "# Usage\n\n- `greet(name)` greets someone.\n"
                    "- `add(a, b)` adds two numbers.\n",
                },
            )
        ],
        summary="documented greet() and add()",
    ),
}

RERUN_CALLS: dict[str, list[Call]] = {
    "greeting": [("write_file", {"path": "src/greet.py", "content": GREET_RERUN})],
}


def _key(request: ModelRequest) -> str | None:
    for key in DEMO_TASKS:
        if f"[{key}]" in request.system_task:
            return key
    return None


SCRIPT_MARK = "[script] "


def _script(request: ModelRequest) -> list[Call] | None:
    """The tool calls a task prompt spells out on a line `[script] [[name, {input}], ...]` (for
    benchmarks and end-to-end tests that need a chosen sequence of calls)."""
    at = request.system_task.find(SCRIPT_MARK)
    if at < 0:
        return None
    line = request.system_task[at + len(SCRIPT_MARK) :].split("\n", 1)[0]
    try:
        calls = json.loads(line)
    except ValueError:
        return None
    return [(str(name), dict(args)) for name, args in calls]


def demo_reply(request: ModelRequest) -> ModelResponse:
    """The demo model: each task's tool calls one per turn, then `finish`; deterministic."""
    script = _script(request)
    if script is not None:
        turn = sum(1 for m in request.messages if m.role == "assistant")
        if turn < len(script):
            name, args = script[turn]
            return reply_tool(name, **args)
        return reply_finish("the script is played") if turn == len(script) else reply_text("done")
    key = _key(request)
    if key is None:
        return reply_finish("nothing to do: not a demo task", status="failed")
    rerun = "# This is a re-run" in request.system_task
    task = DEMO_TASKS[key]
    calls = RERUN_CALLS.get(key, task.calls) if rerun else task.calls
    turn = sum(1 for m in request.messages if m.role == "assistant")
    if turn < len(calls):
        name, args = calls[turn]
        return reply_tool(name, **args)
    if turn == len(calls):
        return reply_finish(task.summary + (" (redone on the new head)" if rerun else ""))
    return reply_text("done")


def demo_model_factory() -> ModelFactory:
    model = FunctionModel(demo_reply, name="demo")

    def make(name: str) -> Model:
        return model

    return make


# --- the demo driver ---------------------------------------------------------------------------


def _git(repo: Path, *args: str) -> str:
    identity = {
        "GIT_AUTHOR_NAME": "fanout demo",
        "GIT_AUTHOR_EMAIL": "demo@fanout.invalid",
        "GIT_COMMITTER_NAME": "fanout demo",
        "GIT_COMMITTER_EMAIL": "demo@fanout.invalid",
    }
    return run_git(repo, *args, env=identity).stdout


def make_sample_repo(root: Path) -> Path:
    repo = root / "sample"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    for rel, text in SAMPLE_FILES.items():
        path = repo / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "sample project")
    return repo


def server_params(
    repo: Path, *extra: str, env: dict[str, str] | None = None
) -> StdioServerParameters:
    """How to start this checkout's server on `repo` with the demo model."""
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "mcp_server.cli", "--repo", str(repo), "--model-provider", "demo", *extra],
        env={**os.environ, **(env or {})},
    )


def structured(result: CallToolResult) -> dict[str, Any]:
    if result.is_error:
        text = " ".join(c.text for c in result.content if isinstance(c, TextContent))
        raise RuntimeError(f"tool error: {text}")
    assert result.structured_content is not None
    return dict(result.structured_content)


def text_of(result: CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, TextContent))


async def wait_settled(
    client: Client, run_id: str, cursor: int, say: Callable[[str], None], timeout_s: float = 60
) -> int:
    """Long-poll get_status until the run needs the orchestrator (settled); returns the last
    cursor. Each answer lists only the agents that changed since the cursor passed."""
    with anyio.fail_after(timeout_s):
        while True:
            result = await client.call_tool(
                "get_status", {"run_id": run_id, "since": cursor, "wait_s": 30}
            )
            status = structured(result)
            cursor = int(status["cursor"])
            run = status["runs"][0]
            line = ", ".join(f"{a['name']}={a['status']}" for a in run["agents"])
            say(f"  get_status (cursor {cursor}): {line or 'no change'}")
            if run["settled"]:
                say(f"  next: {run['next']}")
                return cursor


async def run_demo(say: Callable[[str], None] = print) -> int:
    """The scripted tour; returns the process exit code."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fanout-demo-") as tmp:
        repo = make_sample_repo(Path(tmp))
        say(f"1. a sample repository at {repo} (src/greet.py, src/mathx.py, docs/)")
        say("2. starting `fanout-mcp --model-provider demo` over stdio and connecting a client")
        async with Client(server_params(repo), mode="legacy") as client:
            tools = await client.list_tools()
            say("   tools: " + ", ".join(t.name for t in tools.tools))
            tasks = [
                {"name": key, "prompt": spec.prompt, "write_scope": spec.write_scope}
                for key, spec in DEMO_TASKS.items()
            ]
            say("3. spawn_subagents: three tasks with disjoint write scopes")
            spawn = await client.call_tool(
                "spawn_subagents",
                {
                    "tasks": tasks,
                    "shared_context": {
                        "plan": "Polish the sample project.",
                        "files": ["README.md"],
                    },
                },
            )
            spawned = structured(spawn)
            say(_indent(text_of(spawn)))
            run_id = str(spawned["run_id"])
            ids = {a["name"]: a["agent_id"] for a in spawned["agents"]}
            say(
                "4. meanwhile you commit a change to the same line of src/greet.py on main "
                "(greeting = 'hi')"
            )
            (repo / "src/greet.py").write_text(GREET_USER)
            _git(repo, "commit", "-q", "-am", "user: greet with hi")
            say("5. get_status long-polls (since=cursor, wait_s) until the run needs you")
            cursor = await wait_settled(client, run_id, 0, say)
            say("6. merge_results(dry_run=true): what would happen")
            dry = await client.call_tool("merge_results", {"run_id": run_id, "dry_run": True})
            say(_indent(text_of(dry)))
            say("7. merge_results: two merge cleanly, greeting conflicts with your commit")
            merged = await client.call_tool("merge_results", {"run_id": run_id})
            merge = structured(merged)
            say(_indent(text_of(merged)))
            outcomes = {a["name"]: a["outcome"] for a in merge["agents"]}
            if outcomes.get("greeting") != "conflicted":
                say(f"unexpected outcomes: {outcomes}")
                return 1
            say("8. rerun_subagent(greeting): a new agent on the new head, told about the conflict")
            rerun = await client.call_tool(
                "rerun_subagent",
                {"agent_id": ids["greeting"], "instructions": "Keep the user's lowercase 'hi'."},
            )
            say(_indent(text_of(rerun)))
            new_id = str(structured(rerun)["agent"]["agent_id"])
            await wait_settled(client, run_id, cursor, say)
            say("9. merge_results again")
            final = await client.call_tool(
                "merge_results", {"run_id": run_id, "agent_ids": [new_id]}
            )
            final_s = structured(final)
            say(_indent(text_of(final)))
            if final_s["agents"][0]["outcome"] != "merged":
                return 1
            log = _git(repo, "log", "--oneline", "-6")
            say("10. the repository now:\n" + _indent(log.rstrip()))
            say(_indent("src/greet.py: " + json.dumps((repo / "src/greet.py").read_text())))
    say(f"done in {time.monotonic() - started:.1f} s")
    return 0


def _indent(text: str) -> str:
    return "\n".join("   " + line for line in text.splitlines())


def main() -> int:
    return anyio.run(run_demo)
