"""The loop the README, `plan_fanout` and spawn's `next` teach, over stdio, always ends.

The loop: spawn, then `get_status(run_id, since=cursor, wait_s)` until the run is settled, then
merge while anything succeeded, and poll again. Agents whose scopes overlap run in waves: the
second waits until the first is merged, so a loop that waited for "no agent waiting" before it
merged never ended. A scope held by an earlier run's finished, unmerged agent is named in `next`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from fakeapi import FakeAnthropic, FakeRequest, Reply, by_key, finish, text, tool_use
from mcp_server.demo import make_sample_repo, structured
from tests.mcp_server.servers import stdio_params

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def _writer(path: str, content: str) -> Any:
    def script(request: FakeRequest) -> Reply:
        steps = [tool_use("write_file", path=path, content=content), finish(f"wrote {path}")]
        turn = request.assistant_turns
        return steps[turn] if turn < len(steps) else text("done")

    return script


SCRIPTS = {
    "[one]": _writer("docs/one.md", "one\n"),
    "[two]": _writer("docs/two.md", "two\n"),
    "[three]": _writer("src/three.py", "THREE = 3\n"),
    "[four]": _writer("src/four.py", "FOUR = 4\n"),
}


async def _loop(client: Client, run_id: str) -> tuple[int, list[dict[str, Any]]]:
    """The documented loop; returns the get_status calls made and every merge's agents."""
    cursor, calls, merged = 0, 0, list[dict[str, Any]]()
    with anyio.fail_after(120):
        while True:
            status = structured(
                await client.call_tool(
                    "get_status", {"run_id": run_id, "since": cursor, "wait_s": 60}
                )
            )
            calls += 1
            cursor = status["cursor"]
            run = status["runs"][0]
            if not run["settled"]:
                continue
            if not run["totals"]["by_status"].get("succeeded"):
                return calls, merged
            answer = structured(await client.call_tool("merge_results", {"run_id": run_id}))
            merged += answer["agents"]


async def test_waves_of_overlapping_scopes_end_by_themselves(tmp_path: Path) -> None:
    repo = make_sample_repo(tmp_path)
    fake = FakeAnthropic(by_key(SCRIPTS))
    tasks = [
        {"name": "one", "prompt": "[one]", "write_scope": ["docs/"]},
        {"name": "two", "prompt": "[two]", "write_scope": ["docs/"]},
        {"name": "three", "prompt": "[three]", "write_scope": ["src/"]},
        {"name": "four", "prompt": "[four]", "write_scope": ["src/"]},
    ]
    async with fake.serve(), Client(stdio_params(repo, fake.base_url), mode="legacy") as client:
        spawned = structured(await client.call_tool("spawn_subagents", {"tasks": tasks}))
        assert [len(a.get("waits_for", [])) for a in spawned["agents"]] == [0, 1, 0, 1]
        assert "get_status" in spawned["next"]
        calls, merged = await _loop(client, spawned["run_id"])
        assert sorted(a["name"] for a in merged if a["outcome"] == "merged") == [
            "four",
            "one",
            "three",
            "two",
        ]
        assert calls <= 4  # a settled answer per wave, and the last one that ends the loop
        final = structured(await client.call_tool("get_status", {"run_id": spawned["run_id"]}))[
            "runs"
        ][0]
        assert final["settled"] and final["next"].startswith("nothing to do")
    for rel, body in (("docs/one.md", "one\n"), ("src/four.py", "FOUR = 4\n")):
        assert (repo / rel).read_text() == body


async def _spawn_one(client: Client, name: str, scope: list[str]) -> dict[str, Any]:
    """Spawn a run of one task named `name`, whose prompt is its script's key."""
    task = {"name": name, "prompt": f"[{name}]", "write_scope": scope}
    return structured(await client.call_tool("spawn_subagents", {"tasks": [task]}))


async def _wait(client: Client, run_id: str) -> dict[str, Any]:
    """The run, once a long-poll from the start answers (the run needs the orchestrator)."""
    answer = await client.call_tool("get_status", {"run_id": run_id, "since": 0, "wait_s": 60})
    return structured(answer)["runs"][0]


async def test_a_scope_held_by_an_earlier_run_is_named_and_the_loop_ends(tmp_path: Path) -> None:
    repo = make_sample_repo(tmp_path)
    fake = FakeAnthropic(by_key(SCRIPTS))
    async with fake.serve(), Client(stdio_params(repo, fake.base_url), mode="legacy") as client:
        first = await _spawn_one(client, "one", ["docs/"])
        status = await _wait(client, first["run_id"])
        assert status["settled"]  # finished, not merged: it keeps docs/
        second = await _spawn_one(client, "two", ["docs/"])
        waiting = await _wait(client, second["run_id"])
        assert waiting["settled"]
        assert waiting["agents"][0]["status"] == "waiting"
        assert f'merge_results(run_id="{first["run_id"]}")' in waiting["next"]
        await client.call_tool("merge_results", {"run_id": first["run_id"]})
        calls, merged = await _loop(client, second["run_id"])
        assert [a["outcome"] for a in merged] == ["merged"]
        assert calls <= 3
    assert (repo / "docs/two.md").read_text() == "two\n"
