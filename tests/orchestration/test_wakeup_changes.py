"""`Wakeups.changes` read as the cursor moves: only the events after the last read are queried,
and the answer is the same as a fresh read of everything after `since`."""

from __future__ import annotations

from pathlib import Path

from orchestration.state import EventKind, StateStore
from orchestration.wakeup import Wakeups
from toolbus.lease_store import Lease


async def _no_leases() -> list[Lease]:
    return []


def _wakeups(store: StateStore) -> Wakeups:
    return Wakeups(store, _no_leases, lambda _paths: [])


def test_changes_as_the_cursor_moves_match_a_fresh_read(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    wakeups = _wakeups(store)
    since = store.record_event("r1", "a1", EventKind.RUNNING, "")
    steps = [
        ("r1", "a2", EventKind.TURN),
        ("r2", "b1", EventKind.RUNNING),
        ("r1", "a1", EventKind.SUCCEEDED),
        ("r1", None, EventKind.RUN_CREATED),
        ("r2", "b1", EventKind.TURN),
    ]
    for run_id, agent_id, kind in steps:
        store.record_event(run_id, agent_id, kind, "")
        cursor = store.cursor()
        for run in (None, "r1", "r2"):
            got = wakeups.changes(since, run, cursor)
            fresh = _wakeups(store).changes(since, run, cursor)
            assert (got.agents, got.kinds) == (fresh.agents, fresh.kinds)
    # an earlier cursor, asked after a later one, is read whole
    early = _wakeups(store).changes(since, "r1", since + 1)
    assert wakeups.changes(since, "r1", since + 1) == early
    assert early.agents == {"a2"} and early.kinds == {"turn"}
    store.close()
