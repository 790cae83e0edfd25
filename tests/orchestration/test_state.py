"""The durable state store: runs, agents, events, the shared budget, across processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from pydantic import ValidationError

from orchestration.contracts import AgentStatus, Approval, ResourceSpec, TokenUsage
from orchestration.state import (
    AgentRecord,
    EventKind,
    RunRecord,
    SharedSnapshot,
    StateStore,
    pid_running,
)
from tests.orchestration.scripts import add_server


def _run(run_id: str = "r1", budget: int = 10_000) -> RunRecord:
    return RunRecord(
        run_id=run_id,
        repo="/repo",
        created_at=1.0,
        base_commit="abc",
        head_commit="abc",
        branch_ref="refs/heads/main",
        snapshot_dirty=False,
        shared=SharedSnapshot(base_commit="abc"),
        max_concurrency=2,
        budget_tokens=budget,
        model="m",
        owner="me",
    )


def _agent(agent_id: str, run_id: str = "r1", index: int = 1) -> AgentRecord:
    return AgentRecord(
        agent_id=agent_id,
        run_id=run_id,
        index=index,
        name=agent_id,
        prompt="p",
        write_scope=None,
        model="m",
        max_turns=3,
        base_commit="abc",
        owner="me",
    )


def test_run_and_agents_round_trip_and_survive_reopen(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.create_run(_run(), [_agent("a1"), _agent("a2", index=2)])
    store.apply("a1", EventKind.RUNNING, status=AgentStatus.RUNNING, turns=2)
    store.close()
    again = StateStore(tmp_path)
    assert [r.run_id for r in again.runs()] == ["r1"]
    agents = again.agents("r1")
    assert [(a.agent_id, a.status, a.turns) for a in agents] == [
        ("a1", AgentStatus.RUNNING, 2),
        ("a2", AgentStatus.QUEUED, 0),
    ]
    again.close()


def test_the_latest_runs_and_the_agent_ids_read_no_other_records(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    # equal creation times (as two runs of one second may have): insertion order decides
    for n, created in enumerate([3.0, 1.0, 2.0, 2.0, 5.0]):
        run = _run(f"r{n}").model_copy(update={"created_at": created})
        store.create_run(run, [_agent(f"r{n}-a1", f"r{n}")])
    every = [r.run_id for r in store.runs()]
    assert every == ["r1", "r2", "r3", "r0", "r4"]
    for count in range(7):
        assert [r.run_id for r in store.latest_runs(count)] == every[max(0, len(every) - count) :]
    assert store.agent_ids() == {f"r{n}-a1" for n in range(5)}
    store.close()


def test_finish_order_is_recorded_once(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.create_run(_run(), [_agent("a1"), _agent("a2", index=2)])
    store.apply("a2", EventKind.RUNNING, status=AgentStatus.RUNNING)
    store.apply("a1", EventKind.RUNNING, status=AgentStatus.RUNNING)
    second = store.apply("a2", EventKind.SUCCEEDED, status=AgentStatus.SUCCEEDED)
    first = store.apply("a1", EventKind.SUCCEEDED, status=AgentStatus.SUCCEEDED)
    assert second.finish_seq is not None and first.finish_seq is not None
    assert second.finish_seq < first.finish_seq
    merged = store.apply("a2", EventKind.MERGED, status=AgentStatus.MERGED)
    assert merged.finish_seq == second.finish_seq
    store.close()


def test_budget_reservations_never_exceed_the_pool(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.create_run(_run(budget=1_000), [])
    assert store.reserve_budget("r1", 600)
    assert not store.reserve_budget("r1", 500)
    store.settle_budget("r1", 600, 300)
    assert store.budget("r1") == (1_000, 300, 0)
    assert store.reserve_budget("r1", 700)
    assert not store.reserve_budget("r1", 1)
    store.close()


@pytest.mark.anyio
async def test_long_poll_wakes_on_a_change_and_times_out_without_one(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.create_run(_run(), [_agent("a1")])
    cursor = store.cursor()
    assert not await store.wait_for_change(cursor, 0.05)

    async def change() -> None:
        await anyio.lowlevel.checkpoint()
        store.apply("a1", EventKind.RUNNING, status=AgentStatus.RUNNING)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(change)
            assert await store.wait_for_change(cursor, 30)
    assert store.cursor() > cursor
    store.close()


SCRIPT = """
import sys
import time
from orchestration.state import StateStore
store = StateStore(__import__("pathlib").Path(sys.argv[1]))
ok = sum(store.reserve_budget("r1", 10) for _ in range(200))
print(ok)
"""


def test_budget_is_shared_across_processes(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.create_run(_run(budget=3_000), [])
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(tmp_path)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        for _ in range(3)
    ]
    granted = sum(int((p.communicate(timeout=60)[0] or "0").strip()) for p in procs)
    assert granted == 300  # 3,000 tokens in reservations of 10, never more
    assert store.budget("r1") == (3_000, 0, 3_000)
    store.close()


def test_claim_agent_takes_it_once_and_only_in_the_statuses_asked(tmp_path: Path) -> None:
    first, second = StateStore(tmp_path), StateStore(tmp_path)
    first.create_run(_run(), [_agent("a1"), _agent("a2", index=2)])
    first.apply("a1", EventKind.SUCCEEDED, status=AgentStatus.SUCCEEDED)
    first.apply("a2", EventKind.MERGED, status=AgentStatus.MERGED)
    cursor = first.cursor()
    finished = (AgentStatus.SUCCEEDED,)

    claimed = second.claim_agent("a1", "me", finished)
    assert claimed is not None and claimed.owner == second.server_id
    # the other store, still reading "me" as the owner, cannot take it as well
    assert first.claim_agent("a1", "me", finished) is None
    assert first.agent("a1") == claimed
    # a merged agent, an unknown one: nothing to claim, nothing written
    assert second.claim_agent("a2", "me", finished) is None
    assert second.claim_agent("nope", "me", finished) is None
    assert [e.kind for e in first.events(since=cursor)] == ["claimed"]
    first.close()
    second.close()


OPEN_SCRIPT = """
import sys, time
from pathlib import Path
from orchestration.state import StateStore
start, dirs = float(sys.argv[1]), sys.argv[2:]
failed = 0
for i, d in enumerate(dirs):
    at = start + 0.05 * i
    while time.time() < at:
        pass
    try:
        StateStore(Path(d)).close()
    except Exception as exc:
        failed += 1
        print(d, repr(exc), file=sys.stderr)
print(failed)
"""


def test_processes_opening_a_new_store_at_the_same_moment_all_succeed(tmp_path: Path) -> None:
    """Two servers started together on one repository both create the store: SQLite refused one
    of them at once ("database is locked") before the store's creation was serialized."""
    dirs = [str(tmp_path / f"s{i}") for i in range(30)]
    start = time.time() + 2.0  # after the interpreters have started
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_SCRIPT, str(start), *dirs],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert [int(out.strip()) for out, _ in outputs] == [0, 0, 0, 0], outputs
    for d in dirs:
        store = StateStore(Path(d))
        assert store.runs() == []
        store.close()


def test_a_server_of_this_machine_whose_process_exited_is_dead_at_once(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.register_server()
    exited = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    gone = int(exited.stdout)
    add_server(store, "here-gone", gone)  # this machine, process exited: dead
    add_server(store, "here-alive", os.getppid())  # this machine, process runs: live
    add_server(store, "elsewhere", gone, "another-host")  # another machine: its heartbeat decides
    assert store.live_servers() == {store.server_id, "here-alive", "elsewhere"}
    assert not pid_running(gone)
    assert pid_running(os.getpid())
    store.close()


def test_apply_validates_the_changes_and_keeps_the_rest(tmp_path: Path) -> None:
    """A change of the wrong type is refused and nothing is written; a valid one is parsed
    (usage from a dict) and every other field stays as it was."""
    store = StateStore(tmp_path)
    agent = _agent("a1").model_copy(update={"resources": [ResourceSpec(name="db")]})
    store.create_run(_run(), [agent])
    before = store.cursor()
    with pytest.raises(ValidationError):
        store.apply("a1", EventKind.TURN, turns="many")  # pyright: ignore[reportArgumentType]
    assert store.cursor() == before
    assert store.agent("a1") == agent
    usage = {"input": 5, "output": 2}
    updated = store.apply(
        "a1",
        EventKind.TURN,
        status=AgentStatus.RUNNING,
        tokens=usage,  # pyright: ignore[reportArgumentType]
    )
    assert updated.status is AgentStatus.RUNNING and updated.tokens == TokenUsage(input=5, output=2)
    assert updated.model_dump(exclude={"status", "tokens"}) == agent.model_dump(
        exclude={"status", "tokens"}
    )
    assert StateStore(tmp_path).agent("a1") == updated


def test_a_record_kept_from_the_last_write_gives_way_to_any_other_write(tmp_path: Path) -> None:
    """`agent` and `apply` use the record this store last wrote or read only while no other
    connection has committed since, and while this store wrote the row no other way."""
    first, second = StateStore(tmp_path), StateStore(tmp_path)
    first.create_run(_run(), [_agent("a1"), _agent("a2", index=2)])
    first.apply("a1", EventKind.RUNNING, status=AgentStatus.RUNNING, turns=1)
    assert first.agent("a1").turns == 1  # type: ignore[union-attr]
    # another connection changes the row: both the read and the next write see it
    second.apply("a1", EventKind.TURN, status_reason="from the second", turns=5)
    assert first.agent("a1").turns == 5  # type: ignore[union-attr]
    first.apply("a1", EventKind.TURN, turns=6)
    kept = second.agent("a1")
    assert kept is not None and (kept.turns, kept.status_reason) == (6, "from the second")
    # another connection changes another table only: the kept record is still the row
    second.reserve_budget("r1", 10)
    first.apply("a1", EventKind.TURN, turns=7)
    assert second.agent("a1").turns == 7  # type: ignore[union-attr]
    # this store writes the row by another path (an approval answered)
    approval = Approval(
        approval_id="p1",
        agent_id="a2",
        kind="command",
        subject="make",
        rule="ask",
        requested_at=1.0,
        expires_at=1e12,
    )
    first.hold_for_approval("a2", approval)
    assert first.agent("a2").approval.decision is None  # type: ignore[union-attr]
    decided = first.decide_approval("a2", "p1", allowed=True, by="me", note=None)
    assert decided is not None
    assert first.agent("a2").approval.decision == "allowed"  # type: ignore[union-attr]
    resumed = first.resume_running("a2")
    assert resumed.approval is not None and resumed.approval.decision == "allowed"
    first.close()
    second.close()
