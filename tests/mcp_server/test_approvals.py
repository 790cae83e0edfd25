"""Approvals through a real MCP client: an eliciting client is asked within its next tool call
(in both protocol eras); a client without elicitation answers with `answer_approval`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.context import ClientRequestContext
from mcp_types import ElicitRequestParams, ElicitResult, ErrorData, ListRootsResult, Root

from mcp_server.server import FanoutServer, build_server
from orchestration.config import Settings
from tests.orchestration.scripts import Step, by_task, make_repo

pytestmark = pytest.mark.anyio

ERAS = ["legacy", "auto"]
SCRIPT: dict[str, list[Step]] = {
    "LOCK": [("write_file", {"path": "deps/app.lock", "content": "pinned\n"})]
}


def _server(repo: Path, **overrides: Any) -> FanoutServer:
    settings = Settings.from_env(
        {},
        repo=repo,
        sandbox="none",
        permissions={"ask": ["write(*.lock)"]},
        **overrides,
    )
    model = by_task(SCRIPT)
    return build_server(settings, lambda _name: model)


class Person:
    """An elicitation callback that answers every question the same way and keeps them."""

    def __init__(self, action: str, allow: bool = True) -> None:
        self.action = action
        self.allow = allow
        self.asked: list[str] = []

    async def __call__(
        self, context: ClientRequestContext, params: ElicitRequestParams
    ) -> ElicitResult | ErrorData:
        self.asked.append(params.message)
        if self.action != "accept":
            return ElicitResult(action=self.action)  # type: ignore[arg-type]
        return ElicitResult(action="accept", content={"allow": self.allow, "note": "ok by me"})


async def _spawn(client: Client) -> str:
    task = {"prompt": "LOCK", "name": "lock", "write_scope": ["deps"]}
    spawned = await client.call_tool("spawn_subagents", {"tasks": [task]})
    assert not spawned.is_error, spawned
    assert spawned.structured_content is not None
    return str(spawned.structured_content["run_id"])


async def _poll_until(client: Client, run_id: str, done: set[str]) -> dict[str, Any]:
    """Long-poll get_status until the agent's status is one of `done`; the answer's agent."""
    cursor = 0
    with anyio.fail_after(30):
        while True:
            answer = await client.call_tool(
                "get_status", {"run_id": run_id, "since": cursor, "wait_s": 5}
            )
            assert not answer.is_error, answer
            data = answer.structured_content
            assert data is not None
            cursor = int(data["cursor"])
            for agent in data["runs"][0]["agents"]:
                if agent["status"] in done:
                    return agent


async def _result(client: Client, agent_id: str) -> dict[str, Any]:
    answer = await client.call_tool("get_status", {"detail": [agent_id]})
    data = answer.structured_content
    assert data is not None
    return data["detail"][0]["agent"]["result"]


@pytest.mark.parametrize("era", ERAS)
async def test_an_eliciting_client_is_asked_and_its_yes_lets_the_call_run(
    tmp_path: Path, era: str
) -> None:
    repo = make_repo(tmp_path / "repo")
    person = Person("accept")
    async with Client(_server(repo), mode=era, elicitation_callback=person) as client:  # type: ignore[arg-type]
        run_id = await _spawn(client)
        agent = await _poll_until(client, run_id, {"succeeded", "failed"})
        assert agent["status"] == "succeeded"
        result = await _result(client, agent["agent_id"])
    assert len(person.asked) == 1
    assert "deps/app.lock" in person.asked[0] and "write(*.lock)" in person.asked[0]
    assert [c["path"] for c in result["changed_files"]] == ["deps/app.lock"]
    decisions = [p["decision"] for p in result["permissions"]]
    assert decisions == ["ask (ask: write(*.lock)): allowed by person"]


@pytest.mark.parametrize("era", ERAS)
async def test_a_declined_elicitation_refuses_the_call(tmp_path: Path, era: str) -> None:
    repo = make_repo(tmp_path / "repo")
    person = Person("decline")
    async with Client(_server(repo), mode=era, elicitation_callback=person) as client:  # type: ignore[arg-type]
        run_id = await _spawn(client)
        agent = await _poll_until(client, run_id, {"succeeded", "failed"})
        result = await _result(client, agent["agent_id"])
    assert len(person.asked) == 1
    assert result.get("changed_files", []) == []
    assert result["refused_calls"] == 1
    decisions = [p["decision"] for p in result["permissions"]]
    assert decisions == ["ask (ask: write(*.lock)): refused by person"]


@pytest.mark.parametrize("era", ERAS)
async def test_a_client_without_elicitation_answers_with_the_tool(tmp_path: Path, era: str) -> None:
    repo = make_repo(tmp_path / "repo")
    async with Client(_server(repo), mode=era) as client:
        run_id = await _spawn(client)
        agent = await _poll_until(client, run_id, {"waiting"})
        status = await client.call_tool("get_status", {"run_id": run_id})
        assert status.structured_content is not None
        step = str(status.structured_content["runs"][0]["next"])
        assert "answer_approval(approval_id=" in step
        approval_id = step.split('approval_id="', 1)[1].split('"', 1)[0]
        assert f"asks approval {approval_id}" in agent["flags"]
        answered = await client.call_tool(
            "answer_approval", {"approval_id": approval_id, "allow": True}
        )
        assert not answered.is_error, answered
        same = await client.call_tool(
            "answer_approval", {"approval_id": approval_id, "allow": True}
        )
        assert not same.is_error, same  # the same answer again is no error
        again = await client.call_tool(
            "answer_approval", {"approval_id": approval_id, "allow": False}
        )
        assert again.is_error and "already answered" in str(again.content)
        agent = await _poll_until(client, run_id, {"succeeded", "failed"})
        assert agent["status"] == "succeeded"


async def test_a_dismissed_elicitation_is_not_asked_again_and_times_out(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    person = Person("cancel")
    server = _server(repo, approval_timeout_s=1.0)
    async with Client(server, mode="legacy", elicitation_callback=person) as client:  # type: ignore[arg-type]
        run_id = await _spawn(client)
        agent = await _poll_until(client, run_id, {"succeeded", "failed"})
        result = await _result(client, agent["agent_id"])
    assert len(person.asked) == 1
    assert result.get("changed_files", []) == []
    decisions = [p["decision"] for p in result["permissions"]]
    assert decisions == ["ask (ask: write(*.lock)): refused by timeout"]


async def test_looking_for_approvals_never_opens_another_repository(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an unconfigured server learns its repository from the client's roots; the approval
    # resolver, which runs on every call, must not open the working directory's repository
    here = make_repo(tmp_path / "here")
    wanted = make_repo(tmp_path / "wanted")
    monkeypatch.chdir(here)
    settings = Settings.from_env({}, sandbox="none")
    server = build_server(settings, lambda _name: by_task(SCRIPT))

    async def roots(context: ClientRequestContext) -> ListRootsResult:
        return ListRootsResult(roots=[Root(uri=wanted.as_uri(), name="wanted")])  # pyright: ignore[reportArgumentType]

    person = Person("accept")
    async with Client(
        server,
        mode="auto",
        elicitation_callback=person,  # type: ignore[arg-type]
        list_roots_callback=roots,
    ) as client:
        answer = await client.call_tool("get_status", {})
        assert not answer.is_error, answer
    assert (wanted / ".git" / "fanout").exists()
    assert not (here / ".git" / "fanout").exists()
