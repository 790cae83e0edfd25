"""Agents on a Ray cluster of several nodes on this machine, which cannot see the repository.

The cluster (`tests.ray_cluster`) covers the test's directory with an empty tmpfs in the mount
namespace of every raylet and worker, so an agent's work can only come and go through Ray. The
model is the real `anthropic` client on the workers, against the fake Messages API on loopback.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import anyio
import pygit2
import pytest

from fakeapi import (
    FakeAnthropic,
    FakeRequest,
    LoggedRequest,
    by_key,
    by_turn,
    finish,
    tool_use,
    writes_file,
)
from orchestration.config import Settings
from orchestration.contracts import (
    AgentStatus,
    AgentView,
    MergeOutcome,
    MergeRequest,
    SpawnRequest,
    TaskSpec,
)
from orchestration.orchestrator import Orchestrator
from tests.orchestration.scripts import make_repo
from tests.orchestration.test_orchestrator import wait_until_final
from tests.ray_cluster import LocalCluster

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

NODES = 3
CPUS = 2


@pytest.fixture(scope="module")
def hidden_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory for the tests' repositories, hidden from the cluster's processes."""
    return tmp_path_factory.mktemp("ray-hidden")


@pytest.fixture(scope="module")
def cluster(hidden_root: Path) -> Iterator[LocalCluster]:
    with LocalCluster(NODES, CPUS, [hidden_root]) as made:
        yield made
        if ray.is_initialized():  # the driver goes first: it exits with its cluster
            ray.shutdown()


def _settings(repo: Path, cluster: LocalCluster, **extra: object) -> Settings:
    values: dict[str, object] = {
        "repo": repo,
        "sandbox": "none",
        "model": "claude-sonnet-5-5",
        "executor": "ray",
        "ray_address": cluster.address,
    }
    return Settings.model_validate({**values, **extra})


def _notes(repo: Path, prefix: str) -> list[str]:
    """The details of the events that start with `prefix`, from the repository's state."""
    from orchestration.state import StateStore

    store = StateStore(repo / ".git" / "fanout")
    try:
        return [e.detail for e in store.events(since=0) if e.detail.startswith(prefix)]
    finally:
        store.close()


def _tree(repo: Path) -> str:
    pyrepo = pygit2.Repository(str(repo))
    return str(pyrepo.head.peel(pygit2.Commit).tree_id)


SCRIPTS = {
    "TASK-A": writes_file("src/a.py", "A = 1\n", summary="a added"),
    "TASK-B": by_turn(
        tool_use("write_file", path="src/b.py", content="B = 2\n"),
        tool_use("run_command", command="cat src/b.py > src/b.txt && git status --porcelain"),
        finish("b added"),
    ),
    "TASK-C": by_turn(
        tool_use("read_file", path="README.md"),
        tool_use("write_file", path="docs/c.md", content="# C\n"),
        finish("c added"),
    ),
}


async def _run(repo: Path, settings: Settings, fake: FakeAnthropic) -> list[str]:
    async with Orchestrator(settings) as orch:
        spawned = await orch.spawn(
            SpawnRequest(
                tasks=[
                    TaskSpec(prompt="TASK-A", name="a", write_scope=["src/a.py"]),
                    TaskSpec(prompt="TASK-B", name="b", write_scope=["src/b.py", "src/b.txt"]),
                    TaskSpec(prompt="TASK-C", name="c", write_scope=["docs"]),
                ]
            )
        )
        status = await wait_until_final(orch, spawned.run_id)
        agents = status.runs[0].agents
        for view in agents:
            assert view.status == AgentStatus.SUCCEEDED, view.status_reason
        merged = await orch.merge(MergeRequest(run_id=spawned.run_id))
        assert [r.outcome for r in merged.agents] == [MergeOutcome.MERGED] * 3
        return [spawned.executor, *[str(a.node) for a in agents]]


async def test_a_run_on_the_cluster_merges_as_in_process(
    cluster: LocalCluster, hidden_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeAnthropic(by_key(SCRIPTS))
    async with fake.serve():
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
        monkeypatch.setenv("FANOUT_RAY_NODE_IP", cluster.node_ip)
        local = make_repo(hidden_root / "local")
        on_ray = make_repo(hidden_root / "ray")
        assert _tree(local) == _tree(on_ray)
        await _run(local, Settings(repo=local, sandbox="none", model="claude-sonnet-5-5"), fake)
        assert _status_seen_by_b(fake.requests) == "?? src/b.py\n?? src/b.txt"
        seen = len(fake.requests)
        with anyio.fail_after(240):
            shown = await _run(on_ray, _settings(on_ray, cluster), fake)
        # on a node, src/b.py was checkpointed before the command: the view's index follows
        assert _status_seen_by_b(fake.requests[seen:]) == "?? src/b.txt"
    assert shown[0].startswith("ray at "), shown
    assert all(node not in ("None", "") for node in shown[1:]), shown
    # 3 agents of 1 CPU on nodes of 2 CPUs: Ray's accounting puts them on two nodes at least
    assert len(set(shown[1:])) >= 2, f"the agents did not spread over the nodes: {shown}"
    assert _tree(local) == _tree(on_ray)
    assert (on_ray / "src/b.txt").read_text() == "B = 2\n"
    # the node's agent process has its own mount namespace: its workspaces are views
    notes = _notes(on_ray, "runs on node")
    assert len(notes) == 3 and all("copy-on-write view" in n for n in notes), notes
    # `fanout-mcp status` names the cluster and its nodes
    env = {
        **os.environ,
        "FANOUT_EXECUTOR": "ray",
        "FANOUT_RAY_ADDRESS": cluster.address,
    }
    with anyio.fail_after(120):
        ran = await anyio.run_process(
            [str(Path(sys.executable).parent / "fanout-mcp"), "status", "--repo", str(on_ray)],
            env=env,
        )
    shown_status = ran.stdout.decode()
    assert f"executor: ray at {cluster.address}:" in shown_status, shown_status
    assert shown_status.count(": alive, 2 CPUs") == NODES, shown_status
    assert os.path.exists(on_ray / "docs/c.md")


async def test_the_workspaces_setting_chooses_the_nodes_workspaces(
    cluster: LocalCluster, hidden_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the nodes can mount views (see the test above); the server's setting asks for worktrees
    fake = FakeAnthropic(by_key({"TASK-A": SCRIPTS["TASK-A"]}))
    async with fake.serve():
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
        monkeypatch.setenv("FANOUT_RAY_NODE_IP", cluster.node_ip)
        repo = make_repo(hidden_root / "worktrees")
        settings = _settings(repo, cluster, workspaces="worktree")
        with anyio.fail_after(240):
            async with Orchestrator(settings) as orch:
                spawned = await orch.spawn(
                    SpawnRequest(tasks=[TaskSpec(prompt="TASK-A", write_scope=["src/a.py"])])
                )
                status = await wait_until_final(orch, spawned.run_id)
                assert status.runs[0].agents[0].status == AgentStatus.SUCCEEDED
                merged = await orch.merge(MergeRequest(run_id=spawned.run_id))
                assert [r.outcome for r in merged.agents] == [MergeOutcome.MERGED]
    notes = _notes(repo, "runs on node")
    assert len(notes) == 1 and "git worktree" in notes[0], notes
    assert (repo / "src/a.py").read_text() == "A = 1\n"


def _status_seen_by_b(requests: Sequence[LoggedRequest]) -> str:
    """What TASK-B's `git status --porcelain` printed, as its model was told."""
    for entry in requests:
        request = FakeRequest(entry.body)
        if "TASK-B" in request.system_text and request.assistant_turns == 2:
            [result] = request.tool_results
            return "\n".join(line for line in result.content.splitlines() if "src/" in line)
    raise AssertionError("TASK-B's command was never answered")


async def _until(orch: Orchestrator, run_id: str, check: Callable[[AgentView], bool]) -> AgentView:
    """Long-poll status until `check(agent view)` holds for the run's first agent."""
    cursor: int | None = None
    with anyio.fail_after(120):
        while True:
            status = await orch.status(run_id=run_id, since=cursor, wait_s=2)
            cursor = status.cursor
            view = status.runs[0].agents[0]
            if check(view):
                return view


def _killed_then_rerun(command: str) -> FakeAnthropic:
    """A fake whose first agent writes a file and then runs `command` until it is killed; its
    rerun writes a second file and finishes."""
    return FakeAnthropic(
        by_key(
            {
                "TASK-KILL": by_turn(
                    tool_use("write_file", path="src/k/first.py", content="FIRST = 1\n"),
                    tool_use("run_command", command=command),
                    finish("never reached"),
                ),
                "This is a re-run": by_turn(
                    tool_use("write_file", path="src/k/second.py", content="SECOND = 2\n"),
                    finish("second written"),
                ),
            }
        )
    )


async def test_a_dead_node_leaves_its_agent_interrupted_and_a_rerun_completes(
    cluster: LocalCluster, hidden_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _killed_then_rerun("sleep 60")
    repo = make_repo(hidden_root / "killed")
    async with fake.serve():
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
        monkeypatch.setenv("FANOUT_RAY_NODE_IP", cluster.node_ip)
        async with Orchestrator(_settings(repo, cluster, sandbox="auto")) as orch:
            spawned = await orch.spawn(
                SpawnRequest(tasks=[TaskSpec(prompt="TASK-KILL", name="k", write_scope=["src/k"])])
            )
            run_id = spawned.run_id
            # the first file is checkpointed before the second model call, then it sleeps
            view = await _until(orch, run_id, lambda v: v.turns >= 2)
            node = str(view.node)
            ids = cluster.node_ids()
            index = next(i for i, n in enumerate(ids) if n.startswith(node.rsplit("/", 1)[-1]))
            cluster.kill_node(index)
            cluster.command("add")  # the next tests get their nodes back
            dead = await wait_until_final(orch, run_id)
            agent = dead.runs[0].agents[0]
            assert agent.status == AgentStatus.INTERRUPTED, agent.status_reason
            assert agent.result is not None and agent.result.commit is not None
            assert [c.path for c in agent.result.changed_files] == ["src/k/first.py"]
            rerun = await orch.rerun(agent.agent_id)
            done = await wait_until_final(orch, rerun.run_id)
            again = done.runs[0].agents[-1]
            assert again.status == AgentStatus.SUCCEEDED, again.status_reason
            assert again.node is not None and not again.node.endswith(node.rsplit("/", 1)[-1])
            merged = await orch.merge(MergeRequest(run_id=run_id))
            assert MergeOutcome.MERGED in [r.outcome for r in merged.agents]
    assert (repo / "src/k/first.py").read_text() == "FIRST = 1\n"
    assert (repo / "src/k/second.py").read_text() == "SECOND = 2\n"


async def test_leases_across_nodes_wait_and_fence(
    cluster: LocalCluster, hidden_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs whose agents want the same scope: the second waits for the first to be merged,
    wherever each runs. An agent whose lease is broken while it runs on a worker is stopped there,
    and its branch keeps only what landed under the lease; the join refuses it."""
    scripts = {
        "TASK-FIRST": by_turn(
            tool_use("write_file", path="src/s/first.py", content="A = 1\n"),
            tool_use("run_command", command="sleep 2"),
            finish("first"),
        ),
        "TASK-SECOND": writes_file("src/s/second.py", "B = 2\n", summary="second"),
        "TASK-FENCED": by_turn(
            tool_use("write_file", path="src/f/one.py", content="ONE = 1\n"),
            tool_use("run_command", command="sleep 60"),
            tool_use("write_file", path="src/f/two.py", content="TWO = 2\n"),
            finish("fenced"),
        ),
    }
    fake = FakeAnthropic(by_key(scripts))
    repo = make_repo(hidden_root / "leases")
    async with fake.serve():
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
        monkeypatch.setenv("FANOUT_RAY_NODE_IP", cluster.node_ip)
        async with Orchestrator(_settings(repo, cluster)) as orch:
            first = await orch.spawn(
                SpawnRequest(tasks=[TaskSpec(prompt="TASK-FIRST", write_scope=["src/s"])])
            )
            second = await orch.spawn(
                SpawnRequest(tasks=[TaskSpec(prompt="TASK-SECOND", write_scope=["src/s"])])
            )
            waiting = await _until(orch, second.run_id, lambda v: v.status == AgentStatus.WAITING)
            assert "lease" in (waiting.status_reason or "")
            done = await wait_until_final(orch, first.run_id)
            assert done.runs[0].agents[0].status == AgentStatus.SUCCEEDED
            still = (await orch.status(run_id=second.run_id)).runs[0].agents[0]
            assert still.status == AgentStatus.WAITING  # held until the first is merged
            await orch.merge(MergeRequest(run_id=first.run_id))
            after = await wait_until_final(orch, second.run_id)
            assert after.runs[0].agents[0].status == AgentStatus.SUCCEEDED
            merged = await orch.merge(MergeRequest(run_id=second.run_id))
            assert [r.outcome for r in merged.agents] == [MergeOutcome.MERGED]

            fenced = await orch.spawn(
                SpawnRequest(tasks=[TaskSpec(prompt="TASK-FENCED", write_scope=["src/f"])])
            )
            view = await _until(orch, fenced.run_id, lambda v: v.turns >= 2)
            ctx = await orch.context(repo)
            await ctx.leases.break_holder(view.agent_id, immediate=True)
            final = (await wait_until_final(orch, fenced.run_id)).runs[0].agents[0]
            assert final.status == AgentStatus.FAILED, final.status_reason
            assert final.lease_lost
            branch = pygit2.Repository(str(repo)).references[f"refs/heads/{final.branch}"]
            tree = branch.peel(pygit2.Commit).tree
            assert "one.py" in tree["src/f"].peel(pygit2.Tree)  # landed under the lease
            assert "two.py" not in tree["src/f"].peel(pygit2.Tree)
            refused = await orch.merge(MergeRequest(run_id=fenced.run_id))
            assert [r.outcome for r in refused.agents] != [MergeOutcome.MERGED]
    assert (repo / "src/s/first.py").exists() and (repo / "src/s/second.py").exists()
    assert not (repo / "src/f").exists()


async def test_a_dead_server_leaves_its_cluster_agents_interrupted_and_stopped(
    cluster: LocalCluster, hidden_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server dies (SIGKILL) while its agent runs on the cluster: Ray ends what the server
    owned, so the agent's command stops on its node; a new server marks the agent interrupted
    with its checkpointed work, and a rerun completes."""
    from orchestration.state import StateStore

    fake = _killed_then_rerun("sleep 61")
    repo = make_repo(hidden_root / "server-killed")
    async with fake.serve():
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
        monkeypatch.setenv("FANOUT_RAY_NODE_IP", cluster.node_ip)
        head = await anyio.open_process(
            [sys.executable, "-m", "tests.orchestration.ray_head", str(repo), cluster.address],
            cwd=Path(__file__).resolve().parents[2],
        )
        try:
            assert head.stdout is not None
            with anyio.fail_after(120):
                line = (await head.stdout.receive()).decode()
            ids = json.loads(line.splitlines()[0])
            store = StateStore(repo / ".git" / "fanout")
            try:
                with anyio.fail_after(120):
                    # another process writes the state: polled, as nothing here can signal it
                    while (record := store.agent(ids["agent_id"])) is None or record.turns < 2:  # noqa: ASYNC110
                        await anyio.sleep(0.2)
            finally:
                store.close()
        finally:
            head.kill()
            await head.wait()
        # what the dead server owned on the cluster ends with it: no agent command survives
        with anyio.fail_after(60):
            while _running("sleep 61"):  # noqa: ASYNC110 (processes of the cluster's)
                await anyio.sleep(0.5)
        async with Orchestrator(_settings(repo, cluster)) as orch:
            status = await orch.status(run_id=ids["run_id"])
            agent = status.runs[0].agents[0]
            assert agent.status == AgentStatus.INTERRUPTED, agent.status_reason
            assert agent.result is not None
            assert [c.path for c in agent.result.changed_files] == ["src/k/first.py"]
            rerun = await orch.rerun(agent.agent_id)
            done = await wait_until_final(orch, rerun.run_id)
            assert done.runs[0].agents[-1].status == AgentStatus.SUCCEEDED
            merged = await orch.merge(MergeRequest(run_id=ids["run_id"]))
            assert MergeOutcome.MERGED in [r.outcome for r in merged.agents]
    assert (repo / "src/k/second.py").read_text() == "SECOND = 2\n"


def _running(command: str) -> bool:
    """Whether a process of this machine runs `command` (its full command line)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        if cmdline == command:
            return True
    return False


async def test_cancel_stops_a_cluster_agent_and_keeps_its_work(
    cluster: LocalCluster, hidden_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cancel_subagents on an agent that runs a command on a node: the command is killed there,
    what the agent wrote is committed and lands on its branch, and it shows `cancelled`."""
    scripts = {
        "TASK-CANCEL": by_turn(
            tool_use("write_file", path="src/c/kept.py", content="KEPT = 1\n"),
            tool_use("run_command", command="sleep 62"),
            finish("never reached"),
        ),
    }
    fake = FakeAnthropic(by_key(scripts))
    repo = make_repo(hidden_root / "cancelled")
    async with fake.serve():
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
        monkeypatch.setenv("FANOUT_RAY_NODE_IP", cluster.node_ip)
        async with Orchestrator(_settings(repo, cluster)) as orch:
            spawned = await orch.spawn(
                SpawnRequest(tasks=[TaskSpec(prompt="TASK-CANCEL", write_scope=["src/c"])])
            )
            await _until(orch, spawned.run_id, lambda v: v.turns >= 2)
            with anyio.fail_after(30):
                while not _running("sleep 62"):  # noqa: ASYNC110 (a process on the node)
                    await anyio.sleep(0.2)
            await orch.cancel(spawned.run_id)
            final = (await wait_until_final(orch, spawned.run_id)).runs[0].agents[0]
            assert final.status == AgentStatus.CANCELLED, final.status_reason
            assert final.result is not None
            assert [c.path for c in final.result.changed_files] == ["src/c/kept.py"]
            assert not _running("sleep 62")
