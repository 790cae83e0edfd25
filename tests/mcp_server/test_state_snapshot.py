"""`StateStore.agents_snapshot`, the read-only query a status poll can use: the same records as
`agents`, re-parsing only rows that changed (and written by another store too)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestration.contracts import AgentStatus
from orchestration.state import AgentRecord, EventKind, StateStore
from tests.orchestration.test_state import _agent, _run  # pyright: ignore[reportPrivateUsage]

Stores = tuple[StateStore, StateStore]


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[Stores]:
    """Two stores on one state dir, as two server processes have them."""
    store, other = StateStore(tmp_path), StateStore(tmp_path)
    try:
        yield store, other
    finally:
        store.close()
        other.close()


def test_snapshot_matches_agents_and_reparses_only_changes(
    stores: Stores,
) -> None:
    store, other = stores  # the other: another server process on the same repository
    store.create_run(_run("r1"), [_agent(f"a{i}", "r1", i) for i in range(1, 4)])
    store.create_run(_run("r2"), [_agent("b1", "r2", 1)])
    first = store.agents_snapshot("r1")
    assert first == store.agents("r1")
    assert [a.agent_id for a in first] == ["a1", "a2", "a3"]

    other.apply("a2", EventKind.RUNNING, status=AgentStatus.RUNNING, turns=1)
    second = store.agents_snapshot("r1")
    assert second == store.agents("r1")
    assert second[1].status is AgentStatus.RUNNING and second[1].turns == 1
    assert second[0] is first[0] and second[2] is first[2]  # unchanged rows: not re-parsed
    assert second[1] is not first[1]

    other.add_agent(_agent("a4", "r1", 4))
    assert [a.agent_id for a in store.agents_snapshot("r1")] == ["a1", "a2", "a3", "a4"]
    assert [a.agent_id for a in store.agents_snapshot("r2")] == ["b1"]
    assert store.agents_snapshot("r-none") == []


def test_the_creating_store_parses_no_row_of_the_agents_it_stored(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store that created a run keeps the records it stored: their first reads, and the
    run's first snapshot, parse no JSON and give those records; another store's write is
    still read (parsed) from the database."""
    store, other = stores
    agents = [_agent(f"a{i}", "r1", i) for i in range(1, 4)]
    store.create_run(_run("r1"), agents)
    parsed: list[str] = []
    validate = AgentRecord.model_validate_json

    def counted(text: str | bytes) -> AgentRecord:
        parsed.append(str(text))
        return validate(text)

    monkeypatch.setattr(AgentRecord, "model_validate_json", counted)
    assert store.agent("a2") is agents[1]
    assert store.agents_snapshot("r1") == agents
    assert all(a is b for a, b in zip(store.agents_snapshot("r1"), agents, strict=True))
    assert parsed == []
    other.apply("a2", EventKind.RUNNING, status=AgentStatus.RUNNING, turns=1)
    parsed.clear()  # (the other store read the row it changed)
    changed = store.agent("a2")
    assert changed is not None and changed.status is AgentStatus.RUNNING and changed.turns == 1
    assert len(parsed) == 1
    snapshot = store.agents_snapshot("r1")
    assert snapshot == store.agents("r1") and snapshot[1].turns == 1
    assert snapshot[0] is agents[0] and snapshot[2] is agents[2]


def test_snapshot_reads_no_rows_while_no_event_was_recorded(
    stores: Stores,
) -> None:
    store, other = stores
    statements: list[str] = []
    store.create_run(_run("r1"), [_agent(f"a{i}", "r1", i) for i in range(1, 3)])
    first = store.agents_snapshot("r1")
    store._db.set_trace_callback(statements.append)  # pyright: ignore[reportPrivateUsage]
    again = store.agents_snapshot("r1")
    assert again == first and again[0] is first[0]
    assert not [s for s in statements if "FROM agents" in s]

    # any change of an agent records an event in the same transaction: rows are read again
    other.apply("a1", EventKind.RUNNING, status=AgentStatus.RUNNING, turns=2)
    changed = store.agents_snapshot("r1")
    assert [s for s in statements if "FROM agents" in s]
    assert changed[0].status is AgentStatus.RUNNING and changed[0].turns == 2
    assert changed[1] is first[1]
    changed.clear()  # a caller's list is its own
    assert len(store.agents_snapshot("r1")) == 2


def test_runs_snapshot_matches_runs_and_reads_rows_only_after_an_event(
    stores: Stores,
) -> None:
    store, other = stores
    statements: list[str] = []
    assert store.runs_snapshot() == [] and store.runs_snapshot("r1") == []
    store.create_run(_run("r1"), [_agent("a1", "r1", 1)])
    first = store.runs_snapshot()
    assert first == store.runs() and store.runs_snapshot("r1") == first
    assert store.runs_snapshot("r-none") == []
    store._db.set_trace_callback(statements.append)  # pyright: ignore[reportPrivateUsage]
    again = store.runs_snapshot()
    assert again == first and again[0] is first[0]
    assert store.runs_snapshot("r1")[0] is first[0]
    assert not [s for s in statements if "FROM runs" in s]

    # a run created by another process records an event: rows are read, old ones not
    # parsed again
    other.create_run(_run("r2").model_copy(update={"created_at": 2.0}), [_agent("b1", "r2")])
    both = store.runs_snapshot()
    assert [s for s in statements if "FROM runs" in s]
    assert both == store.runs() and [r.run_id for r in both] == ["r1", "r2"]
    assert both[0] is first[0]
    assert store.runs_snapshot("r2")[0] is both[1]
    both.clear()  # a caller's list is its own
    assert len(store.runs_snapshot()) == 2


def test_snapshot_of_a_large_run_reads_only_the_rows_that_changed(
    stores: Stores,
) -> None:
    store, other = stores
    store.create_run(_run("r1"), [_agent(f"a{i}", "r1", 2 * i) for i in range(1, 41)])
    store.create_run(_run("r2"), [_agent("b1", "r2", 1)])
    assert store.agents_snapshot("r1") == store.agents("r1")
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)  # pyright: ignore[reportPrivateUsage]
    rng = random.Random(7)
    for step in range(60):
        writer = store if step % 3 else other
        names = rng.sample(range(1, 41), rng.choice((1, 1, 2, 3)))
        for n in names:
            writer.apply(f"a{n}", EventKind.TURN, turns=step + 1)
        other.apply("b1", EventKind.TURN, turns=step + 1)  # another run's change
        if step == 20:  # an agent added by another process, between two others
            other.add_agent(_agent("a-late", "r1", 7))
        cursor = store.cursor()
        if step == 30:  # committed after the cursor was read: this snapshot or the next
            other.apply("a5", EventKind.TURN, turns=1000)
        statements.clear()
        snapshot = store.agents_snapshot("r1", cursor)
        rows_read = [s for s in statements if "FROM agents" in s]
        assert len(rows_read) == 1 and " IN (" in rows_read[0], rows_read
        if step != 30:
            assert snapshot == store.agents("r1"), step
    assert store.agents_snapshot("r1") == store.agents("r1")
    assert [a.agent_id for a in store.agents_snapshot("r1")][3] == "a-late"


def test_snapshot_reads_every_row_again_when_most_changed(stores: Stores) -> None:
    store, other = stores
    store.create_run(_run("r1"), [_agent(f"a{i}", "r1", i) for i in range(1, 201)])
    first = store.agents_snapshot("r1")
    for i in range(1, 151):
        other.apply(f"a{i}", EventKind.TURN, turns=1)
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)  # pyright: ignore[reportPrivateUsage]
    again = store.agents_snapshot("r1")
    assert again == store.agents("r1") and again[199] is first[199]
    assert [s for s in statements if "FROM agents WHERE run_id" in s]


def test_a_run_without_events_keeps_its_snapshot_from_cursor_to_cursor(stores: Stores) -> None:
    store, other = stores
    store.create_run(_run("quiet"), [_agent(f"q{i}", "quiet", i) for i in range(1, 4)])
    store.create_run(_run("busy"), [_agent("b1", "busy", 1)])
    first = store.agents_snapshot("quiet", store.cursor())
    runs = store.runs_snapshot(None, store.cursor())
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)  # pyright: ignore[reportPrivateUsage]
    for turn in range(1, 6):  # another run's events, by this process and by another one
        (store if turn % 2 else other).apply("b1", EventKind.TURN, turns=turn)
        cursor = store.cursor()
        again = store.agents_snapshot("quiet", cursor)
        assert again == first and all(a is b for a, b in zip(again, first, strict=True))
        assert store.runs_snapshot(None, cursor)[0] is runs[0]
        assert store.agents_snapshot("busy", cursor)[0].turns == turn
    # one query per new cursor finds the runs that changed; the quiet run's rows are not read,
    # nor its events, nor any run's row
    assert not [s for s in statements if "FROM agents" in s and "quiet" in s]
    assert not [s for s in statements if "run_id = 'quiet'" in s]
    assert not [s for s in statements if "data FROM runs" in s]
    assert store.last_change("busy", store.cursor()) == store.cursor()

    # the quiet run's own change, by another process, shows at the next cursor
    other.apply("q2", EventKind.NOTE, status_reason="woken")
    cursor = store.cursor()
    assert store.last_change("quiet", cursor) == cursor
    woken = store.agents_snapshot("quiet", cursor)
    assert woken == store.agents("quiet") and woken[1].status_reason == "woken"
    assert woken[0] is first[0] and woken[1] is not first[1]
    # a run added by another process shows too
    other.create_run(_run("late").model_copy(update={"created_at": 3.0}), [_agent("l1", "late")])
    assert [r.run_id for r in store.runs_snapshot(None, store.cursor())] == [
        "quiet",
        "busy",
        "late",
    ]


def test_last_change_is_each_runs_newest_event_and_unknown_before_what_was_read(
    stores: Stores,
) -> None:
    store, other = stores
    assert store.last_change("none", store.cursor()) == 0
    store.create_run(_run("r1"), [_agent("a1", "r1", 1)])
    created = store.cursor()
    other.create_run(_run("r2"), [_agent("b1", "r2", 1)])
    other.apply("b1", EventKind.TURN, turns=1)
    assert store.last_change("r1", store.cursor()) == created
    assert store.last_change("r2", store.cursor()) == store.cursor() > created
    # asked at an older cursor than one already read: known for a run with nothing newer,
    # unknown for one whose newest event is after it
    assert store.last_change("r1", created) == created
    assert store.last_change("r2", created) is None
    # the older cursor's snapshot is read from the run's own events then, and is right
    assert store.agents_snapshot("r2", created) == store.agents("r2")
    assert store.last_change("none", store.cursor()) == 0


def test_an_agent_or_run_read_again_is_parsed_only_when_its_row_changed(stores: Stores) -> None:
    store, other = stores
    assert store.run("r1") is None and store.agent("a1") is None
    store.create_run(_run("r1"), [_agent("a1", "r1", 1)])
    run, agent = store.run("r1"), store.agent("a1")
    assert run is not None and agent is not None
    assert store.run("r1") is run and store.agent("a1") is agent
    assert store.runs_snapshot("r1")[0] is run  # (one parse of the run, shared)

    other.apply("a1", EventKind.NOTE, status_reason="by the other server")
    changed = store.agent("a1")
    assert changed is not agent and changed == other.agent("a1")
    assert changed is not None and changed.status_reason == "by the other server"
    assert store.agent("a1") is changed
    assert store.apply("a1", EventKind.NOTE, status_reason="here").status_reason == "here"
    mine = store.agent("a1")
    assert mine is not None and mine.status_reason == "here" and mine == other.agent("a1")
