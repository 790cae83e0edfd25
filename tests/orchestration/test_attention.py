"""When a run is settled and what to call next, from agents and leases alone."""

from __future__ import annotations

from orchestration.attention import COMMON_ERROR_CHARS, RunAttention, run_attention
from orchestration.contracts import AgentResult, AgentStatus, StopReason
from orchestration.records import scope_requests
from orchestration.state import AgentRecord
from toolbus.lease_store import Lease, LeaseMode

BASE = "0" * 40


def _agent(
    agent_id: str,
    status: AgentStatus,
    scope: list[str] | None,
    *,
    run_id: str = "r1",
    waits_for: list[str] | None = None,
    commit: str | None = None,
) -> AgentRecord:
    return AgentRecord(
        agent_id=agent_id,
        run_id=run_id,
        name=agent_id.rsplit("-", maxsplit=1)[-1],
        index=0,
        prompt="p",
        write_scope=scope,
        model="m",
        max_turns=10,
        status=status,
        base_commit=BASE,
        owner="s",
        waits_for=waits_for or [],
        commit=commit,
    )


def _lease(holder: str, path: str) -> Lease:
    return Lease(holder=holder, token=1, resource=path, mode=LeaseMode.WRITE, expires_at=1e12)


def _attention(agents: list[AgentRecord], leases: list[Lease], run_id: str = "r1") -> RunAttention:
    every = {a.agent_id: a for a in agents}
    mine = [a for a in agents if a.run_id == run_id]
    return run_attention(run_id, mine, every, leases, scope_requests)


def test_running_agents_are_not_settled() -> None:
    agents = [
        _agent("r1-a", AgentStatus.SUCCEEDED, ["a"]),
        _agent("r1-b", AgentStatus.RUNNING, ["b"]),
    ]
    att = _attention(agents, [_lease("r1-a", "a"), _lease("r1-b", "b")])
    assert not att.settled
    assert att.next.startswith('get_status(run_id="r1"')


def test_a_wave_waiting_on_a_finished_agent_is_settled_and_next_merges_it() -> None:
    agents = [
        _agent("r1-a", AgentStatus.SUCCEEDED, ["src"], commit="1" * 40),
        _agent("r1-b", AgentStatus.WAITING, ["src/x"], waits_for=["r1-a"]),
    ]
    att = _attention(agents, [_lease("r1-a", "src")])
    assert att.settled
    assert att.mergeable == ("r1-a",)
    assert att.blocked_by == {"r1-b": ("r1-a",)}
    assert att.next.startswith('merge_results(run_id="r1") merges a; then b start')


def test_a_wave_waiting_on_a_running_agent_is_not_settled() -> None:
    agents = [
        _agent("r1-a", AgentStatus.RUNNING, ["src"]),
        _agent("r1-b", AgentStatus.WAITING, ["src/x"], waits_for=["r1-a"]),
    ]
    assert not _attention(agents, [_lease("r1-a", "src")]).settled


def test_a_scope_held_by_an_earlier_runs_finished_agent_names_that_run() -> None:
    agents = [
        _agent("r0-a", AgentStatus.SUCCEEDED, ["src"], run_id="r0", commit="1" * 40),
        _agent("r1-b", AgentStatus.WAITING, ["src/x"]),
    ]
    att = _attention(agents, [_lease("r0-a", "src")])
    assert att.settled
    assert att.blocked_by == {"r1-b": ("r0-a",)}
    assert 'merge_results(run_id="r0")' in att.next


def test_a_scope_held_by_an_interrupted_agent_says_rerun_or_discard() -> None:
    agents = [
        _agent("r1-a", AgentStatus.INTERRUPTED, ["src"], commit="1" * 40),
        _agent("r1-b", AgentStatus.WAITING, ["src/x"], waits_for=["r1-a"]),
    ]
    att = _attention(agents, [_lease("r1-a", "src")])
    assert att.settled
    assert "rerun_subagent" in att.next and 'discard=["r1-a"]' in att.next


def test_a_waiting_agent_with_nothing_in_its_way_is_about_to_move() -> None:
    agents = [
        _agent("r1-a", AgentStatus.MERGED, ["src"]),
        _agent("r1-b", AgentStatus.WAITING, ["src/x"], waits_for=["r1-a"]),
    ]
    assert not _attention(agents, []).settled


def test_everything_merged_says_nothing_to_do() -> None:
    agents = [_agent("r1-a", AgentStatus.MERGED, ["a"]), _agent("r1-b", AgentStatus.MERGED, ["b"])]
    att = _attention(agents, [])
    assert att.settled and att.next.startswith("nothing to do")


def test_an_agent_a_rerun_replaces_is_not_asked_to_be_redone() -> None:
    """A rerun discards the agent it replaces once it starts; a rerun that ran to its end
    before that leaves the old agent in its status a moment longer, and the next step names
    only the rerun (the orchestrator would otherwise rerun or discard the old one again)."""
    old = _agent("r1-a1", AgentStatus.CONFLICTED, ["src"])
    rerun = _agent("r1-a2", AgentStatus.SUCCEEDED, ["src"], commit="1" * 40).model_copy(
        update={"rerun_of": "r1-a1", "name": "a1-r2", "started_at": 1.0}
    )
    att = _attention([old, rerun], [_lease("r1-a2", "src")])
    assert att.settled
    assert att.next == 'merge_results(run_id="r1") merges a1-r2'
    assert att.attention == ()
    # once that rerun is discarded, the old agent is one to redo again
    gone = rerun.model_copy(update={"status": AgentStatus.DISCARDED})
    att = _attention([old, gone], [])
    assert att.next == "a1 did not succeed: read the agent's result, then rerun_subagent or discard"
    assert att.attention == ("r1-a1",)
    # so is it once its rerun was cancelled before it ran: that rerun replaced nothing
    unstarted = rerun.model_copy(update={"status": AgentStatus.CANCELLED, "started_at": None})
    att = _attention([old, unstarted], [])
    assert att.next.startswith("a1 did not succeed: ")
    assert "r1-a1" in att.attention


def test_agents_that_failed_with_one_error_are_told_of_it_once() -> None:
    """Several agents that ended with the same error: the next step says it once (a refusal
    of the server's key, say, which no rerun mends); with different errors it names them."""
    error = (
        "the model API answered 401 (authentication_error): invalid x-api-key; the API refused "
        "the server's key: set ANTHROPIC_API_KEY where the server starts and restart it"
    )

    def failed(agent_id: str, why: str) -> AgentRecord:
        result = AgentResult(
            status=AgentStatus.FAILED, stop_reason=StopReason.MODEL_ERROR, summary="", error=why
        )
        return _agent(agent_id, AgentStatus.FAILED, [agent_id]).model_copy(
            update={"result": result}
        )

    att = _attention([failed("r1-a1", error), failed("r1-a2", error)], [])
    assert att.next == (
        f"a1, a2 did not succeed, all with one error ({error}): once its cause is gone, "
        "rerun_subagent each, or discard"
    )
    att = _attention([failed("r1-a1", error), failed("r1-a2", "the model API timed out")], [])
    assert att.next == (
        "a1, a2 did not succeed: read the agent's result, then rerun_subagent or discard"
    )
    long = _attention([failed("r1-a1", "x" * 2_000), failed("r1-a2", "x" * 2_000)], [])
    assert len(long.next) < COMMON_ERROR_CHARS + 120
