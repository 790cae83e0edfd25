"""A server (an `Orchestrator` with the Ray executor) in a process of its own, for a test to kill:
`python -m tests.orchestration.ray_head <repo> <cluster address>` spawns one agent whose task
is `TASK-KILL`, prints its run and agent ids as a JSON line, and runs until it is killed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio

from orchestration.config import Settings
from orchestration.contracts import SpawnRequest, TaskSpec
from orchestration.orchestrator import Orchestrator


async def main(repo: Path, address: str) -> None:
    settings = Settings(
        repo=repo, sandbox="none", model="claude-sonnet-5-5", executor="ray", ray_address=address
    )
    async with Orchestrator(settings) as orch:
        spawned = await orch.spawn(
            SpawnRequest(tasks=[TaskSpec(prompt="TASK-KILL", name="k", write_scope=["src/k"])])
        )
        line = {"run_id": spawned.run_id, "agent_id": spawned.agents[0].agent_id}
        print(json.dumps(line), flush=True)
        await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main, Path(sys.argv[1]), sys.argv[2])
