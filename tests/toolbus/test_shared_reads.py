"""Shared read leases on downstream connections: readers of one process share one lease, which
is given back after they stop; writers, of this process or another, still get in."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import pytest

from toolbus.leases import (
    LeaseGrant,
    LeaseKeeper,
    LeaseManager,
    LeaseMode,
    LeaseRequest,
    LeaseStore,
)
from toolbus.shared_reads import SharedReadLeases

pytestmark = pytest.mark.anyio

NAME = "mcp:kv"


@dataclass
class _Setup:
    store: LeaseStore
    manager: LeaseManager
    reads: SharedReadLeases
    tg: anyio.abc.TaskGroup


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncGenerator[_Setup]:
    with LeaseStore(tmp_path) as store:
        manager = LeaseManager(store)
        keeper = LeaseKeeper(manager)
        async with anyio.create_task_group() as tg:
            reads = SharedReadLeases(
                manager, keeper, "srv:mcp-reads", tg.start_soon, linger_s=0.05, max_share_s=0.3
            )
            yield _Setup(store, manager, reads, tg)
            tg.cancel_scope.cancel()


def _holders(store: LeaseStore) -> list[str]:
    return [lease.holder for lease in store.table() if lease.resource == NAME]


async def test_overlapping_and_following_reads_share_one_lease(setup: _Setup) -> None:
    inside = anyio.Event()
    release = anyio.Event()
    tokens: list[list[int]] = []

    async def reader() -> None:
        async with setup.reads.read(NAME, "agent"):
            tokens.append([lease.token for lease in setup.store.table()])
            inside.set()
            await release.wait()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            tg.start_soon(reader)
            await inside.wait()
            await anyio.sleep(0.01)
            assert _holders(setup.store) == ["srv:mcp-reads"]  # one lease for both
            release.set()
        async with setup.reads.read(NAME, "agent"):  # within the linger: the same lease
            assert [lease.token for lease in setup.store.table()] == tokens[0]
        await anyio.sleep(setup.reads.linger_s * 4)  # idle for the linger: given back
        assert _holders(setup.store) == []


async def test_a_writer_of_this_process_gets_in_and_readers_queue_behind_it(
    setup: _Setup,
) -> None:
    order: list[str] = []
    reading = anyio.Event()
    done_reading = anyio.Event()

    async def long_reader() -> None:
        async with setup.reads.read(NAME, "agent-r"):
            order.append("read-start")
            reading.set()
            await done_reading.wait()
            order.append("read-end")

    async def writer() -> None:
        async with setup.reads.before_write(NAME):
            grant = await setup.manager.acquire("agent-w", [LeaseRequest.named(NAME)])
            order.append("write")
            await setup.manager.release(grant)

    async def late_reader() -> None:
        async with setup.reads.read(NAME, "agent-late"):
            order.append("late-read")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(long_reader)
            await reading.wait()
            tg.start_soon(writer)
            await anyio.sleep(0.05)  # the writer waits for the long read
            tg.start_soon(late_reader)
            await anyio.sleep(0.05)
            assert "late-read" not in order  # it did not join the shared lease past the writer
            done_reading.set()
    assert order == ["read-start", "read-end", "write", "late-read"]


async def test_another_processes_writer_is_not_starved_by_back_to_back_reads(
    setup: _Setup, tmp_path: Path
) -> None:
    with LeaseStore(tmp_path) as other_store:
        other = LeaseManager(other_store)
        stop = anyio.Event()
        waited = -1.0

        async def reads_forever() -> None:
            while not stop.is_set():
                async with setup.reads.read(NAME, "agent"):
                    await anyio.sleep(0.01)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(reads_forever)
                tg.start_soon(reads_forever)
                await anyio.sleep(0.05)
                started = anyio.current_time()
                grant = await other.acquire("elsewhere", [LeaseRequest.named(NAME)])
                waited = anyio.current_time() - started
                assert grant.leases[0].mode is LeaseMode.WRITE
                await other.release(grant)
                stop.set()
        assert 0.1 < waited < 0.3 + 0.5  # it waited for the share window, and no longer


async def test_close_gives_the_lease_back_at_once(setup: _Setup) -> None:
    async with setup.reads.read(NAME, "agent"):
        pass
    assert _holders(setup.store) == ["srv:mcp-reads"]
    setup.reads.close()
    assert _holders(setup.store) == []


async def test_a_give_back_the_lease_store_fails_leaves_the_server_serving(
    setup: _Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle shared lease is given back by a task of the server's: when the lease store fails
    that (busy, say), the failure is logged and the lease lapses at its TTL, unrenewed; the
    server's tasks go on, and the next read gets in."""
    failed: list[LeaseGrant] = []
    release = setup.manager.release

    async def busy_once(grant: LeaseGrant) -> None:
        if not failed:
            failed.append(grant)
            raise sqlite3.OperationalError("database is locked")
        await release(grant)

    monkeypatch.setattr(setup.manager, "release", busy_once)
    with anyio.fail_after(5):
        async with setup.reads.read(NAME, "agent"):
            pass
        await anyio.sleep(setup.reads.linger_s * 4)  # idle for the linger: the give-back fails
        assert len(failed) == 1
        async with setup.reads.read(NAME, "agent"):
            assert "srv:mcp-reads" in _holders(setup.store)
        await anyio.sleep(setup.reads.linger_s * 4)  # this one is given back
    assert [lease.token for lease in setup.store.table()] == [failed[0].token]
