"""A subagent's files never choose what the server's own git runs.

Each case is what a prompt-injected agent does through its tools: a command (sandboxed when
bubblewrap runs here) plants a `.git` or changes one, then the agent lists, searches or just
finishes, and the server runs git on its workspace (`git ls-files` for the listing, staging for
the commit). The planted configuration names a program that writes a marker outside the
workspace with the server's API key; the marker must never appear. The agent's real work is
still committed and merged, and the planted `.git` is reported in its result, not committed.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from pydantic import JsonValue

from orchestration.config import Settings
from orchestration.contracts import (
    AgentStatus,
    AgentView,
    MergeOutcome,
    MergeRequest,
    SpawnRequest,
    StatusResult,
    TaskSpec,
)
from orchestration.orchestrator import Orchestrator
from orchestration.workspace import layered
from tests.orchestration.scripts import Gate, by_task, git, include_behind_hasconfig, make_repo
from tests.orchestration.test_orchestrator import wait_until_final
from tests.reliability.conftest import Ledger
from toolbus.trees import remove_tree

pytestmark = pytest.mark.anyio

GUARANTEE = "G1c an agent's files never choose what the server's git runs"
Step = tuple[str, dict[str, JsonValue]]


def _hook(marker: Path) -> str:
    """Shell that writes an executable `hook.sh` which records that it ran, and the key."""
    body = f'#!/bin/sh\necho "ran $ANTHROPIC_API_KEY" >> {shlex.quote(str(marker))}\nexit 1\n'
    return f"printf %s {shlex.quote(body)} > hook.sh && chmod +x hook.sh"


def _plant_repository(marker: Path) -> str:
    """The reported attack: the gitfile swapped for a fresh repository with an fsmonitor hook."""
    return (
        f"{_hook(marker)} && mv .git .git.real && git init -q . && "
        'git config core.fsmonitor "$PWD/hook.sh" && '
        'git config core.hooksPath "$PWD" && cp hook.sh post-index-change && '
        'git config diff.external "$PWD/hook.sh" && git config core.pager "$PWD/hook.sh" && '
        "printf '* filter=evil\\n' > .gitattributes && "
        'git config filter.evil.clean "$PWD/hook.sh" && git config filter.evil.required true'
    )


# the agent's files pick the user's filter `user` for its work
def _pick_users_filter(driver: str = "user") -> list[Step]:
    """The agent's two writes: attributes that select the user's filter `driver` for its
    files, then its work."""
    return [
        ("write_file", {"path": "src/app/.gitattributes", "content": f"* filter={driver}\n"}),
        ("write_file", {"path": "src/app/work.py", "content": "WORK = 1\n"}),
    ]


def _users_program(tmp_path: Path, last_line: str) -> tuple[Path, Path]:
    """A program of the user's (a hook, a filter) that records each of its runs, then runs
    `last_line`: (the program, the file it records in)."""
    marker = tmp_path / "escaped.txt"
    program = tmp_path / "user-program.sh"
    program.write_text(
        f'#!/bin/sh\necho "ran $0 in $PWD" >> {shlex.quote(str(marker))}\n{last_line}\n'
    )
    program.chmod(0o755)
    return program, marker


def _redirect_gitfile(evil: Path) -> str:
    """The gitfile pointed at a repository elsewhere, prepared with a hook."""
    return f"printf 'gitdir: %s\\n' {shlex.quote(str(evil))} > .git"


def _nested_repository(marker: Path) -> str:
    """A repository planted below the root, which git would commit as an embedded one."""
    return (
        f"{_hook(marker)} && mkdir -p src/app/vendored && cd src/app/vendored && "
        "echo lib > lib.py && git init -q . && git add lib.py && "
        "git -c user.name=a -c user.email=a@a commit -qm inner && "
        'git config core.fsmonitor "$PWD/../../../hook.sh"'
    )


def _evil_repo(tmp_path: Path, marker: Path) -> Path:
    evil = tmp_path / "evil"
    git(tmp_path, "init", "-q", str(evil))
    hook = evil / "hook.sh"
    hook.write_text(f'#!/bin/sh\necho "ran $ANTHROPIC_API_KEY" >> {shlex.quote(str(marker))}\n')
    hook.chmod(0o755)
    git(evil, "config", "core.fsmonitor", str(hook))
    git(evil, "config", "core.hooksPath", str(evil))
    return evil / ".git"


async def _attack(repo: Path, steps: list[Step]) -> tuple[StatusResult, list[MergeOutcome]]:
    """Run one agent through `steps` (then it finishes), wait for it, and merge it."""
    model = by_task({"ATTACK": steps})
    settings = Settings.model_validate({"repo": repo, "sandbox": "auto", "lease_ttl_s": 30.0})
    async with Orchestrator(settings, lambda _name: model) as orch:
        spawned = await orch.spawn(
            SpawnRequest(tasks=[TaskSpec(prompt="ATTACK", name="a", write_scope=["src/app"])])
        )
        status = await wait_until_final(orch, spawned.run_id)
        merged = await orch.merge(MergeRequest(run_id=spawned.run_id))
        return status, [r.outcome for r in merged.agents]


def _cases(tmp_path: Path, marker: Path) -> dict[str, list[Step]]:
    write: Step = ("write_file", {"path": "src/app/work.py", "content": "WORK = 1\n"})
    plant: Step = ("run_command", {"command": _plant_repository(marker)})
    return {
        "fsmonitor_through_list_files": [plant, ("list_files", {}), write],
        "fsmonitor_through_search": [plant, ("search", {"pattern": "core"}), write],
        "through_finishing_alone": [write, plant],
        "redirected_gitfile": [
            write,
            ("run_command", {"command": _redirect_gitfile(_evil_repo(tmp_path, marker))}),
            ("list_files", {}),
            ("search", {"pattern": "core"}),
        ],
        "nested_repository": [
            write,
            ("run_command", {"command": _nested_repository(marker)}),
            ("list_files", {"path": "src/app"}),
            ("search", {"pattern": "lib"}),
        ],
    }


CASE_NAMES = [
    "fsmonitor_through_list_files",
    "fsmonitor_through_search",
    "through_finishing_alone",
    "redirected_gitfile",
    "nested_repository",
]


@pytest.mark.parametrize("case", CASE_NAMES)
async def test_planted_git_runs_nothing(tmp_path: Path, ledger: Ledger, case: str) -> None:
    repo = make_repo(tmp_path / "repo")
    marker = tmp_path / "escaped.txt"
    steps = _cases(tmp_path, marker)[case]
    status, outcomes = await _attack(repo, steps)
    ran = marker.read_text() if marker.exists() else ""
    ledger.record(GUARANTEE, case, ran == "", ran.strip()[:80])
    assert ran == "", f"a program named by the agent's git configuration ran: {ran!r}"
    agent = status.runs[0].agents[0]
    assert agent.status is AgentStatus.SUCCEEDED, agent
    assert agent.result is not None
    planted = [d for d in agent.result.dropped_files if ".git" in d]
    assert planted, agent.result.dropped_files
    assert outcomes == [MergeOutcome.MERGED]
    assert (repo / "src/app/work.py").read_text() == "WORK = 1\n"
    tree = git(repo, "ls-tree", "-r", "--name-only", "HEAD").split()
    assert not any(p.endswith(".git") or "/.git/" in p for p in tree)
    modes = git(repo, "ls-tree", "-r", "HEAD").split("\n")
    assert not any(line.startswith("160000") for line in modes)  # no embedded repository
    git(repo, "fsck", "--no-progress")


@pytest.mark.parametrize(
    ("filter_in", "driver", "workspaces"),
    [
        ("config", "user", "auto"),
        ("includeIf hasconfig", "user", "auto"),
        ("includeIf hasconfig", "user", "worktree"),
        ("config", "a=b", "auto"),
        ("config", "a=b", "worktree"),
    ],
)
async def test_the_users_own_command_running_config_stays_off_in_workspaces(
    tmp_path: Path,
    ledger: Ledger,
    monkeypatch: pytest.MonkeyPatch,
    *,
    filter_in: str,
    driver: str,
    workspaces: str,
) -> None:
    """The user's fsmonitor, hooks and filters run on their own checkout (and on the first
    checkout of a new workspace, before any agent ran there), never on an agent's work, where the
    agent's files (attributes included) would pick what they run on. `filter_in`: where the
    user's filter is defined; libgit2 does not follow a `hasconfig:` include, git does.
    `driver`: the filter's name; one with `=` would be split by git's `-c`."""
    monkeypatch.setenv("FANOUT_WORKSPACES", workspaces)
    repo = make_repo(tmp_path / "repo")
    hook, marker = _users_program(tmp_path, "exit 0")
    steps: list[Step] = [
        *_pick_users_filter(driver),
        ("list_files", {}),
        ("search", {"pattern": "WORK"}),
    ]
    gate = Gate({"ATTACK": 1})
    model = by_task({"ATTACK": steps}, gate=gate)
    settings = Settings.model_validate({"repo": repo, "sandbox": "auto", "lease_ttl_s": 30.0})
    async with Orchestrator(settings, lambda _name: model) as orch:
        spawned = await orch.spawn(
            SpawnRequest(tasks=[TaskSpec(prompt="ATTACK", name="a", write_scope=["src/app"])])
        )
        with anyio.fail_after(60):
            await gate.reached["ATTACK"].wait()  # its first tool ran: the workspace exists
        for name in ("post-index-change", "reference-transaction"):
            (repo / ".git" / "hooks" / name).symlink_to(hook)
        git(repo, "config", "core.fsmonitor", str(hook))
        if filter_in == "config":
            git(repo, "config", f"filter.{driver}.clean", str(hook))
        else:
            driver = f'[filter "user"]\n\tclean = {hook}\n'
            include_behind_hasconfig(repo, tmp_path / "work.gitconfig", driver)
            assert "filter.user.clean" in git(repo, "config", "--list", "--name-only")
        gate.release["ATTACK"].set()
        status = await wait_until_final(orch, spawned.run_id)
        ran = marker.read_text() if marker.exists() else ""
        ledger.record(GUARANTEE, "the user's own configuration", ran == "", ran.strip()[:80])
        assert ran == ""
        agent = status.runs[0].agents[0]
        assert agent.status is AgentStatus.SUCCEEDED
        assert agent.result is not None and agent.result.commit is not None
        assert git(repo, "show", f"{agent.result.commit}:src/app/work.py") == "WORK = 1\n"


STOPPERS = "G1d an agent's files never stop the server's git"
RULES = (".gitattributes", ".gitignore", ".gitmodules")


_WORK: Step = ("write_file", {"path": "src/app/work.py", "content": "WORK = 1\n"})


async def _work_beside(repo: Path, command: str) -> tuple[AgentView, list[MergeOutcome]]:
    """One agent that writes its work, then runs `command`; run, waited for and merged."""
    with anyio.fail_after(120):
        status, outcomes = await _attack(repo, [_WORK, ("run_command", {"command": command})])
    return status.runs[0].agents[0], outcomes


def _assert_work_landed(repo: Path, outcomes: list[MergeOutcome]) -> list[str]:
    """The agent's work merged into the user's checkout; the paths of the new head."""
    assert outcomes == [MergeOutcome.MERGED]
    assert (repo / "src/app/work.py").read_text() == "WORK = 1\n"
    tree = git(repo, "ls-tree", "-r", "--name-only", "HEAD").split()
    assert "src/app/work.py" in tree
    git(repo, "fsck", "--no-progress")
    return tree


async def test_named_pipes_where_git_reads_rules_never_stop_the_commit(
    tmp_path: Path, ledger: Ledger
) -> None:
    """Git opens `.gitattributes`, `.gitignore` and `.gitmodules` as it finds them, and opening
    a named pipe waits for a writer: pipes there (and a link to one) would hold the agent's
    commit, and its finish, for good. They are removed and reported; the work is merged."""
    repo = make_repo(tmp_path / "repo")
    plant = (
        "mkdir -p src/app && mkfifo .gitattributes .gitmodules src/app/.gitignore src/app/pipe "
        "&& ln -s pipe src/app/.gitattributes"
    )
    agent, outcomes = await _work_beside(repo, plant)
    removed = sorted(d.split(" ")[0] for d in (agent.result.dropped_files if agent.result else []))
    expected = [".gitattributes", ".gitmodules", "src/app/.gitattributes", "src/app/.gitignore"]
    ok = agent.status is AgentStatus.SUCCEEDED and removed == expected
    ledger.record(STOPPERS, "pipes and a link to one where git reads rules", ok, str(removed))
    assert agent.status is AgentStatus.SUCCEEDED, agent
    assert removed == expected
    tree = _assert_work_landed(repo, outcomes)
    assert not any("pipe" in p or p.rsplit("/", 1)[-1] in RULES for p in tree)


async def test_a_planted_git_holding_named_pipes_is_moved_out_and_the_work_merged(
    tmp_path: Path, ledger: Ledger
) -> None:
    """A planted `.git` is moved out of a view to the quarantine by copying it (the view is on
    its overlay, the quarantine is not): a named pipe in it, or one that is itself the `.git`,
    is left out of the copy, never opened to wait on, and the work is merged."""
    repo = make_repo(tmp_path / "repo")
    plant = (
        "mkdir -p src/app/inner/.git src/app/other && echo x > src/app/inner/.git/config "
        "&& mkfifo src/app/inner/.git/pipe src/app/other/.git"
    )
    agent, outcomes = await _work_beside(repo, plant)
    dropped = agent.result.dropped_files if agent.result else []
    planted = sorted(d.split(" ")[0] for d in dropped)
    ok = agent.status is AgentStatus.SUCCEEDED and outcomes == [MergeOutcome.MERGED]
    ledger.record(STOPPERS, "a planted .git holding a named pipe, in a view", ok, str(planted))
    assert agent.status is AgentStatus.SUCCEEDED, agent
    assert planted == ["src/app/inner/.git", "src/app/other/.git"]
    tree = _assert_work_landed(repo, outcomes)
    assert not any("/.git" in p for p in tree)


@pytest.fixture
def deep_cleanup(tmp_path: Path) -> Iterator[None]:
    """(pytest's own clean-up of old temporary directories recurses once per level)"""
    yield
    for entry in tmp_path.iterdir():
        remove_tree(entry, ignore_errors=True)  # (a view a failed test left mounted stays)


async def test_directories_nested_past_the_recursion_limit_are_committed_and_merged(
    tmp_path: Path, ledger: Ledger, deep_cleanup: None
) -> None:
    """A command that nests directories 1,200 deep (a runaway copy, or on purpose): walking,
    reading and rebuilding the view's trees takes no recursion per level, so the commit, the
    merge and the removal of the agent's layers go through, and the work lands."""
    repo = make_repo(tmp_path / "repo")
    nest = (
        'cd src/app && python3 -c "import os\n'
        "for _ in range(1200): os.mkdir('d'); os.chdir('d')\n"
        "open('f.txt', 'w').write('deep\\n')\""
    )
    agent, outcomes = await _work_beside(repo, nest)
    ok = agent.status is AgentStatus.SUCCEEDED and outcomes == [MergeOutcome.MERGED]
    ledger.record(STOPPERS, "directories nested 1,200 deep", ok, str(agent.status_reason)[:80])
    assert agent.status is AgentStatus.SUCCEEDED, agent.status_reason
    _assert_work_landed(repo, outcomes)
    deep = "src/app/" + "d/" * 1200 + "f.txt"
    assert git(repo, "show", f"HEAD:{deep}") == "deep\n"
    assert not list((repo / ".git" / "fanout" / "layers").glob("*/*"))  # the layers are gone


# a command that makes, step by step, a path of 5,020 bytes below src/app
_LENGTHEN = (
    'cd src/app && python3 -c "import os\n'
    "for c in 'abcdefghijklmnopqrst': os.mkdir(c * 250); os.chdir(c * 250)\n"
    "open('f.txt', 'w').write('far\\n')\""
)


async def test_a_path_longer_than_the_system_takes_is_reported_and_the_rest_merged(
    tmp_path: Path, ledger: Ledger, deep_cleanup: None
) -> None:
    """A command can make, step by step, a path longer than any system call takes (4,096
    bytes); git could not add it. It is left out of the commit and named in the agent's
    result, and the rest of the work lands."""
    repo = make_repo(tmp_path / "repo")
    agent, outcomes = await _work_beside(repo, _LENGTHEN)
    dropped = agent.result.dropped_files if agent.result else []
    too_long = [d for d in dropped if "too long" in d]
    ok = agent.status is AgentStatus.SUCCEEDED and len(too_long) == 1
    ledger.record(STOPPERS, "a path past 4,096 bytes", ok, str(agent.status_reason)[:80])
    assert agent.status is AgentStatus.SUCCEEDED, agent.status_reason
    assert len(too_long) == 1 and too_long[0].startswith("src/app/" + "a" * 250 + "/"), dropped
    tree = _assert_work_landed(repo, outcomes)
    assert not any(p.startswith("src/app/aaa") for p in tree)
    assert not list((repo / ".git" / "fanout" / "layers").glob("*/*"))  # the layers are gone


async def test_in_a_worktree_a_directory_git_cannot_read_is_reported_not_passed_over(
    tmp_path: Path, ledger: Ledger, deep_cleanup: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a worktree (the fallback without views) libgit2 stages the work in-process, and its
    `add_all` passes over a directory it cannot read without a word: there git stages it
    instead, whose warning names the directory in the agent's result."""
    monkeypatch.setenv("FANOUT_WORKSPACES", "worktree")
    repo = make_repo(tmp_path / "repo")
    agent, outcomes = await _work_beside(repo, _LENGTHEN)
    dropped = agent.result.dropped_files if agent.result else []
    unread = [d for d in dropped if d.startswith("src/app/" + "a" * 250 + "/")]
    ok = agent.status is AgentStatus.SUCCEEDED and len(unread) == 1
    ledger.record(STOPPERS, "a path past 4,096 bytes, in a worktree", ok, str(dropped)[:80])
    assert agent.status is AgentStatus.SUCCEEDED, agent.status_reason
    assert len(unread) == 1 and "not committed" in unread[0], dropped
    tree = _assert_work_landed(repo, outcomes)
    assert not any(p.startswith("src/app/aaa") for p in tree)


async def test_a_named_pipe_where_git_reads_rules_never_holds_a_worktrees_listing(
    tmp_path: Path, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a worktree (the fallback without views) no walk removes the pipe before a listing:
    the listing's git is stopped at it and the listing walks, instead of waiting a minute at
    every `list_files` and `search`."""
    monkeypatch.setenv("FANOUT_WORKSPACES", "worktree")
    repo = make_repo(tmp_path / "repo")
    steps: list[Step] = [
        ("write_file", {"path": "src/app/work.py", "content": "WORK = 1\n"}),
        ("run_command", {"command": "mkfifo src/app/.gitignore"}),
        ("list_files", {"path": "src/app"}),
        ("search", {"pattern": "WORK", "path": "src/app"}),
    ]
    started = time.monotonic()
    with anyio.fail_after(120):
        status, outcomes = await _attack(repo, steps)
    took = time.monotonic() - started
    agent = status.runs[0].agents[0]
    ok = agent.status is AgentStatus.SUCCEEDED and took < 30
    ledger.record(STOPPERS, "a pipe at a worktree's .gitignore, listed", ok, f"{took:.1f} s")
    assert agent.status is AgentStatus.SUCCEEDED, agent
    assert took < 30  # git's own listing timeout is 60 s per call, and there are two calls
    dropped = agent.result.dropped_files if agent.result else []
    assert [d.split(" ")[0] for d in dropped] == ["src/app/.gitignore"]  # removed at the commit
    assert outcomes == [MergeOutcome.MERGED]
    assert (repo / "src/app/work.py").read_text() == "WORK = 1\n"


@pytest.mark.parametrize("workspace", ["view on a near base", "view on its own base", "worktree"])
async def test_a_resumed_agents_work_is_checked_out_without_the_users_filters(
    tmp_path: Path, ledger: Ledger, monkeypatch: pytest.MonkeyPatch, workspace: str
) -> None:
    """An interrupted agent's rerun resumes from its own commit: that checkout is the agent's
    files, not the user's, and the user's smudge filter, which its `.gitattributes` selects,
    must not run on them (the first checkout of the user's own base keeps it). A view of that
    commit stands on the run's base with the difference layered over it while that base is
    there and near; else (here: no base counted near) the commit is checked out as its own."""
    monkeypatch.setenv("FANOUT_WORKSPACES", "worktree" if workspace == "worktree" else "auto")
    if workspace == "view on its own base":
        monkeypatch.setattr(layered, "MAX_LAYERED_PATHS", 0)
    repo = make_repo(tmp_path / "repo")
    hook, marker = _users_program(tmp_path, "cat")
    steps: list[Step] = [*_pick_users_filter(), ("list_files", {})]
    gate = Gate({"ATTACK": 2})
    settings = Settings.model_validate({"repo": repo, "sandbox": "auto", "lease_ttl_s": 30.0})
    model = by_task({"ATTACK": steps}, gate=gate)
    async with Orchestrator(settings, lambda _name: model) as orch:
        spawned = await orch.spawn(
            SpawnRequest(tasks=[TaskSpec(prompt="ATTACK", name="a", write_scope=["src/app"])])
        )
        with anyio.fail_after(60):
            await gate.reached["ATTACK"].wait()  # its work is written; the server stops
    git(repo, "config", "filter.user.smudge", str(hook))
    resumed = by_task({"ATTACK": [("read_file", {"path": "src/app/work.py"})]})
    async with Orchestrator(settings, lambda _name: resumed) as orch:
        status = await orch.status(run_id=spawned.run_id)
        old = status.runs[0].agents[0]
        assert old.status is AgentStatus.INTERRUPTED
        assert old.result is not None and old.result.commit is not None
        rerun = await orch.rerun(old.agent_id)
        status = await wait_until_final(
            orch, spawned.run_id, statuses={AgentStatus.SUCCEEDED, AgentStatus.DISCARDED}
        )
        ran = marker.read_text() if marker.exists() else ""
        ledger.record(GUARANTEE, "a resumed agent's checkout", ran == "", ran.strip()[:80])
        assert ran == ""
        new = {a.agent_id: a for a in status.runs[0].agents}[rerun.agent.agent_id]
        assert new.status is AgentStatus.SUCCEEDED, new.status_reason
