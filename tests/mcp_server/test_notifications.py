"""Resource-update notifications when an agent's status changes, in each protocol era:
`subscriptions/listen` (2026-07-28) and `resources/subscribe` (handshake era)."""

from __future__ import annotations

import sqlite3
import warnings
from pathlib import Path

import anyio
import pytest
from mcp import Client
from mcp.client.session import IncomingMessage
from mcp.shared.subscriptions import ResourceUpdated
from mcp_types import ResourceUpdatedNotification

from mcp_server.demo import (
    demo_model_factory,
    make_sample_repo,
    structured,
)
from mcp_server.server import FanoutServer, build_server
from orchestration.config import Settings
from orchestration.state import Event, StateStore
from tests.mcp_server.servers import spawn_demo_settled

pytestmark = pytest.mark.anyio


def _server(repo: Path) -> FanoutServer:
    return build_server(Settings.from_env({}, repo=repo, sandbox="none"), demo_model_factory())


async def _finished_agent(client: Client) -> tuple[str, str]:
    """A run of one finished (succeeded, unmerged) agent: (run_id, agent_id)."""
    spawn = await spawn_demo_settled(client, "mathx")
    return str(spawn["run_id"]), str(spawn["agents"][0]["agent_id"])


async def test_listen_gets_resource_updates_2026(tmp_path: Path) -> None:
    async with Client(_server(make_sample_repo(tmp_path)), mode="auto") as client:
        run_id, agent_id = await _finished_agent(client)
        uri = f"fanout://agents/{agent_id}/result"
        async with client.listen(resource_subscriptions=[uri]) as sub:
            assert uri in (sub.honored.resource_subscriptions or [])
            merged = structured(await client.call_tool("merge_results", {"run_id": run_id}))
            assert merged["agents"][0]["outcome"] == "merged"  # the agent's status -> merged
            with anyio.fail_after(30):
                async for event in sub:
                    assert isinstance(event, ResourceUpdated)
                    if event.uri == uri:
                        break


async def test_resources_subscribe_gets_updates_legacy(tmp_path: Path) -> None:
    send, receive = anyio.create_memory_object_stream[str](100)

    async def on_message(message: IncomingMessage) -> None:
        if isinstance(message, ResourceUpdatedNotification):
            await send.send(str(message.params.uri))

    server = _server(make_sample_repo(tmp_path))
    async with send, receive, Client(server, mode="legacy", message_handler=on_message) as client:
        run_id, agent_id = await _finished_agent(client)
        uri = f"fanout://agents/{agent_id}/result"
        with warnings.catch_warnings():  # resources/subscribe is deprecated in the 2026 era
            warnings.simplefilter("ignore")
            await client.subscribe_resource(uri)  # pyright: ignore[reportDeprecated]
        merged = structured(await client.call_tool("merge_results", {"run_id": run_id}))
        assert merged["agents"][0]["outcome"] == "merged"  # the agent's status -> merged
        with anyio.fail_after(30):
            # Only the subscribed resource is announced to this session.
            assert await receive.receive() == uri
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            await client.unsubscribe_resource(uri)  # pyright: ignore[reportDeprecated]


async def test_a_failed_read_of_the_events_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watcher that announces updates reads the state's events as a task of the server's:
    a read that fails (the state busy, say) is logged and read again, and nothing is missed; the
    server goes on serving."""
    failed: list[int] = []
    events = StateStore.events

    def busy_once(store: StateStore, *, since: int = 0) -> list[Event]:
        if not failed:  # (the watcher is its only reader)
            failed.append(since)
            raise sqlite3.OperationalError("database is locked")
        return events(store, since=since)

    monkeypatch.setattr(StateStore, "events", busy_once)
    async with Client(_server(make_sample_repo(tmp_path)), mode="auto") as client:
        run_id, agent_id = await _finished_agent(client)
        uri = f"fanout://agents/{agent_id}/result"
        async with client.listen(resource_subscriptions=[uri]) as sub:
            merged = structured(await client.call_tool("merge_results", {"run_id": run_id}))
            assert merged["agents"][0]["outcome"] == "merged"
            with anyio.fail_after(30):
                async for event in sub:
                    if isinstance(event, ResourceUpdated) and event.uri == uri:
                        break
    assert failed
