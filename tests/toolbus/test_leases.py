"""Lease rules: hierarchy, atomic sets, fairness, timeouts, fencing, expiry, lock-delay, keeper."""

from __future__ import annotations

import random
from collections.abc import AsyncGenerator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest
from pydantic import ValidationError

from toolbus.errors import (
    LeaseLost,
    LeaseNotHeld,
    LeaseSelfConflict,
    LeaseTimeout,
    PathEscape,
)
from toolbus.lease_store import earlier_conflicts
from toolbus.leases import (
    LeaseGrant,
    LeaseKeeper,
    LeaseManager,
    LeaseMode,
    LeaseRequest,
    LeaseStore,
    conflicts,
)

R = LeaseRequest.read
W = LeaseRequest.write

pytestmark = pytest.mark.anyio


class FakeClock:
    """An injectable clock that moves only when told."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Iterator[LeaseStore]:
    with LeaseStore(tmp_path, ttl_s=30.0, lock_delay_s=5.0, clock=clock) as s:
        yield s


@pytest.fixture
def manager(store: LeaseStore) -> LeaseManager:
    return LeaseManager(store, poll_interval_s=0.005)


def take(store: LeaseStore, holder: str, *requests: LeaseRequest) -> LeaseGrant:
    grant = store.try_acquire(holder, requests)
    assert grant is not None, f"{holder} should get {requests}"
    return grant


# -- the conflict rule -------------------------------------------------------------------------

CONFLICT_TABLE = [
    # (a, b, conflict?)
    (W("src/a"), W("src/a"), True),
    (W("src/a"), R("src/a"), True),
    (R("src/a"), R("src/a"), False),
    (W("src/a"), W("src/a/b.py"), True),
    (W("src/a"), R("src/a/b.py"), True),  # a write blocks everything below it
    (R("src/a"), W("src/a/b.py"), False),  # a read above does not block a write below
    (R("src/a"), R("src/a/b.py"), False),
    (W("src"), W("src/a/deep/x.py"), True),
    (W("src/a"), W("src/ab"), False),  # component-wise, not string prefix
    (W("src/a"), W("src/b"), False),
    (W(""), R("anything/at/all"), True),  # the root covers the repository
    (R(""), W("src"), False),
    (W(""), W(""), True),
    (LeaseRequest.named("port:8000"), LeaseRequest.named("port:8000"), True),
    (
        LeaseRequest.named("npm-cache", LeaseMode.READ),
        LeaseRequest.named("npm-cache", LeaseMode.READ),
        False,
    ),
    (LeaseRequest.named("npm-cache", LeaseMode.READ), LeaseRequest.named("npm-cache"), True),
    (LeaseRequest.named("port:8000"), LeaseRequest.named("port:8001"), False),
    (LeaseRequest.named("src"), W("src"), False),  # a name is not a path
    (LeaseRequest.named("x"), W(""), False),
]


@pytest.mark.parametrize(("a", "b", "expected"), CONFLICT_TABLE)
def test_conflict_rule_is_symmetric_and_hierarchical(
    a: LeaseRequest, b: LeaseRequest, expected: bool
) -> None:
    assert conflicts(a, b) is expected
    assert conflicts(b, a) is expected


@pytest.mark.parametrize(("a", "b", "expected"), CONFLICT_TABLE)
def test_store_applies_the_same_rule(
    store: LeaseStore, a: LeaseRequest, b: LeaseRequest, expected: bool
) -> None:
    take(store, "first", a)
    assert (store.try_acquire("second", [b]) is None) is expected


def test_paths_are_normalised_and_checked() -> None:
    assert W("./src/a/").resource == "src/a"
    assert W("src//a/./b/..").resource == "src/a"
    assert R(".").resource == ""
    with pytest.raises(PathEscape):
        W("../outside")
    with pytest.raises(PathEscape):
        W("/etc/passwd")
    assert LeaseRequest.named("  port:8000 ").resource == "port:8000"
    with pytest.raises(ValidationError):
        LeaseRequest.named("")


# -- atomic sets, tokens, renewal, release -----------------------------------------------------


def test_a_partly_blocked_set_takes_nothing(store: LeaseStore) -> None:
    take(store, "a", W("src/a"))
    before = store.table()
    assert store.try_acquire("b", [W("docs"), W("src/a/x.py"), LeaseRequest.named("p")]) is None
    assert store.table() == before
    # the free parts are still free for anyone
    take(store, "c", W("docs"), LeaseRequest.named("p"))


def test_tokens_strictly_increase_renewal_keeps_reacquire_renews(
    store: LeaseStore, clock: FakeClock
) -> None:
    g1 = take(store, "a", W("x"))
    g2 = take(store, "b", W("y"))
    assert g2.token > g1.token
    clock.advance(10)
    renewed = store.renew(g1)
    assert renewed.token == g1.token
    assert renewed.expires_at == clock.now + 30.0
    store.release(renewed)
    g3 = take(store, "a", W("x"))
    assert g3.token > g2.token
    store.check("a", g3.token, "x/file")
    with pytest.raises(LeaseLost):
        store.check("a", g1.token, "x/file")  # the released token no longer passes the fence


def test_release_of_what_is_not_held_raises(store: LeaseStore, clock: FakeClock) -> None:
    grant = take(store, "a", W("x"))
    with pytest.raises(LeaseNotHeld, match="holds no grant"):
        store.release(grant.model_copy(update={"holder": "b"}))
    with pytest.raises(LeaseNotHeld, match="holds no grant"):
        store.release(grant.model_copy(update={"token": grant.token + 100}))
    store.release(grant)
    with pytest.raises(LeaseNotHeld, match="already released"):
        store.release(grant)
    expired = take(store, "a", W("y"))
    clock.advance(31)
    with pytest.raises(LeaseNotHeld, match="expired"):
        store.release(expired)
    with pytest.raises(LeaseNotHeld):
        store.renew(grant)


def test_check_covers_paths_by_prefix_and_mode(store: LeaseStore) -> None:
    grant = take(store, "a", W("src/a"), R("docs"), LeaseRequest.named("port:1"))
    store.check("a", grant.token, "src/a")
    store.check("a", grant.token, "src/a/b/c.py")
    store.check("a", grant.token, "./src/a/b/../c.py")
    store.check("a", grant.token, "src/a/x", LeaseMode.READ)  # a write covers reads
    store.check("a", grant.token, "docs/readme.md", LeaseMode.READ)
    store.check("a", grant.token, None)
    with pytest.raises(LeaseLost, match="covers only"):
        store.check("a", grant.token, "docs/readme.md")  # read lease, write check
    with pytest.raises(LeaseLost, match="covers only"):
        store.check("a", grant.token, "src/ab")
    with pytest.raises(LeaseLost, match="covers only"):
        store.check("a", grant.token, "port:1")  # named resources are not paths
    with pytest.raises(LeaseLost, match="holds no lease"):
        store.check("b", grant.token, "src/a/x")
    with pytest.raises(LeaseLost, match="holds no lease"):
        store.check("b", grant.token, None)


def test_a_request_conflicting_with_its_own_lease_fails_fast(store: LeaseStore) -> None:
    take(store, "a", R("src"))
    with pytest.raises(LeaseSelfConflict, match="not upgraded in place") as info:
        store.try_acquire("a", [W("src")])
    assert not isinstance(info.value, LeaseTimeout)
    take(store, "a", R("src/x"))  # a non-conflicting second grant is fine


async def test_manager_self_conflict_does_not_wait(manager: LeaseManager) -> None:
    await manager.acquire("a", [W("src")])
    with anyio.fail_after(5), pytest.raises(LeaseSelfConflict, match="already holds"):
        await manager.acquire("a", [R("src/a")])
    assert await manager.waiters() == []


# -- expiry, lock-delay, breaking ----------------------------------------------------------------


def test_expiry_is_lost_at_once_and_regranted_after_lock_delay(
    store: LeaseStore, clock: FakeClock
) -> None:
    grant = take(store, "a", W("src"))
    clock.advance(29.9)
    store.check("a", grant.token, "src/x")
    clock.advance(0.1)  # at expires_at the lease is lost to its holder
    with pytest.raises(LeaseLost, match="expired"):
        store.check("a", grant.token, "src/x")
    with pytest.raises(LeaseLost, match="expired"):
        store.renew(grant)
    assert store.table() == []
    (lost,) = store.lost("a")
    assert (lost.token, lost.reason) == (grant.token, "expired")
    # ...but nobody else gets it during the lock-delay
    assert store.try_acquire("b", [W("src/y")]) is None
    blocking = store.blockers([W("src/y")]).leases
    assert [lease.token for lease in blocking] == [grant.token]
    clock.advance(4.9)
    assert store.try_acquire("b", [W("src/y")]) is None
    clock.advance(0.1)
    later = take(store, "b", W("src/y"))
    assert later.token > grant.token


def test_its_holder_retakes_a_lapsed_grant_during_its_own_lock_delay(
    store: LeaseStore, clock: FakeClock
) -> None:
    """A server taking over a dead server's agent: the agent's grant lapsed unrenewed, and its
    own lock-delay must not count as somebody else holding its paths."""
    grant = take(store, "a", W("src"))
    clock.advance(31)  # expired, still in its lock-delay
    assert store.try_acquire("a", [W("src")]) is None
    waiter = store.enqueue("b", [W("src/y")])  # queued behind the lapsed grant
    again = store.retake("a", grant.token, [W("src")])
    assert again is not None and again.token > grant.token
    store.check("a", again.token, "src/x")
    assert [lease.token for lease in store.table()] == [again.token]
    assert store.try_acquire("b", [W("src/y")], waiter_id=waiter) is None
    # a grant still live is given back as it is
    assert store.retake("a", again.token, [W("src")]) == again


def test_retake_is_refused_when_another_holder_blocks_or_the_grant_was_broken(
    store: LeaseStore, clock: FakeClock
) -> None:
    lapsed = take(store, "a", W("src/a"))
    other = take(store, "b", W("src/b"))
    clock.advance(20)
    other = store.renew(other)
    clock.advance(11)  # a's grant lapsed; b's is live and overlaps what a asks now
    assert store.retake("a", lapsed.token, [W("src")]) is None
    # past the lock-delay, an earlier waiter of another holder goes first, as for anyone
    clock.advance(5)
    store.release(other)
    store.enqueue("c", [W("src/a")])
    assert store.retake("a", lapsed.token, [W("src/a")]) is None
    # a broken grant is lost for good: its lock-delay blocks its holder too
    broken = take(store, "d", W("docs"))
    store.break_holder("d")
    assert store.retake("d", broken.token, [W("docs")]) is None
    # and another holder cannot retake what was not its grant
    mine = take(store, "e", W("lib"))
    clock.advance(31)
    assert store.retake("f", mine.token, [W("lib")]) is None


def test_renewal_keeps_a_lease_past_its_first_ttl(store: LeaseStore, clock: FakeClock) -> None:
    grant = take(store, "a", W("src"))
    for _ in range(5):
        clock.advance(20)
        grant = store.renew(grant)
    store.check("a", grant.token, "src/x")
    assert store.try_acquire("b", [W("src")]) is None


def test_break_holder_loses_now_and_regrants_after_lock_delay(
    store: LeaseStore, clock: FakeClock
) -> None:
    g1 = take(store, "a", W("src"))
    g2 = take(store, "a", LeaseRequest.named("port:8000"))
    other = take(store, "b", W("docs"))
    broken = store.break_holder("a")
    assert sorted(g.token for g in broken) == [g1.token, g2.token]
    with pytest.raises(LeaseLost, match="broken"):
        store.check("a", g1.token, "src/x")
    assert {lease.holder for lease in store.table()} == {"b"}
    assert [lost.reason for lost in store.lost("a")] == ["broken", "broken"]
    store.check("b", other.token, "docs/x")
    assert store.try_acquire("c", [W("src")]) is None
    clock.advance(5)
    take(store, "c", W("src"))
    with pytest.raises(LeaseNotHeld, match="broken"):
        store.release(g1)


def test_break_holder_immediate_regrants_at_once(store: LeaseStore) -> None:
    take(store, "a", W("src"))
    store.break_holder("a", immediate=True)
    take(store, "c", W("src"))
    assert store.break_holder("nobody") == []


def test_conflict_detection_with_many_live_leases(store: LeaseStore) -> None:
    for i in range(1_000):
        take(store, f"agent-{i}", W(f"pkg/m{i:04d}"), R("shared"))
    assert store.try_acquire("x", [W("pkg/m0500/deep.py")]) is None
    assert store.try_acquire("x", [W("shared")]) is None
    take(store, "x", W("pkg/m1000"), R("shared/sub"))
    blockers = store.blockers([W("pkg")]).leases
    assert len(blockers) == 1_001


# -- the manager: waiting, fairness, timeout, cancellation ---------------------------------------


async def test_waiter_is_woken_by_a_release_in_this_process(store: LeaseStore) -> None:
    manager = LeaseManager(store, poll_interval_s=1.0)  # a release must not wait for a poll
    held = await manager.acquire("a", [W("src")])
    queued = anyio.Event()
    got: list[LeaseGrant] = []

    async def wanting() -> None:
        got.append(await manager.acquire("b", [W("src/x")], on_wait=queued.set))

    async with anyio.create_task_group() as tg:
        tg.start_soon(wanting)
        with anyio.fail_after(5):
            await queued.wait()
        with anyio.fail_after(0.5):
            await manager.release(held)
    assert got[0].token > held.token


async def test_a_writer_is_not_starved_by_a_stream_of_readers(manager: LeaseManager) -> None:
    order: list[str] = []
    first_reader = await manager.acquire("r0", [R("src")])
    writer_queued = anyio.Event()

    async def writer() -> None:
        grant = await manager.acquire("w", [W("src")], on_wait=writer_queued.set)
        order.append("w")
        await manager.release(grant)

    async def reader(name: str, queued: anyio.Event) -> None:
        grant = await manager.acquire(name, [R("src/file")], on_wait=queued.set)
        order.append(name)
        await manager.release(grant)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer)
            await writer_queued.wait()
            # new readers would be compatible with r0, but must queue behind the writer
            for i in range(1, 4):
                queued = anyio.Event()
                tg.start_soon(reader, f"r{i}", queued)
                await queued.wait()
            assert order == []
            await manager.release(first_reader)
    assert order[0] == "w"
    assert sorted(order[1:]) == ["r1", "r2", "r3"]


async def test_timeout_names_the_blockers_and_leaves_the_queue(manager: LeaseManager) -> None:
    await manager.acquire("agent-7", [W("src/core")])
    with anyio.fail_after(5), pytest.raises(LeaseTimeout) as info:
        await manager.acquire("agent-9", [W("src")], timeout_s=0.05)
    message = str(info.value)
    assert "agent-7" in message
    assert "src/core" in message
    assert await manager.waiters() == []
    blockers = await manager.blockers([W("src")])
    assert [lease.holder for lease in blockers] == ["agent-7"]


async def test_cancellation_removes_the_waiter(manager: LeaseManager) -> None:
    await manager.acquire("a", [W("src")])
    queued = anyio.Event()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:

            async def wanting() -> None:
                await manager.acquire("b", [W("src")], on_wait=queued.set)

            tg.start_soon(wanting)
            await queued.wait()
            assert [w.holder for w in await manager.waiters()] == ["b"]
            tg.cancel_scope.cancel()
    assert await manager.waiters() == []
    # nothing queued is left to block a newcomer behind the cancelled waiter
    await manager.acquire("c", [R("docs")], timeout_s=0)


async def test_a_dead_processes_waiter_row_stops_blocking(
    tmp_path: Path, store: LeaseStore, clock: FakeClock
) -> None:
    holder = take(store, "a", R("src"))
    with LeaseStore(tmp_path, clock=clock, waiter_ttl_s=2.0) as elsewhere:
        elsewhere.enqueue("dead-writer", [W("src")])  # never heartbeats again
    assert store.try_acquire("reader", [R("src/x")]) is None  # queued behind the writer
    clock.advance(2.0)
    take(store, "reader", R("src/x"))
    store.release(holder)


# -- the keeper ----------------------------------------------------------------------------------


@asynccontextmanager
async def keeping(manager: LeaseManager, grant: LeaseGrant) -> AsyncGenerator[KeptGrant]:
    """A running keeper that tracks `grant`, and the losses it reports (stopped on exit)."""
    kept = KeptGrant(LeaseKeeper(manager, interval_s=0.001))
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(kept.keeper.run)
            kept.keeper.track(grant, kept.lost.append)
            yield kept
            tg.cancel_scope.cancel()


@dataclass
class KeptGrant:
    keeper: LeaseKeeper
    lost: list[LeaseLost] = field(default_factory=list[LeaseLost])


async def test_keeper_keeps_a_lease_alive_past_its_ttl(
    manager: LeaseManager, clock: FakeClock
) -> None:
    grant = await manager.acquire("a", [W("src")])
    async with keeping(manager, grant) as kept:
        for _ in range(4):
            clock.advance(20)  # 80 s in all: well past the 30 s TTL
            await kept.keeper.next_round()
            manager.check("a", grant.token, "src/x")
        current = kept.keeper.current(grant)
        assert current is not None
        assert current.token == grant.token
        assert current.expires_at == clock.now + 30
    assert kept.lost == []


async def test_keeper_reports_a_broken_grant_once(manager: LeaseManager) -> None:
    grant = await manager.acquire("a", [W("src")])
    async with keeping(manager, grant) as kept:
        await manager.break_holder("a")
        await kept.keeper.next_round()
        await kept.keeper.next_round()
    keeper, lost = kept.keeper, kept.lost
    assert len(lost) == 1
    assert "broken" in str(lost[0])
    assert keeper.current(grant) is None
    with pytest.raises(LeaseLost):
        manager.check("a", grant.token, "src/x")
    assert [g.token for g in await manager.lost("a")] == [grant.token]


async def test_keeper_reports_an_expired_grant(manager: LeaseManager, clock: FakeClock) -> None:
    grant = await manager.acquire("a", [W("src")])
    keeper = LeaseKeeper(manager, interval_s=0.001)
    lost: list[LeaseLost] = []
    keeper.track(grant, lost.append)
    clock.advance(31)  # the holder stalled past its TTL: renewal must not resurrect it
    await keeper.renew_all()
    assert len(lost) == 1
    assert "expired" in str(lost[0])
    keeper.untrack(grant)
    assert keeper.current(grant) is None


def test_a_holder_asking_for_more_is_not_queued_behind_its_own_waiter(store: LeaseStore) -> None:
    """Hold read `src`, a writer queues for `src`, then ask for read `src/x`: no deadlock."""
    held = take(store, "a", R("src"))
    writer = store.enqueue("b", [W("src")])
    more = store.try_acquire("a", [R("src/x")])
    assert more is not None  # the queued writer waits for `a` anyway
    # a newcomer without leases still queues fairly behind the writer
    assert store.try_acquire("c", [R("src/y")]) is None
    store.release(more)
    store.release(held)
    assert store.try_acquire("b", [W("src")], waiter_id=writer) is not None


def test_earlier_conflicts_matches_the_pairwise_rule() -> None:
    """Every earlier set that `conflicts` pairs with, and no other: names that sort next to a
    path's descendants ("a/b0", "a/b-", "a.b") and the whole repository ("") included."""
    rng = random.Random(7)
    paths = ["", "a", "b", "a/b", "a/b/c", "a/bc", "a/b0", "a/b-", "a.b", "b/a", "a/b/c/d"]
    for _ in range(2000):
        sets: list[list[LeaseRequest]] = []
        for _ in range(rng.randint(1, 8)):
            requests: list[LeaseRequest] = []
            for _ in range(rng.randint(0, 3)):
                mode = rng.choice([LeaseMode.READ, LeaseMode.WRITE])
                if rng.random() < 0.2:
                    name = rng.choice(["db", "port"])
                    requests.append(LeaseRequest(resource=name, mode=mode, kind="named"))
                else:
                    requests.append(LeaseRequest(resource=rng.choice(paths), mode=mode))
            sets.append(requests)
        pairwise = [
            [j for j in range(i) if any(conflicts(a, b) for a in sets[i] for b in sets[j])]
            for i in range(len(sets))
        ]
        assert earlier_conflicts(sets) == pairwise, sets


def test_earlier_conflicts_of_many_disjoint_scopes() -> None:
    sets = [[W(f"work/a{i}/p{k}") for k in range(64)] for i in range(64)]
    sets.append([W("work/a3/p9/deep"), LeaseRequest.read("work")])
    assert earlier_conflicts(sets) == [[] for _ in range(64)] + [[3]]
