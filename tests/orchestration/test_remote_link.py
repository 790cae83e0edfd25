"""The worker's side of the link to the head, without Ray: a head that refuses or does not
answer is a lost lease for the agent's writes; and what the Ray executor refuses at spawn."""

from __future__ import annotations

import socket
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

from orchestration.config import Settings
from orchestration.contracts import SpawnRequest, TaskSpec
from orchestration.errors import InvalidRequest
from orchestration.executors import node_process, remote
from orchestration.orchestrator import Orchestrator
from orchestration.providers.scripted import ScriptedModel
from tests.orchestration.scripts import make_repo
from toolbus.errors import LeaseLost


class _Refusing:
    """A link whose head refuses every request, as a head whose lease store says no."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, Any]] = []

    def call(self, kind: str, payload: Any = None) -> Any:
        self.asked.append((kind, payload))
        raise remote.LinkError("lease lost: src/app is held under token 9")

    async def acall(self, kind: str, payload: Any = None) -> Any:
        return self.call(kind, payload)

    def post(self, kind: str, payload: Any = None) -> None:
        self.asked.append((kind, payload))


def test_a_refused_fence_check_is_a_lost_lease() -> None:
    link = _Refusing()
    fence = remote.RemoteFence(link, token=3)
    with pytest.raises(LeaseLost, match="held under token 9"):
        fence.check("src/app/a.py")
    assert link.asked == [("check", "src/app/a.py")]


def test_without_a_lease_only_commands_pass_the_fence() -> None:
    fence = remote.RemoteFence(_Refusing(), token=None)
    fence.check(None)  # a read-only agent's command: its changes are dropped at the commit
    with pytest.raises(LeaseLost, match="no write lease"):
        fence.check("src/a.py")


def test_a_head_that_does_not_answer_is_a_lost_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over the node process's pipe, a request nobody answers times out: the fence check then
    refuses the write, so a worker cut off from the head stops writing."""
    monkeypatch.setattr(remote, "LINK_TIMEOUT_S", 0.2)
    ours, theirs = socket.socketpair()
    conn = Connection(ours.detach())
    try:
        pipe = node_process.Pipe(conn, lambda call: call())
        fence = remote.RemoteFence(node_process.PipeLink(pipe, "a1"), token=1)
        with pytest.raises(LeaseLost, match=r"did not answer within 0\.2 s"):
            fence.check("src/a.py")
        # the request did go out, in the order the agent sent it
        sent = Connection(theirs.detach())
        try:
            assert sent.recv() == ("call", 1, "a1", "check", "src/a.py")
        finally:
            sent.close()
    finally:
        conn.close()


def test_an_answer_reaches_the_request_it_answers() -> None:
    ours, theirs = socket.socketpair()
    conn = Connection(ours.detach())
    other = Connection(theirs.detach())
    try:
        pipe = node_process.Pipe(conn, lambda call: call())
        link = node_process.PipeLink(pipe, "a1")

        def head() -> None:
            _, rid, agent_id, kind, payload = other.recv()
            assert (agent_id, kind, payload) == ("a1", "reserve", 1000)
            pipe.resolve(rid, {"ok": True})

        thread = threading.Thread(target=head)
        thread.start()
        assert link.call("reserve", 1000) is True
        thread.join(5)
    finally:
        conn.close()
        other.close()


@pytest.mark.anyio
async def test_spawn_refuses_mcp_servers_for_agents_on_ray(tmp_path: Path) -> None:
    """Refused at spawn, before anything is made or any cluster is reached."""
    repo = make_repo(tmp_path / "repo")
    settings = Settings(repo=repo, sandbox="none", executor="ray", ray_address="127.0.0.1:9")
    async with Orchestrator(settings, lambda _name: ScriptedModel([])) as orch:
        with pytest.raises(InvalidRequest, match="ray executor get no downstream MCP servers"):
            await orch.spawn(
                SpawnRequest(tasks=[TaskSpec(prompt="T", write_scope=["src"])], mcp_servers=["db"])
            )
        ctx = await orch.context(repo)
        assert ctx.store.runs() == []
