"""A verified head: merge_results runs a verification command on the would-be merged tree
before the branch moves; an agent whose change makes it fail is `verify_failed`, the others
land, and the common case costs one run of the command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from orchestration import merger as merger_module
from orchestration.contracts import (
    AgentStatus,
    MergeOutcome,
    MergeRequest,
    MergeResult,
    SpawnRequest,
    TaskSpec,
)
from orchestration.orchestrator import Orchestrator
from orchestration.state import StateStore
from orchestration.verify import Verifier
from orchestration.workspace import GitRepo
from tests.orchestration.scripts import Step, by_task, git, include_behind_hasconfig, make_repo
from tests.orchestration.test_orchestrator import settings, wait_until_final

pytestmark = pytest.mark.anyio

IMPORTS_THE_APP = "python3 -c 'import src.app.core as c; c.core()'"

RENAME: list[Step] = [
    ("write_file", {"path": "src/lib/util.py", "content": "def helper():\n    return 2\n"}),
]
# B learns of util() through a command: the bus does not see what commands read
USE_BY_COMMAND: list[Step] = [
    ("run_command", {"command": "cat src/lib/util.py"}),
    (
        "write_file",
        {
            "path": "src/app/core.py",
            "content": "from src.lib.util import util\n\n\ndef core():\n    return util()\n",
        },
    ),
]


def _repo(tmp_path: Path) -> Path:
    repo = make_repo(tmp_path / "repo")
    (repo / "src/__init__.py").write_text("")
    (repo / "src/lib/__init__.py").write_text("")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "packages")
    return repo


async def test_the_rename_breaks_the_import_and_only_the_user_of_util_is_held(
    tmp_path: Path,
) -> None:
    repo = _repo(tmp_path)
    model = by_task({"A-RENAME": RENAME, "B-USE": USE_BY_COMMAND})
    tasks = [
        TaskSpec(prompt="A-RENAME", name="a", write_scope=["src/lib"]),
        TaskSpec(prompt="B-USE", name="b", write_scope=["src/app"]),
    ]
    async with Orchestrator(settings(repo), lambda _n: model) as orch:
        spawned = await orch.spawn(SpawnRequest(tasks=tasks, verify_command=IMPORTS_THE_APP))
        await wait_until_final(orch, spawned.run_id)
        # in this order (by default they go in the order they finished: B first, B would land,
        # since the base still has util(), and A's rename would fail)
        order = [a.agent_id for a in spawned.agents]
        plain = await orch.merge(MergeRequest(run_id=spawned.run_id, agent_ids=order, dry_run=True))
        merged = await orch.merge(MergeRequest(run_id=spawned.run_id, agent_ids=order))
        status = await orch.status(run_id=spawned.run_id)
    # the bus did not see B's read (not stale); a dry run verifies too and changes nothing
    assert [a.outcome for a in plain.agents] == [MergeOutcome.CLEAN, MergeOutcome.VERIFY_FAILED]
    by_name = {a.name: a for a in merged.agents}
    assert by_name["a"].outcome is MergeOutcome.MERGED
    b = by_name["b"]
    assert b.outcome is MergeOutcome.VERIFY_FAILED
    assert b.reason is not None and "ImportError" in b.reason and "rerun_subagent" in b.reason
    assert "def helper" in (repo / "src/lib/util.py").read_text()
    assert "util()" not in (repo / "src/app/core.py").read_text()  # nothing of B applied
    states = {a.name: a.status for a in status.runs[0].agents}
    assert states == {"a": AgentStatus.MERGED, "b": AgentStatus.VERIFY_FAILED}
    assert merged.verification is not None and "1 agent(s) made it fail" in merged.verification
    # one scratch checkout per server, kept at the last tree verified for the next merge
    kept = list((repo / ".git/fanout/verify").glob("*/tree"))
    assert len(kept) == 1 and (kept[0] / "src/lib/util.py").is_file()


def _writers(count: int, broken: int) -> tuple[list[TaskSpec], dict[str, list[Step]]]:
    tasks: list[TaskSpec] = []
    scripts: dict[str, list[Step]] = {}
    for i in range(1, count + 1):
        key = f"WRITER-{i}-"
        text = "BROKEN\n" if i == broken else f"fine {i}\n"
        scripts[key] = [("write_file", {"path": f"out/w{i}.txt", "content": text})]
        tasks.append(TaskSpec(prompt=key, name=f"w{i}", write_scope=[f"out/w{i}.txt"]))
    return tasks, scripts


async def test_one_failing_agent_of_a_batch_is_held_and_the_others_land(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    tasks, scripts = _writers(4, broken=3)
    async with Orchestrator(settings(repo), lambda _n: by_task(scripts)) as orch:
        spawned = await orch.spawn(SpawnRequest(tasks=tasks))
        await wait_until_final(orch, spawned.run_id)
        merged = await orch.merge(
            MergeRequest(run_id=spawned.run_id, verify_command="! grep -rq BROKEN out")
        )
    outcomes = {a.name: a.outcome for a in merged.agents}
    assert outcomes == {
        "w1": MergeOutcome.MERGED,
        "w2": MergeOutcome.MERGED,
        "w3": MergeOutcome.VERIFY_FAILED,
        "w4": MergeOutcome.MERGED,
    }
    assert not (repo / "out/w3.txt").exists()
    # the batch, the head, two halvings, then the batch without w3
    assert merged.verification is not None and "ran 5 time(s)" in merged.verification


async def test_a_passing_batch_costs_one_run(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    tasks, scripts = _writers(4, broken=0)
    async with Orchestrator(settings(repo), lambda _n: by_task(scripts)) as orch:
        spawned = await orch.spawn(SpawnRequest(tasks=tasks, verify_command="true"))
        await wait_until_final(orch, spawned.run_id)
        merged = await orch.merge(MergeRequest(run_id=spawned.run_id))
    assert {a.outcome for a in merged.agents} == {MergeOutcome.MERGED}
    assert merged.verification is not None and "ran 1 time(s)" in merged.verification


async def test_a_head_that_fails_by_itself_lands_nothing(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    head = git(repo, "rev-parse", "HEAD").strip()
    tasks, scripts = _writers(2, broken=0)
    async with Orchestrator(settings(repo), lambda _n: by_task(scripts)) as orch:
        spawned = await orch.spawn(SpawnRequest(tasks=tasks))
        await wait_until_final(orch, spawned.run_id)
        merged = await orch.merge(MergeRequest(run_id=spawned.run_id, verify_command="false"))
    assert {a.outcome for a in merged.agents} == {MergeOutcome.SKIPPED}
    assert all("head itself" in (a.reason or "") for a in merged.agents)
    assert git(repo, "rev-parse", "HEAD").strip() == head


async def test_a_dead_servers_verification_scratch_is_removed_on_opening(
    tmp_path: Path,
) -> None:
    repo = _repo(tmp_path)
    left = repo / ".git/fanout/verify/dead-server/abc/tree"
    left.mkdir(parents=True)
    (left / "half-checked-out.py").write_text("x = 1\n")
    StateStore(repo / ".git/fanout").close()
    async with Orchestrator(settings(repo), lambda _n: by_task({})) as orch:
        await orch.status()
    assert not (repo / ".git/fanout/verify/dead-server").exists()


async def test_what_a_command_leaves_is_gone_before_the_next_verification(
    tmp_path: Path,
) -> None:
    repo = _repo(tmp_path)
    git_repo = GitRepo(repo)
    tree = git(repo, "rev-parse", "HEAD^{tree}").strip()
    config = settings(repo)
    messy = Verifier(
        git_repo,
        config,
        "echo junk > junk.txt; echo changed >> README.md; rm docs/guide.md; "
        "mkdir -p sub/.git && echo '[core]' > sub/.git/config; mkdir -p .cache; touch .cache/x",
        30,
        owner="me",
    )
    assert (await messy.verify(tree)).passed
    check = Verifier(
        git_repo,
        config,
        "test ! -e junk.txt && ! grep -q changed README.md && test -f docs/guide.md "
        "&& test ! -e sub && test ! -e .cache",
        30,
        owner="me",
    )
    verdict = await check.verify(tree)
    assert verdict.passed, verdict.describe()


@pytest.mark.parametrize("where", ["GIT_CONFIG_GLOBAL", "includeIf hasconfig"])
def test_no_filter_of_the_users_runs_in_the_verification_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    # the agent's tree names a filter the user defined where libgit2 does not look
    repo = make_repo(tmp_path / "repo", {"README.md": "hi\n"})
    (repo / ".gitattributes").write_text("* filter=lfsish\n")
    (repo / "payload.txt").write_text("agent data\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "agent")
    tree = git(repo, "rev-parse", "HEAD^{tree}").strip()
    marker = tmp_path / "smudge-ran"
    driver = f'[filter "lfsish"]\n\tsmudge = touch {marker}; cat\n'
    if where == "GIT_CONFIG_GLOBAL":
        global_config = tmp_path / "global.gitconfig"
        global_config.write_text(driver)
        monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(global_config))
    else:
        include_behind_hasconfig(repo, tmp_path / "work.gitconfig", driver)
    assert "filter.lfsish.smudge" in git(repo, "config", "--list", "--name-only")
    verifier = Verifier(GitRepo(repo), settings(repo), "true", 10.0, owner="me")
    work = verifier._checkout(tree)  # pyright: ignore[reportPrivateUsage]
    assert (work / "payload.txt").read_text() == "agent data\n"
    assert not marker.exists()


def _another_writer_after_verifying(
    repo: Path, monkeypatch: pytest.MonkeyPatch, *, times: int
) -> list[int]:
    """Make the user (or another server's merge) commit a file of its own on the branch right
    after each of the first `times` verifications; the count of verifications made, returned."""
    real_first_failing = merger_module.first_failing
    calls: list[int] = []

    async def verify_then_another_writer_lands(*args: Any) -> Any:
        found = await real_first_failing(*args)
        calls.append(1)
        if len(calls) <= times:
            (repo / "out").mkdir(exist_ok=True)
            (repo / "out" / f"other{len(calls)}.txt").write_text("x\n")
            git(repo, "add", "-A")
            git(repo, "commit", "-q", "-m", f"another writer {len(calls)}")
        return found

    monkeypatch.setattr(merger_module, "first_failing", verify_then_another_writer_lands)
    return calls


async def _merged_with(
    repo: Path, content: str, check: str
) -> tuple[list[MergeOutcome], MergeResult]:
    """One agent writes out/w.txt with `content`; its run merged with `check`."""
    scripts: dict[str, list[Step]] = {
        "W-": [("write_file", {"path": "out/w.txt", "content": content})]
    }
    async with Orchestrator(settings(repo), lambda _name: by_task(scripts)) as orch:
        spawned = await orch.spawn(
            SpawnRequest(tasks=[TaskSpec(prompt="W-", name="w", write_scope=["out/w.txt"])])
        )
        await wait_until_final(orch, spawned.run_id)
        merged = await orch.merge(MergeRequest(run_id=spawned.run_id, verify_command=check))
        return [a.outcome for a in merged.agents], merged


def _verified_again(calls: list[int], merged: MergeResult) -> None:
    """The call verified once more on the moved branch, and its summary says so."""
    assert len(calls) == 2
    assert merged.verification is not None
    assert "the branch moved while it ran" in merged.verification


async def test_what_lands_is_the_tree_that_was_verified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo(tmp_path / "repo")
    calls = _another_writer_after_verifying(repo, monkeypatch, times=1)
    # the agent's file passes the check alone, and fails it beside the other writer's
    check = "! test -e out/other1.txt || ! grep -q BROKEN out/w.txt"
    outcomes, merged = await _merged_with(repo, "BROKEN beside other1.txt\n", check)
    # the branch moved after the first verification: the same call verified it again on the
    # new head, where it fails, and nothing of it landed
    assert outcomes == [MergeOutcome.VERIFY_FAILED]
    _verified_again(calls, merged)
    assert not (repo / "out" / "w.txt").exists()


async def test_a_change_that_passes_on_the_moved_branch_lands_in_the_same_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo(tmp_path / "repo")
    calls = _another_writer_after_verifying(repo, monkeypatch, times=1)
    outcomes, merged = await _merged_with(repo, "fine\n", "grep -q fine out/w.txt")
    assert outcomes == [MergeOutcome.MERGED]
    _verified_again(calls, merged)
    head_files = git(repo, "ls-tree", "-r", "--name-only", "HEAD").split()
    assert {"out/w.txt", "out/other1.txt"} <= set(head_files)
    assert (repo / "out" / "w.txt").read_text() == "fine\n"


async def test_a_branch_that_moves_at_every_verification_is_left_for_another_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo(tmp_path / "repo")
    calls = _another_writer_after_verifying(repo, monkeypatch, times=2)
    outcomes, merged = await _merged_with(repo, "fine\n", "grep -q fine out/w.txt")
    [result] = merged.agents
    assert outcomes == [MergeOutcome.SKIPPED]
    assert result.reason is not None and "moved while the verification" in result.reason
    assert len(calls) == 2  # verified once again, not more
    assert not (repo / "out" / "w.txt").exists()
