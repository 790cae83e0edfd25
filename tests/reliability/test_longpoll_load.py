"""Long-polls under load: every `get_status(since, wait_s)` answers within its `wait_s` (plus a
margin) while many agents are being cancelled, whether a change wakes it or its time runs out.

Full profile: 384 agents (6 runs of 64, the most a run holds, all running at once) held in a
model call, then cancelled, while 1,000 long-polls with `wait_s=30` wait; CI: 2 runs of 16 and
`wait_s=4`. A quiet run of one agent, left alone, gives polls that end by timing out. The polls go
through the real MCP surface (an in-memory client session); they skip the SDK client's
re-validation of each answer against the output schema, which is the client's own cost.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp_types import CallToolRequest, CallToolRequestParams, CallToolResult

from mcp_server.answers import StatusAnswer
from mcp_server.server import build_server
from orchestration.config import Settings
from orchestration.contracts import AgentStatus
from orchestration.model import Model, ModelRequest, ModelResponse
from orchestration.providers.function import FunctionModel
from tests.orchestration.scripts import make_repo, tool_reply, turn_index
from tests.reliability.conftest import FULL, Ledger

pytestmark = pytest.mark.anyio

G_LONGPOLL = "G8d load: long-polls answer within wait_s during a mass cancellation"

RUNS, PER_RUN, WAIT_S = (6, 64, 30.0) if FULL else (2, 16, 4.0)
POLLS = 1000
MARGIN_S = 2.0


class HeldAgents:
    """A model whose agents write a file, then stay in their next model call until cancelled;
    `all_held` is set once `total` agents are there."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.held = 0
        self.all_held = anyio.Event()

    async def reply(self, request: ModelRequest) -> ModelResponse:
        key = request.system_task.split("<<", 1)[1].split(">>", 1)[0]
        if turn_index(request) == 0:
            return tool_reply("write_file", {"path": f"load/{key}/f.txt", "content": key}, 0)
        self.held += 1
        if self.held == self.total:
            self.all_held.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    def model(self, name: str) -> Model:
        return FunctionModel(self.reply)


async def _call(client: Client, name: str, arguments: Mapping[str, object]) -> dict[str, Any]:
    """A tool call through the client session, its answer not re-validated against the schema."""
    request = CallToolRequest(params=CallToolRequestParams(name=name, arguments=dict(arguments)))
    result = await client.session.send_request(request, CallToolResult)
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


async def _spawn(client: Client, label: str, count: int) -> str:
    tasks = [
        {"prompt": f"<<{label}a{i:02d}>> hold", "write_scope": [f"load/{label}a{i:02d}"]}
        for i in range(count)
    ]
    spawned = await _call(client, "spawn_subagents", {"tasks": tasks, "max_concurrency": count})
    return str(spawned["run_id"])


async def test_long_polls_answer_within_wait_s_during_a_mass_cancel(
    tmp_path: Path, ledger: Ledger
) -> None:
    repo = make_repo(tmp_path / "repo")
    agents = HeldAgents(RUNS * PER_RUN + 1)
    settings = Settings.model_validate(
        {"repo": repo, "sandbox": "none", "max_concurrency": PER_RUN, "lease_lock_delay_s": 0}
    )
    server = build_server(settings, agents.model)
    late: list[tuple[float, str]] = []  # (seconds, which poll)
    quiet_changed: list[int] = []
    async with Client(server) as client:
        run_ids = [await _spawn(client, f"r{r}", PER_RUN) for r in range(RUNS)]
        quiet = await _spawn(client, "quiet", 1)
        with anyio.fail_after(600):
            await agents.all_held.wait()
        # the cursor as it is now, read without a status call (which would also measure the
        # workspaces' disk usage before the load)
        cursor = (await server.app.context()).store.cursor()

        async def poll(i: int) -> None:
            arguments: dict[str, object] = {"since": cursor, "wait_s": WAIT_S}
            if i % 4 == 1:
                arguments["run_id"] = quiet
            elif i % 4:
                arguments["run_id"] = run_ids[i % RUNS]
            started = time.monotonic()
            answer: dict[str, Any] = {}
            with anyio.move_on_after(WAIT_S + 120):  # counted late below if it ends this way
                answer = await _call(client, "get_status", arguments)
            seconds = time.monotonic() - started
            if seconds > WAIT_S + MARGIN_S:
                late.append((seconds, str(arguments.get("run_id", "all runs"))))
            elif i % 4 == 1 and answer["changed"]:
                quiet_changed.append(i)

        async with anyio.create_task_group() as tg:
            for i in range(POLLS):
                tg.start_soon(poll, i)
            for run_id in run_ids:
                tg.start_soon(_call, client, "cancel_subagents", {"run_id": run_id})
        final = StatusAnswer.model_validate(await _call(client, "get_status", {}))
    ledger.record(
        G_LONGPOLL,
        f"{POLLS} polls (wait_s={WAIT_S:g}) while {RUNS * PER_RUN} agents are cancelled",
        not late,
        f"{len(late)} answered after wait_s + {MARGIN_S:g} s, the slowest "
        + ", ".join(f"in {s:.1f} s ({which})" for s, which in sorted(late)[-3:]),
    )
    assert not late, ledger.failures(G_LONGPOLL)
    assert not quiet_changed, "a poll of the quiet run reported a change"
    # the load was what it says: every agent of the cancelled runs stopped with its work
    for run in final.runs:
        if run.run_id != quiet:
            for agent in run.agents:
                assert agent.status == AgentStatus.CANCELLED, agent
                assert agent.files, agent
