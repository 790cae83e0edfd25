"""How spawn starts agents: at once, in order, the workspace made while the first turn is out."""

from __future__ import annotations

import threading
from pathlib import Path

import anyio
import pytest

from orchestration import workspace as workspace_pkg
from orchestration.config import Settings
from orchestration.contracts import (
    AgentStatus,
    SharedContextSpec,
    SpawnRequest,
    StatusResult,
    StopReason,
    TaskSpec,
)
from orchestration.errors import InvalidRequest
from orchestration.executors.base import InProcessExecutor
from orchestration.model import Model
from orchestration.orchestrator import AGENTS_PER_MODEL, Orchestrator
from orchestration.runner import INTERNAL_ERROR_SHOWN, AgentRunner
from orchestration.workspace import GitRepo, layered, overlay
from tests.orchestration.gitutil import git
from tests.orchestration.scripts import Gate, by_task, make_repo

pytestmark = pytest.mark.anyio

TIMEOUT = 30


def settings(repo: Path) -> Settings:
    return Settings.model_validate({"repo": repo, "sandbox": "none", "lease_ttl_s": 30.0})


async def wait_for(orch: Orchestrator, run_id: str, done: set[AgentStatus]) -> StatusResult:
    cursor: int | None = None
    with anyio.fail_after(TIMEOUT):
        while True:
            status = await orch.status(run_id=run_id, since=cursor, wait_s=5)
            cursor = status.cursor
            if all(a.status in done for a in status.runs[0].agents):
                return status


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "repo")


async def test_running_means_the_workspace_exists_even_while_the_first_turn_is_out(
    repo: Path,
) -> None:
    gate = Gate({"HELD": 0})
    model = by_task(
        {"HELD": [("write_file", {"path": "src/app/h.py", "content": "H\n"})]}, gate=gate
    )
    async with Orchestrator(settings(repo), lambda _name: model) as orch:
        spawned = await orch.spawn(
            SpawnRequest(tasks=[TaskSpec(prompt="HELD", name="held", write_scope=["src/app"])])
        )
        assert [a.status for a in spawned.agents] == [AgentStatus.QUEUED]
        with anyio.fail_after(TIMEOUT):
            await gate.reached["HELD"].wait()  # the first request is out
        status = await wait_for(orch, spawned.run_id, {AgentStatus.RUNNING})
        agent = status.runs[0].agents[0]
        assert agent.turns == 0  # still in its first turn, yet its workspace is ready
        workspace = GitRepo(repo).worktrees_dir / spawned.run_id / agent.agent_id
        assert (workspace / "src/app/core.py").exists()
        gate.release["HELD"].set()
        status = await wait_for(orch, spawned.run_id, {AgentStatus.SUCCEEDED})
    result = status.runs[0].agents[0].result
    assert result is not None and [c.path for c in result.changed_files] == ["src/app/h.py"]


async def test_cancel_right_after_spawn_cancels_agents_not_yet_started(repo: Path) -> None:
    model = by_task({})
    async with Orchestrator(settings(repo), lambda _name: model) as orch:
        spawned = await orch.spawn(
            SpawnRequest(tasks=[TaskSpec(prompt=f"T{i}", write_scope=[f"w{i}"]) for i in range(3)])
        )
        cancelled = await orch.cancel(spawned.run_id)
    assert [a.status for a in cancelled.agents] == [AgentStatus.CANCELLED] * 3


async def test_agents_beyond_one_model_group_share_a_second_instance(repo: Path) -> None:
    made: list[str] = []
    model = by_task({})

    def factory(name: str) -> Model:
        made.append(name)
        return model

    count = AGENTS_PER_MODEL + 2
    async with Orchestrator(settings(repo), factory) as orch:
        spawned = await orch.spawn(
            SpawnRequest(
                tasks=[TaskSpec(prompt=f"T{i}", write_scope=[f"w{i}"]) for i in range(count)],
                max_concurrency=count,
            )
        )
        status = await wait_for(orch, spawned.run_id, {AgentStatus.SUCCEEDED})
    assert len(status.runs[0].agents) == count
    assert len(made) == 2  # one per group of AGENTS_PER_MODEL agents, not one per agent


async def test_a_workspace_failure_fails_the_agent_without_waiting_for_its_first_turn(
    repo: Path,
) -> None:
    never = anyio.Event()
    gate = Gate({"STUCK": 0})
    gate.release["STUCK"] = never  # the first model turn never returns
    model = by_task({"STUCK": []}, gate=gate)
    state_dir = GitRepo(repo).state_dir
    (state_dir / "worktrees").write_text("not a directory\n")  # no worktree can be made
    async with Orchestrator(settings(repo), lambda _name: model) as orch:
        spawned = await orch.spawn(SpawnRequest(tasks=[TaskSpec(prompt="STUCK", write_scope=[])]))
        status = await wait_for(orch, spawned.run_id, {AgentStatus.FAILED})
    result = status.runs[0].agents[0].result
    assert result is not None and result.stop_reason == StopReason.INTERNAL_ERROR
    assert "workspace could not be made" in (result.error or "")


async def test_an_internal_errors_long_text_is_cut_in_what_the_orchestrator_reads(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A defect's exception can carry a long text (a copy's list of every file it failed
    on): the agent's status and result show its start, within a bound, and say how much more
    the server's log has."""

    async def broken(self: AgentRunner, ctx: object, runtime: object) -> None:
        raise RuntimeError("could not copy: " + "x" * 100_000)

    monkeypatch.setattr(AgentRunner, "_run_agent", broken)
    model = by_task({"T": []})
    async with Orchestrator(settings(repo), lambda _name: model) as orch:
        spawned = await orch.spawn(SpawnRequest(tasks=[TaskSpec(prompt="T", write_scope=[])]))
        status = await wait_for(orch, spawned.run_id, {AgentStatus.FAILED})
    agent = status.runs[0].agents[0]
    assert agent.result is not None and agent.result.stop_reason == StopReason.INTERNAL_ERROR
    start = "internal error: RuntimeError: could not copy: "
    more = len(start) + 100_000 - INTERNAL_ERROR_SHOWN
    for shown in (agent.status_reason or "", agent.result.error or ""):
        assert shown.startswith(start + "xxx")
        assert shown.endswith(f"... ({more} more characters in the log)")
        assert len(shown) < INTERNAL_ERROR_SHOWN + 50


async def test_a_runs_agents_get_the_workspace_kind_decided_at_its_spawn(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []
    real = layered.view_support

    def counted(git_repo: GitRepo, chosen: str = "auto") -> overlay.ViewSupport:
        asked.append(str(git_repo.root))
        return real(git_repo, chosen)

    # the spawn asks through the package, a workspace's creation through its module
    monkeypatch.setattr(workspace_pkg, "view_support", counted)
    monkeypatch.setattr(layered, "view_support", counted)
    async with Orchestrator(settings(repo), lambda _name: by_task({})) as orch:
        await orch.status()  # the repository open (it probes there)
        asked.clear()
        spawned = await orch.spawn(
            SpawnRequest(
                tasks=[TaskSpec(prompt=f"T{i}", write_scope=[f"w{i}"]) for i in range(3)],
                max_concurrency=3,
            )
        )
        status = await wait_for(orch, spawned.run_id, {AgentStatus.SUCCEEDED})
        assert len(asked) == 1  # once for the run, not once per agent
        kind = (await orch.context(repo)).workspace_kinds[spawned.run_id]
    assert kind == real(GitRepo(repo)).kind
    workspaces = GitRepo(repo).worktrees_dir / spawned.run_id
    assert {a.agent_id for a in status.runs[0].agents} == {p.name for p in workspaces.iterdir()}


async def test_spawn_describes_its_executor_off_the_event_loop(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a cluster's executor asks its cluster to describe itself (Ray: `ray.nodes()`, a call to
    # its control store), which must not hold up the agents already running
    threads: list[int] = []

    def describe(_self: InProcessExecutor) -> str:
        threads.append(threading.get_ident())
        return "described"

    monkeypatch.setattr(InProcessExecutor, "describe", describe)
    async with Orchestrator(settings(repo), lambda _name: by_task({})) as orch:
        spawned = await orch.spawn(SpawnRequest(tasks=[TaskSpec(prompt="T", write_scope=[])]))
        await wait_for(orch, spawned.run_id, {AgentStatus.SUCCEEDED})
    assert spawned.executor == "described"
    assert threads and threading.get_ident() not in threads


def snapshot_refs(repo: Path) -> list[str]:
    return git(repo, "for-each-ref", "--format=%(refname)", "refs/fanout/snapshots/").split()


async def test_a_spawn_refused_for_a_shared_file_leaves_no_reference(repo: Path) -> None:
    async with Orchestrator(settings(repo), lambda _name: by_task({})) as orch:
        with pytest.raises(InvalidRequest, match=r"NOPE\.md"):
            await orch.spawn(
                SpawnRequest(
                    tasks=[TaskSpec(prompt="T", write_scope=[])],
                    shared_context=SharedContextSpec(files=["NOPE.md"]),
                )
            )
    assert snapshot_refs(repo) == []


async def test_a_spawn_refused_for_its_dependencies_leaves_no_reference(repo: Path) -> None:
    async with Orchestrator(settings(repo), lambda _name: by_task({})) as orch:
        with pytest.raises(InvalidRequest, match="depends_on"):
            await orch.spawn(
                SpawnRequest(tasks=[TaskSpec(prompt="T", write_scope=[], depends_on=["nobody"])])
            )
    assert snapshot_refs(repo) == []


async def test_a_spawn_whose_executor_fails_to_describe_itself_leaves_no_reference(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the base is pinned beside the other reads of spawn's first round (each call of the round
    # ends before its failures are raised): when one of those fails, the run is not made, and
    # its base's reference goes too
    def describe(_self: InProcessExecutor) -> str:
        raise RuntimeError("the cluster is unreachable")

    monkeypatch.setattr(InProcessExecutor, "describe", describe)
    async with Orchestrator(settings(repo), lambda _name: by_task({})) as orch:
        with pytest.raises(RuntimeError, match="unreachable"):
            await orch.spawn(SpawnRequest(tasks=[TaskSpec(prompt="T", write_scope=[])]))
        status = await orch.status()
    assert status.runs == []
    assert snapshot_refs(repo) == []
