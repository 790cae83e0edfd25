"""The lease store against an in-memory reference model, driven by hypothesis' state machine."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from toolbus.errors import LeaseError, LeaseLost, LeaseNotHeld
from toolbus.lease_store import normalise_requests
from toolbus.leases import LeaseGrant, LeaseMode, LeaseRequest, LeaseStore, conflicts
from toolbus.resources import is_within

SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") else None
TTL = 30.0
DELAY = 5.0
HOLDERS = ("a", "b", "c")
PATHS = ("", "src", "src/a", "src/a/x.py", "src/ab", "docs")
NAMES = ("port:8000", "npm-cache")


def _path_request(path: str, mode: LeaseMode) -> LeaseRequest:
    return LeaseRequest(resource=path, mode=mode)


modes = st.sampled_from([LeaseMode.READ, LeaseMode.WRITE])
requests = st.one_of(
    st.builds(_path_request, st.sampled_from(PATHS), modes),
    st.builds(LeaseRequest.named, st.sampled_from(NAMES), modes),
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class RefGrant:
    """The reference model's view of one grant."""

    holder: str
    token: int
    requests: tuple[LeaseRequest, ...]
    expires_at: float
    blocks_until: float
    broken: bool = False
    gone: bool = False  # released while live: no trace left
    rows: bool = True  # its lease rows exist (a release of a lost grant clears them)

    def live(self, now: float) -> bool:
        return not self.gone and not self.broken and self.expires_at > now

    def blocking(self, now: float) -> bool:
        return not self.gone and self.rows and self.blocks_until > now


class LeaseStoreMachine(RuleBasedStateMachine):
    grants = Bundle("grants")

    def __init__(self) -> None:
        super().__init__()
        # tmpfs when there is one: each example creates a database, and its fsyncs add up
        self.dir = tempfile.mkdtemp(prefix="leases-", dir=SCRATCH)
        self.clock = Clock()
        self.store = LeaseStore(self.dir, ttl_s=TTL, lock_delay_s=DELAY, clock=self.clock)
        self.ref: dict[int, RefGrant] = {}
        self.last_token = 0

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def now(self) -> float:
        return self.clock.now

    @rule(
        target=grants,
        holder=st.sampled_from(HOLDERS),
        wanted=st.lists(requests, min_size=1, max_size=3),
    )
    def acquire(self, holder: str, wanted: list[LeaseRequest]) -> list[LeaseGrant]:
        normal = normalise_requests(wanted)
        blocking = [
            g
            for g in self.ref.values()
            if g.blocking(self.now) and any(conflicts(q, r) for q in normal for r in g.requests)
        ]
        own_live = [g for g in blocking if g.holder == holder and g.live(self.now)]
        if own_live:
            with pytest.raises(LeaseError, match="already holds"):
                self.store.try_acquire(holder, wanted)
            return []
        grant = self.store.try_acquire(holder, wanted)
        if blocking:
            assert grant is None
            return []
        assert grant is not None
        assert grant.token > self.last_token
        assert grant.expires_at == self.now + TTL
        assert grant.leases == normal
        self.last_token = grant.token
        self.ref[grant.token] = RefGrant(
            holder, grant.token, normal, grant.expires_at, grant.expires_at + DELAY
        )
        return [grant]

    @rule(grant_list=grants)
    def release(self, grant_list: list[LeaseGrant]) -> None:
        for grant in grant_list:
            ref = self.ref[grant.token]
            if ref.live(self.now):
                self.store.release(grant)
                ref.gone = True
            else:
                with pytest.raises(LeaseNotHeld):
                    self.store.release(grant)
                if not ref.gone:
                    ref.rows = False

    @rule(grant_list=grants)
    def renew(self, grant_list: list[LeaseGrant]) -> None:
        for grant in grant_list:
            ref = self.ref[grant.token]
            if ref.live(self.now):
                renewed = self.store.renew(grant)
                assert renewed.token == grant.token
                ref.expires_at = renewed.expires_at
                assert ref.expires_at == self.now + TTL
                ref.blocks_until = ref.expires_at + DELAY
            elif ref.gone:
                with pytest.raises(LeaseNotHeld):
                    self.store.renew(grant)
            else:
                with pytest.raises(LeaseLost):
                    self.store.renew(grant)

    @rule(seconds=st.sampled_from([0.5, 4.0, 5.0, 10.0, 20.0, 31.0]))
    def advance(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule(holder=st.sampled_from(HOLDERS), immediate=st.booleans())
    def break_holder(self, holder: str, immediate: bool) -> None:
        broken = self.store.break_holder(holder, immediate=immediate)
        until = self.now if immediate else self.now + DELAY
        expected: list[int] = []
        for ref in self.ref.values():
            if ref.holder != holder or ref.gone:
                continue
            if ref.live(self.now):
                ref.broken = True
                expected.append(ref.token)
            ref.blocks_until = min(ref.blocks_until, until)
        assert sorted(g.token for g in broken) == sorted(expected)

    @rule(
        grant_list=grants,
        path=st.one_of(st.none(), st.sampled_from(PATHS)),
        mode=modes,
        as_other=st.booleans(),
    )
    def check(
        self, grant_list: list[LeaseGrant], path: str | None, mode: LeaseMode, as_other: bool
    ) -> None:
        for grant in grant_list:
            ref = self.ref[grant.token]
            holder = "intruder" if as_other else grant.holder
            covered = path is None or any(
                r.kind == "path"
                and is_within(path, r.resource)
                and (mode == LeaseMode.READ or r.mode == LeaseMode.WRITE)
                for r in ref.requests
            )
            if ref.live(self.now) and covered and not as_other:
                self.store.check(holder, grant.token, path, mode)
            else:
                with pytest.raises(LeaseLost):
                    self.store.check(holder, grant.token, path, mode)

    @invariant()
    def table_is_the_live_leases(self) -> None:
        table = {(le.token, le.kind, le.resource, le.mode) for le in self.store.table()}
        expected = {
            (g.token, r.kind, r.resource, r.mode)
            for g in self.ref.values()
            if g.live(self.now)
            for r in g.requests
        }
        assert table == expected

    @invariant()
    def no_two_live_leases_conflict(self) -> None:
        table = self.store.table()
        for i, x in enumerate(table):
            for y in table[i + 1 :]:
                if x.token != y.token:
                    assert not conflicts(x.request, y.request), (x, y)

    @invariant()
    def lost_grants_are_recorded(self) -> None:
        lost = {(g.token, g.reason) for g in self.store.lost()}
        expected = {
            (g.token, "broken" if g.broken else "expired")
            for g in self.ref.values()
            if not g.gone and not g.live(self.now)
        }
        assert lost == expected


LeaseStoreMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=25, deadline=None
)
TestLeaseStore = LeaseStoreMachine.TestCase
