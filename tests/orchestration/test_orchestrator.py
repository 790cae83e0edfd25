"""Full runs of the orchestrator on real git repositories, with scripted models."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import anyio
import pytest

from orchestration.clock import Timing
from orchestration.config import Settings
from orchestration.contracts import (
    AgentStatus,
    MergeOutcome,
    MergeRequest,
    SharedContextSpec,
    SpawnRequest,
    StatusResult,
    StopReason,
    TaskSpec,
)
from orchestration.errors import (
    AgentNotFound,
    ConfigError,
    InvalidRequest,
    InvalidState,
    ModelFatalError,
)
from orchestration.merger import Merger
from orchestration.model import Model, ModelRequest, ModelResponse
from orchestration.orchestrator import Orchestrator
from orchestration.state import EventKind, StateStore
from tests.orchestration.scripts import Gate, Step, by_task, git, make_repo

pytestmark = pytest.mark.anyio

TIMEOUT = 30


def settings(repo: Path, **overrides: object) -> Settings:
    base: dict[str, object] = {"repo": repo, "sandbox": "none", "lease_ttl_s": 30.0}
    base.update(overrides)
    return Settings.model_validate(base)


async def wait_until_final(
    orch: Orchestrator, run_id: str, *, statuses: set[AgentStatus] | None = None
) -> StatusResult:
    """Long-poll get_status until every agent of the run is no longer active."""
    done = statuses
    cursor: int | None = None
    with anyio.fail_after(TIMEOUT):
        while True:
            status = await orch.status(run_id=run_id, since=cursor, wait_s=5)
            cursor = status.cursor
            agents = status.runs[0].agents
            if done is not None:
                if all(a.status in done for a in agents):
                    return status
            elif not any(a.status.active for a in agents):
                return status


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "repo")


async def test_two_agents_write_finish_and_merge(repo: Path) -> None:
    model = by_task(
        {
            "TASK-A": [("write_file", {"path": "src/app/a.py", "content": "A = 1\n"})],
            "TASK-B": [
                ("write_file", {"path": "src/lib/b.py", "content": "B = 2\n"}),
                ("run_command", {"command": "ls src/lib"}),
            ],
        }
    )
    async with Orchestrator(settings(repo), lambda _name: model) as orch:
        spawned = await orch.spawn(
            SpawnRequest(
                tasks=[
                    TaskSpec(prompt="TASK-A add a.py", name="a", write_scope=["src/app"]),
                    TaskSpec(prompt="TASK-B add b.py", name="b", write_scope=["src/lib/"]),
                ]
            )
        )
        assert [a.name for a in spawned.agents] == ["a", "b"]
        assert all(not a.waits_for for a in spawned.agents)
        status = await wait_until_final(orch, spawned.run_id)
        agents = {a.name: a for a in status.runs[0].agents}
        assert {a.status for a in agents.values()} == {AgentStatus.SUCCEEDED}
        result_a = agents["a"].result
        assert result_a is not None
        assert result_a.stop_reason == StopReason.FINISHED
        assert [(c.path, c.status, c.lines_added) for c in result_a.changed_files] == [
            ("src/app/a.py", "added", 1)
        ]
        result_b = agents["b"].result
        assert result_b is not None
        assert [(c.command, c.exit_code) for c in result_b.commands] == [("ls src/lib", 0)]
        assert status.runs[0].totals.tokens.input > 0
        # nothing visible in the user's checkout before the merge
        assert not (repo / "src/app/a.py").exists()
        assert git(repo, "status", "--porcelain") == ""

        merged = await orch.merge(MergeRequest(run_id=spawned.run_id))
        assert [r.outcome for r in merged.agents] == [MergeOutcome.MERGED] * 2
        assert (repo / "src/app/a.py").read_text() == "A = 1\n"
        assert (repo / "src/lib/b.py").read_text() == "B = 2\n"
        assert git(repo, "status", "--porcelain") == ""
        after = await orch.status(run_id=spawned.run_id)
        assert {a.status for a in after.runs[0].agents} == {AgentStatus.MERGED}
        assert all(not a.leases for a in after.runs[0].agents)
    git(repo, "fsck", "--no-progress")


async def test_shared_prefix_is_byte_identical_across_agents(repo: Path) -> None:
    seen: list[ModelRequest] = []
    model = by_task({"ONE": [], "TWO": [], "THREE": []}, seen=seen)
    async with Orchestrator(settings(repo), lambda _name: model) as orch:
        spawned = await orch.spawn(
            SpawnRequest(
                tasks=[
                    TaskSpec(prompt="ONE", write_scope=["docs"]),
                    TaskSpec(prompt="TWO", write_scope=["src/app"]),
                    TaskSpec(prompt="THREE", write_scope=[]),
                ],
                shared_context=SharedContextSpec(
                    plan="the plan", conventions="be brief", files=["README.md"]
                ),
            )
        )
        await wait_until_final(orch, spawned.run_id)
    prefixes = {r.system_prefix for r in seen}
    tools = {tuple(t.model_dump_json() for t in r.tools) for r in seen}
    assert len(seen) == 3
    assert len(prefixes) == 1 and len(tools) == 1
    prefix = prefixes.pop()
    assert "the plan" in prefix and "be brief" in prefix and "# sample" in prefix
    assert len({r.system_task for r in seen}) == 3


async def test_overlapping_scopes_run_in_waves(repo: Path) -> None:
    model = by_task(
        {
            "FIRST": [("write_file", {"path": "src/app/core.py", "content": "X = 1\n"})],
            "SECOND": [("edit_file", {"path": "src/app/core.py", "old": "X = 1", "new": "X = 2"})],
        }
    )
    async with Orchestrator(settings(repo), lambda _name: model) as orch:
        spawned = await orch.spawn(
            SpawnRequest(
                tasks=[
                    TaskSpec(prompt="FIRST", name="first", write_scope=["src"]),
                    TaskSpec(prompt="SECOND", name="second", write_scope=["src/app"]),
                ]
            )
        )
        first, second = spawned.agents
        assert second.waits_for == [first.agent_id]
        assert any("second overlaps" in w for w in spawned.warnings)
        status = await wait_until_final(
            orch,
            spawned.run_id,
            statuses={AgentStatus.SUCCEEDED, AgentStatus.WAITING},
        )
        views = {a.name: a for a in status.runs[0].agents}
        assert views["first"].status == AgentStatus.SUCCEEDED
        assert views["second"].status == AgentStatus.WAITING
        await orch.merge(MergeRequest(run_id=spawned.run_id))
        # the second wave starts from the new head and sees the first agent's work
        status = await wait_until_final(orch, spawned.run_id)
        views = {a.name: a for a in status.runs[0].agents}
        assert views["second"].status == AgentStatus.SUCCEEDED, views["second"].status_reason
        merged = await orch.merge(MergeRequest(run_id=spawned.run_id))
        assert [r.outcome for r in merged.agents] == [MergeOutcome.MERGED]
    assert (repo / "src/app/core.py").read_text() == "X = 2\n"


async def test_write_outside_scope_is_refused_back_to_the_model(repo: Path) -> None:
    seen: list[ModelRequest] = []
    model = by_task({"SCOPED": [("write_file", {"path": "docs/x.md", "content": "no"})]}, seen=seen)
    async with Orchestrator(settings(repo), lambda _name: model) as orch:
        spawned = await orch.spawn(
            SpawnRequest(tasks=[TaskSpec(prompt="SCOPED", write_scope=["src/app"])])
        )
        status = await wait_until_final(orch, spawned.run_id)
    agent = status.runs[0].agents[0]
    assert agent.status == AgentStatus.SUCCEEDED
    assert agent.result is not None and agent.result.changed_files == []
    assert agent.result.refused_calls == 1
    tool_results = [
        block
        for message in seen[-1].messages
        for block in message.content
        if block.type == "tool_result"
    ]
    assert tool_results and tool_results[0].is_error
    assert "scope" in tool_results[0].content


async def test_cancel_stops_the_agent_and_keeps_its_work(repo: Path) -> None:
    gate = Gate({"SLOW": 1})
    model = by_task(
        {"SLOW": [("write_file", {"path": "src/app/s.py", "content": "S = 1\n"}), ("x", {})]},
        gate=gate,
    )
    async with Orchestrator(settings(repo), lambda _name: model) as orch:
        spawned = await orch.spawn(
            SpawnRequest(tasks=[TaskSpec(prompt="SLOW", write_scope=["src/app"])])
        )
        with anyio.fail_after(TIMEOUT):
            await gate.reached["SLOW"].wait()
        with pytest.raises(InvalidState, match="still running"):
            await orch.rerun(spawned.agents[0].agent_id)
        cancelled = await orch.cancel(spawned.run_id)
        assert [a.status for a in cancelled.agents] == [AgentStatus.CANCELLED]
        status = await orch.status(run_id=spawned.run_id)
    agent = status.runs[0].agents[0]
    assert agent.result is not None and agent.result.stop_reason == StopReason.CANCELLED
    # the partial work is committed on the agent's branch: nothing is lost
    assert agent.result.commit is not None
    assert git(repo, "show", f"{agent.result.commit}:src/app/s.py") == "S = 1\n"


async def test_budget_exhaustion_stops_agents_with_a_reason(repo: Path) -> None:
    model = by_task({"LOOP": [("list_files", {})] * 50})
    async with Orchestrator(settings(repo, max_output_tokens=256), lambda _n: model) as orch:
        spawned = await orch.spawn(
            SpawnRequest(tasks=[TaskSpec(prompt="LOOP", write_scope=[])] * 1, budget_tokens=6_000)
        )
        status = await wait_until_final(orch, spawned.run_id)
    agent = status.runs[0].agents[0]
    assert agent.status == AgentStatus.FAILED
    assert agent.result is not None
    assert agent.result.stop_reason == StopReason.BUDGET_EXHAUSTED
    totals = status.runs[0].totals
    assert totals.budget_used <= totals.budget_tokens


class FailingModel:
    """A model whose every call fails with an error no retry can fix."""

    name = "failing"

    async def complete(self, request: ModelRequest) -> ModelResponse:
        raise ModelFatalError("authentication failed (test)")


async def test_model_fault_is_contained_to_its_agent(repo: Path) -> None:
    good = by_task({"GOOD": [("write_file", {"path": "docs/g.md", "content": "g\n"})]})
    bad = FailingModel()

    def factory(name: str) -> Model:
        return bad if name == "bad-model" else good

    async with Orchestrator(settings(repo), factory) as orch:
        spawned = await orch.spawn(
            SpawnRequest(
                tasks=[
                    TaskSpec(prompt="GOOD", name="good", write_scope=["docs"]),
                    TaskSpec(prompt="BAD", name="bad", write_scope=["src"], model="bad-model"),
                ]
            )
        )
        status = await wait_until_final(orch, spawned.run_id)
    views = {a.name: a for a in status.runs[0].agents}
    assert views["good"].status == AgentStatus.SUCCEEDED
    assert views["bad"].status == AgentStatus.FAILED
    assert views["bad"].result is not None
    assert views["bad"].result.stop_reason == StopReason.MODEL_ERROR
    assert "authentication failed" in (views["bad"].result.error or "")


async def test_missing_key_is_a_clear_error_at_spawn(repo: Path) -> None:
    def factory(name: str) -> Model:
        raise ConfigError("ANTHROPIC_API_KEY is not set")

    async with Orchestrator(settings(repo), factory) as orch:
        with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY"):
            await orch.spawn(SpawnRequest(tasks=[TaskSpec(prompt="x")]))
        status = await orch.status()
    assert status.runs == []


async def test_user_uncommitted_changes_are_seen_and_left_untouched(repo: Path) -> None:
    (repo / "README.md").write_text("# sample\nlocal edit\n")
    (repo / "notes.txt").write_text("untracked\n")
    git(repo, "add", "notes.txt")
    before = (git(repo, "status", "--porcelain"), git(repo, "diff"), git(repo, "diff", "--cached"))
    seen: list[ModelRequest] = []
    model = by_task({"LOOK": [("read_file", {"path": "README.md"})]}, seen=seen)
    async with Orchestrator(settings(repo), lambda _name: model) as orch:
        spawned = await orch.spawn(SpawnRequest(tasks=[TaskSpec(prompt="LOOK", write_scope=[])]))
        assert spawned.snapshot_of_uncommitted_changes
        await wait_until_final(orch, spawned.run_id)
    read_results = [
        block.content
        for message in seen[-1].messages
        for block in message.content
        if block.type == "tool_result"
    ]
    assert any("local edit" in text for text in read_results)
    after = (git(repo, "status", "--porcelain"), git(repo, "diff"), git(repo, "diff", "--cached"))
    assert after == before


def _merge_with_a_conflict(repo: Path) -> None:
    """Leave `repo` mid-merge, README.md unmerged."""
    git(repo, "checkout", "-q", "-b", "theirs")
    (repo / "README.md").write_text("theirs\n")
    git(repo, "commit", "-qam", "theirs")
    git(repo, "checkout", "-q", "main")
    (repo / "README.md").write_text("ours\n")
    git(repo, "commit", "-qam", "ours")
    merging = subprocess.run(
        ["git", "-C", str(repo), "merge", "theirs"], capture_output=True, check=False
    )
    assert merging.returncode != 0


async def test_spawn_in_a_checkout_with_unresolved_conflicts_says_so(repo: Path) -> None:
    """The user's checkout is mid-merge with a conflict: the run's base holds the file with its
    conflict markers, as the working tree does, and spawn's first warning names it. A clean
    checkout gets no such warning."""
    model = by_task({"LOOK": [("read_file", {"path": "README.md"})]})
    async with Orchestrator(settings(repo), lambda _name: model) as orch:
        clean = await orch.spawn(SpawnRequest(tasks=[TaskSpec(prompt="LOOK", write_scope=[])]))
        assert not any("unresolved conflicts" in w for w in clean.warnings)
        await anyio.to_thread.run_sync(_merge_with_a_conflict, repo)
        again = TaskSpec(prompt="LOOK at it again", write_scope=[])
        spawned = await orch.spawn(SpawnRequest(tasks=[again]))
        assert spawned.warnings[0].startswith(
            "your checkout has unresolved conflicts (a merge, rebase or cherry-pick under way) "
            "in README.md: the run's base holds these files as your working tree does"
        )
        await wait_until_final(orch, spawned.run_id)
    assert "<<<<<<<" in git(repo, "show", f"{spawned.base_commit}:README.md")
    assert git(repo, "status", "--porcelain").startswith("UU README.md")


async def test_restart_marks_running_agents_interrupted_and_rerun_resumes(repo: Path) -> None:
    gate = Gate({"LONG": 1})
    model = by_task(
        {"LONG": [("write_file", {"path": "src/app/l.py", "content": "L = 1\n"}), ("x", {})]},
        gate=gate,
    )
    async with Orchestrator(settings(repo), lambda _name: model) as orch:
        spawned = await orch.spawn(
            SpawnRequest(tasks=[TaskSpec(prompt="LONG", name="long", write_scope=["src/app"])])
        )
        with anyio.fail_after(TIMEOUT):
            await gate.reached["LONG"].wait()
    # the server stopped under the agent
    resumed_model = by_task({"LONG": [("read_file", {"path": "src/app/l.py"})]})
    async with Orchestrator(settings(repo), lambda _name: resumed_model) as orch:
        status = await orch.status(run_id=spawned.run_id)
        agent = status.runs[0].agents[0]
        assert agent.status == AgentStatus.INTERRUPTED
        assert agent.result is not None and agent.result.commit is not None
        with pytest.raises(AgentNotFound):
            await orch.merge(MergeRequest(run_id=spawned.run_id, discard=["nope"]))
        rerun = await orch.rerun(agent.agent_id)
        assert rerun.replaces == agent.agent_id
        status = await wait_until_final(
            orch,
            spawned.run_id,
            statuses={AgentStatus.SUCCEEDED, AgentStatus.DISCARDED},
        )
        views = {a.agent_id: a for a in status.runs[0].agents}
        assert views[agent.agent_id].status == AgentStatus.DISCARDED
        new = views[rerun.agent.agent_id]
        assert new.status == AgentStatus.SUCCEEDED
        merged = await orch.merge(MergeRequest(run_id=spawned.run_id))
        assert [r.outcome for r in merged.agents] == [MergeOutcome.MERGED]
    # the resumed agent carried the interrupted agent's work
    assert (repo / "src/app/l.py").read_text() == "L = 1\n"


async def test_conflict_then_rerun_on_the_new_head(repo: Path) -> None:
    model = by_task(
        {
            "EDIT": [
                ("edit_file", {"path": "src/app/core.py", "old": "return 1", "new": "return 10"})
            ],
        }
    )
    async with Orchestrator(settings(repo), lambda _name: model) as orch:
        spawned = await orch.spawn(
            SpawnRequest(tasks=[TaskSpec(prompt="EDIT", name="edit", write_scope=["src/app"])])
        )
        status = await wait_until_final(orch, spawned.run_id)
        agent_id = status.runs[0].agents[0].agent_id
        # meanwhile the user changes the same line and commits
        (repo / "src/app/core.py").write_text("def core():\n    return 99\n")
        git(repo, "commit", "-qam", "user change")
        head = git(repo, "rev-parse", "HEAD").strip()
        dry = await orch.merge(MergeRequest(run_id=spawned.run_id, dry_run=True))
        assert [r.outcome for r in dry.agents] == [MergeOutcome.CONFLICTED]
        merged = await orch.merge(MergeRequest(run_id=spawned.run_id))
        assert [r.outcome for r in merged.agents] == [MergeOutcome.CONFLICTED]
        assert merged.agents[0].conflicts == ["src/app/core.py"]
        assert merged.head == head
        assert (repo / "src/app/core.py").read_text() == "def core():\n    return 99\n"
        rerun = await orch.rerun(agent_id, instructions="keep the user's value 99 and add 1")
        assert rerun.base_commit == head
        status = await wait_until_final(
            orch, spawned.run_id, statuses={AgentStatus.SUCCEEDED, AgentStatus.DISCARDED}
        )
    views = {a.agent_id: a for a in status.runs[0].agents}
    assert views[agent_id].status == AgentStatus.DISCARDED
    git(repo, "fsck", "--no-progress")


_EDIT_CORE: Step = ("edit_file", {"path": "src/app/core.py", "old": "return 1", "new": "return 10"})


async def _conflicted(orch: Orchestrator, repo: Path) -> tuple[str, str]:
    """An agent whose edit conflicts with the user's commit at its merge: (run, agent)."""
    spawned = await orch.spawn(
        SpawnRequest(tasks=[TaskSpec(prompt="EDIT", name="edit", write_scope=["src/app"])])
    )
    status = await wait_until_final(orch, spawned.run_id)
    (repo / "src/app/core.py").write_text("def core():\n    return 99\n")
    git(repo, "commit", "-qam", "user change")
    merged = await orch.merge(MergeRequest(run_id=spawned.run_id))
    assert [r.outcome for r in merged.agents] == [MergeOutcome.CONFLICTED]
    return spawned.run_id, status.runs[0].agents[0].agent_id


def _edit_and_hold() -> tuple[Gate, Model]:
    """A model for `_conflicted`'s task and for one that holds until the gate lets it go."""
    gate = Gate({"HOLD": 1})
    model = by_task(
        {"EDIT": [_EDIT_CORE], "HOLD": [("write_file", {"path": "docs/h.md", "content": "h\n"})]},
        gate=gate,
    )
    return gate, model


async def _conflicted_while_held(orch: Orchestrator, repo: Path, gate: Gate) -> tuple[str, str]:
    """`_conflicted`, then an agent of another run that holds the server's one running place
    (`max_running=1`) until `gate` lets it go: a rerun stays queued meanwhile."""
    run_id, agent_id = await _conflicted(orch, repo)
    await orch.spawn(
        SpawnRequest(tasks=[TaskSpec(prompt="HOLD", name="hold", write_scope=["docs"])])
    )
    with anyio.fail_after(TIMEOUT):
        await gate.reached["HOLD"].wait()
    return run_id, agent_id


async def test_an_agent_is_rerun_once_while_its_rerun_has_not_started(repo: Path) -> None:
    """A rerun replaces its agent once it starts; until then the agent keeps its status. A
    second rerun_subagent of it (a client's retry, say) is refused, naming the first: two
    reruns would redo one task in one scope side by side. Nor does the run's next step ask
    for the agent to be redone meanwhile."""
    gate, model = _edit_and_hold()
    async with Orchestrator(settings(repo, max_running=1), lambda _name: model) as orch:
        run_id, agent_id = await _conflicted_while_held(orch, repo, gate)
        rerun = await orch.rerun(agent_id)
        again = f"{agent_id} is already rerun as {rerun.agent.agent_id}"
        with pytest.raises(InvalidState, match=again):
            await orch.rerun(agent_id, instructions="another try")
        status = await orch.status(run_id=run_id)
        shown = {a.agent_id: a.status for a in status.runs[0].agents}
        assert shown == {agent_id: AgentStatus.CONFLICTED, rerun.agent.agent_id: AgentStatus.QUEUED}
        assert "did not succeed" not in status.runs[0].next
        assert agent_id not in status.runs[0].next
        gate.release["HOLD"].set()
        final = await wait_until_final(
            orch, run_id, statuses={AgentStatus.SUCCEEDED, AgentStatus.DISCARDED}
        )
    shown = {a.agent_id: a.status for a in final.runs[0].agents}
    assert shown == {agent_id: AgentStatus.DISCARDED, rerun.agent.agent_id: AgentStatus.SUCCEEDED}


async def test_a_rerun_cancelled_before_it_ran_leaves_its_agent_as_it_was(repo: Path) -> None:
    """Cancelling a queued rerun replaces nothing: the agent keeps its status and its place in
    the run's next step, and may be rerun again; that rerun replaces it."""
    gate, model = _edit_and_hold()
    async with Orchestrator(settings(repo, max_running=1), lambda _name: model) as orch:
        run_id, agent_id = await _conflicted_while_held(orch, repo, gate)
        first = (await orch.rerun(agent_id)).agent.agent_id
        cancelled = await orch.cancel(run_id, [first])
        assert [a.agent_id for a in cancelled.agents] == [first]
        ended = {AgentStatus.CANCELLED, AgentStatus.CONFLICTED, AgentStatus.DISCARDED}
        status = await wait_until_final(orch, run_id, statuses=ended)
        shown = {a.agent_id: a.status for a in status.runs[0].agents}
        assert shown == {agent_id: AgentStatus.CONFLICTED, first: AgentStatus.CANCELLED}
        assert status.runs[0].next.startswith("edit did not succeed")
        second = (await orch.rerun(agent_id)).agent.agent_id
        gate.release["HOLD"].set()
        final = await wait_until_final(
            orch,
            run_id,
            statuses={AgentStatus.SUCCEEDED, AgentStatus.DISCARDED, AgentStatus.CANCELLED},
        )
    by_id = {a.agent_id: a for a in final.runs[0].agents}
    assert {k: a.status for k, a in by_id.items()} == {
        agent_id: AgentStatus.DISCARDED,
        first: AgentStatus.CANCELLED,
        second: AgentStatus.SUCCEEDED,
    }
    assert (by_id[agent_id].status_reason or "").startswith(f"replaced by {second} ")


async def test_the_agent_a_rerun_replaces_is_discarded_before_the_rerun_works(
    repo: Path,
) -> None:
    """The agent a rerun replaces is discarded as the rerun starts, before it runs a tool: no
    answer shows the rerun ended beside the old agent in its old status."""
    model = by_task({"EDIT": [_EDIT_CORE]})
    async with Orchestrator(settings(repo), lambda _name: model) as orch:
        run_id, agent_id = await _conflicted(orch, repo)
        new_id = (await orch.rerun(agent_id)).agent.agent_id
        status = await wait_until_final(orch, run_id)  # (the first answer with none active)
    shown = {a.agent_id: a.status for a in status.runs[0].agents}
    assert shown == {agent_id: AgentStatus.DISCARDED, new_id: AgentStatus.SUCCEEDED}


async def test_a_replacement_left_undone_is_finished_when_the_repository_opens(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that stopped after a rerun started, before it discarded the agent the rerun
    replaces (or whose discard failed), leaves that agent in its old status: the next server
    to open the repository discards it, so that it is neither merged beside its rerun nor
    shown as work still to do."""

    async def fails(*_args: object) -> None:
        raise OSError("stopped before the discard")

    model = by_task({"EDIT": [_EDIT_CORE]})
    monkeypatch.setattr(Merger, "remove_workspace", fails)
    async with Orchestrator(settings(repo), lambda _name: model) as orch:
        run_id, agent_id = await _conflicted(orch, repo)
        new_id = (await orch.rerun(agent_id)).agent.agent_id
        status = await wait_until_final(orch, run_id)
    left = {a.agent_id: a.status for a in status.runs[0].agents}
    assert left == {agent_id: AgentStatus.CONFLICTED, new_id: AgentStatus.SUCCEEDED}
    monkeypatch.undo()
    async with Orchestrator(settings(repo), lambda _name: model) as orch:
        status = await orch.status(run_id=run_id)
    shown = {a.agent_id: a.status for a in status.runs[0].agents}
    assert shown == {agent_id: AgentStatus.DISCARDED, new_id: AgentStatus.SUCCEEDED}
    assert not any(agent_id in step for step in status.runs[0].next)


async def test_a_failing_read_of_cancel_requests_leaves_the_server_running(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watch for cancel requests made from other servers reads the state on its own: a
    read that fails (the state busy, say) is tried again at the next poll, and the server, whose
    task the watch is, goes on serving."""
    reads: list[int] = []
    read_again = anyio.Event()
    real = StateStore.events_of_kind

    def flaky(store: StateStore, kind: EventKind, *, since: int) -> list[tuple[int, str, str]]:
        reads.append(since)
        if len(reads) == 4:
            read_again.set()
        if len(reads) <= 2:
            raise sqlite3.OperationalError("database is locked")
        return real(store, kind, since=since)

    monkeypatch.setattr(StateStore, "events_of_kind", flaky)
    model = by_task({"ISO": [("write_file", {"path": "docs/new.md", "content": "n\n"})]})
    fast = Timing(cancel_poll_s=0.01)
    async with Orchestrator(settings(repo), lambda _name: model, timing=fast) as orch:
        await orch.status()  # (opens the repository: the watch starts)
        with anyio.fail_after(TIMEOUT):
            await read_again.wait()  # (twice after the two that failed)
        spawned = await orch.spawn(SpawnRequest(tasks=[TaskSpec(prompt="ISO")]))
        status = await wait_until_final(orch, spawned.run_id)
    assert status.runs[0].agents[0].status is AgentStatus.SUCCEEDED


async def test_two_reruns_of_one_agent_at_once_make_one(repo: Path) -> None:
    model = by_task({"EDIT": [_EDIT_CORE]})
    async with Orchestrator(settings(repo), lambda _name: model) as orch:
        run_id, agent_id = await _conflicted(orch, repo)
        answers: list[object] = []

        async def rerun() -> None:
            try:
                answers.append(await orch.rerun(agent_id))
            except InvalidState as exc:
                answers.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(rerun)
            tg.start_soon(rerun)
        assert sorted(type(a).__name__ for a in answers) == ["InvalidState", "RerunResult"]
        final = await wait_until_final(
            orch, run_id, statuses={AgentStatus.SUCCEEDED, AgentStatus.DISCARDED}
        )
    assert len(final.runs[0].agents) == 2


async def test_agent_task_is_isolated_from_the_user_checkout(repo: Path, tmp_path: Path) -> None:
    model = by_task({"ISO": [("write_file", {"path": "docs/new.md", "content": "n\n"})]})
    async with Orchestrator(settings(repo), lambda _name: model) as orch:
        spawned = await orch.spawn(SpawnRequest(tasks=[TaskSpec(prompt="ISO")]))
        assert any("no write_scope" in w for w in spawned.warnings)
        status = await wait_until_final(orch, spawned.run_id)
    agent = status.runs[0].agents[0]
    assert agent.branch == f"fanout/{spawned.run_id}/{agent.agent_id}"
    assert git(repo, "rev-parse", "--abbrev-ref", "HEAD").strip() == "main"
    assert not (repo / "docs/new.md").exists()
    assert git(repo, "status", "--porcelain") == ""


async def test_spawn_names_earlier_agents_whose_leases_block_it(repo: Path) -> None:
    model = by_task({"HOLD": [("write_file", {"path": "src/held.py", "content": "H = 1\n"})]})
    async with Orchestrator(settings(repo), lambda _name: model) as orch:
        first = await orch.spawn(
            SpawnRequest(tasks=[TaskSpec(prompt="HOLD", name="holder", write_scope=["src"])])
        )
        await wait_until_final(orch, first.run_id)  # succeeded, unmerged: it keeps its lease
        holder = first.agents[0].agent_id
        clear = await orch.spawn(
            SpawnRequest(tasks=[TaskSpec(prompt="DOCS", name="docs", write_scope=["docs"])])
        )
        assert not any("hold overlapping write leases" in w for w in clear.warnings)
        blocked = await orch.spawn(
            SpawnRequest(
                tasks=[
                    TaskSpec(prompt="NOTES", name="notes", write_scope=["notes"]),
                    TaskSpec(prompt="APP", name="app", write_scope=["src/app"]),
                ]
            )
        )
        warned = [w for w in blocked.warnings if "hold overlapping write leases" in w]
        assert len(warned) == 1 and f"({holder})" in warned[0], blocked.warnings
        await orch.cancel(run_id=blocked.run_id)
        await orch.cancel(run_id=clear.run_id)


async def test_the_shared_context_is_read_at_the_snapshot_of_uncommitted_work(repo: Path) -> None:
    """Spawn lists the base as HEAD while git's status runs; with uncommitted work the base is
    the snapshot commit, and what was listed at HEAD (there, the shared file is missing) is
    not what the agents see."""
    (repo / "PLAN.md").write_text("the uncommitted plan\n")
    seen: list[ModelRequest] = []
    model = by_task({"READ": []}, seen=seen)
    async with Orchestrator(settings(repo), lambda _name: model) as orch:
        spawned = await orch.spawn(
            SpawnRequest(
                tasks=[TaskSpec(prompt="READ", write_scope=[])],
                shared_context=SharedContextSpec(files=["PLAN.md"]),
            )
        )
        assert spawned.snapshot_of_uncommitted_changes
        await wait_until_final(orch, spawned.run_id)
        (repo / "PLAN.md").unlink()  # clean again: the file is missing at the base
        with pytest.raises(InvalidRequest, match=r"PLAN\.md"):
            await orch.spawn(
                SpawnRequest(
                    tasks=[TaskSpec(prompt="READ", write_scope=[])],
                    shared_context=SharedContextSpec(files=["PLAN.md"]),
                )
            )
    assert len(seen) == 1 and "the uncommitted plan" in seen[0].system_prefix
    assert "PLAN.md" in seen[0].system_prefix


async def test_a_spawn_that_repeats_an_unmerged_run_says_so(repo: Path) -> None:
    """A client that lost spawn's answer and calls again would run every task twice, the
    second run waiting on the first's scopes: the second answer names the first run, and
    how to drop the repeat. Other tasks, or the same ones once merged, get no such warning."""
    model = by_task({"ONE": [("write_file", {"path": "src/app/one.py", "content": "ONE = 1\n"})]})
    request = SpawnRequest(tasks=[TaskSpec(prompt="ONE add", name="one", write_scope=["src/app"])])
    async with Orchestrator(settings(repo), lambda _name: model) as orch:
        first = await orch.spawn(request)
        again = await orch.spawn(request)
        assert again.warnings[0].startswith(f"these tasks are those of run {first.run_id}")
        assert f'cancel_subagents(run_id="{again.run_id}")' in again.warnings[0]
        other = await orch.spawn(
            SpawnRequest(tasks=[TaskSpec(prompt="ONE add", name="one", write_scope=["docs"])])
        )
        assert not any("these tasks are those of run" in w for w in other.warnings)
        for dropped in (again, other):
            await orch.cancel(dropped.run_id)
            await wait_until_final(orch, dropped.run_id)
            ids = [a.agent_id for a in dropped.agents]
            await orch.merge(MergeRequest(run_id=dropped.run_id, discard=ids))
        await wait_until_final(orch, first.run_id)
        merged = await orch.merge(MergeRequest(run_id=first.run_id))
        assert [r.outcome for r in merged.agents] == [MergeOutcome.MERGED]
        later = await orch.spawn(request)
        assert not any("these tasks are those of run" in w for w in later.warnings)
