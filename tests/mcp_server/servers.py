"""How the end-to-end tests start this checkout's stdio server with the real `anthropic` client
pointed at a fake Messages API, and run the demo's tasks through a client."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from mcp import Client, StdioServerParameters

from mcp_server.demo import DEMO_TASKS, structured, wait_settled

ROOT = Path(__file__).resolve().parents[2]


def stdio_params(repo: Path, base_url: str) -> StdioServerParameters:
    """The server on `repo`, its model calls going to the fake at `base_url`, no sandbox."""
    env = {
        **os.environ,
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": "sk-test-dummy",
        "FANOUT_SANDBOX": "none",
        "FANOUT_MODEL_PROVIDER": "anthropic",
        "PYTHONPATH": str(ROOT),
    }
    return StdioServerParameters(
        command=sys.executable, args=["-m", "mcp_server.cli", "--repo", str(repo)], env=env
    )


async def spawn_demo_settled(client: Client, *names: str) -> dict[str, Any]:
    """Spawn the named demo tasks (every one when none is named) as one run and long-poll until
    the run is settled; returns spawn's structured answer."""
    tasks = [
        {"name": key, "prompt": task.prompt, "write_scope": task.write_scope}
        for key, task in DEMO_TASKS.items()
        if not names or key in names
    ]
    spawn = structured(await client.call_tool("spawn_subagents", {"tasks": tasks}))
    await wait_settled(client, str(spawn["run_id"]), 0, lambda _: None)
    return spawn
