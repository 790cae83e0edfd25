"""The cheaper paths of worktree creation and work commits behave as git's own commands would."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from orchestration.workspace import (
    GIT,
    LIBGIT2,
    GitEngine,
    GitRepo,
    commit_workspace,
    create_workspace,
    list_workspaces,
    pin_snapshot,
    remove_workspace,
    snapshot,
)
from orchestration.workspace import git as git_mod
from tests.orchestration.gitutil import (
    assert_fsck,
    git,
    head,
    isolated_git,  # pyright: ignore[reportUnusedImport]  # noqa: F401  (autouse fixture)
    make_repo,
    worktrees_only,  # pyright: ignore[reportUnusedImport]  # noqa: F401  (fixture)
    write,
)
from toolbus.resources import WriteScope

ENGINES = pytest.mark.parametrize("engine", [GIT, LIBGIT2], ids=["git", "libgit2"])

pytestmark = pytest.mark.usefixtures("worktrees_only")


@ENGINES
def test_registered_worktree_is_a_git_worktree_on_its_branch(
    tmp_path: Path, engine: GitEngine
) -> None:
    root = make_repo(tmp_path / "r", {"src/a.py": "a\n", "docs/d.md": "d\n"})
    repo = GitRepo(root)
    base = head(root)
    ws = create_workspace(repo, base_commit=base, run_id="run1", agent_id="ag1", engine=engine)
    assert git(ws.path, "rev-parse", "--abbrev-ref", "HEAD").strip() == "fanout/run1/ag1"
    assert git(ws.path, "rev-parse", "HEAD").strip() == base
    assert git(ws.path, "status", "--porcelain") == ""
    assert (ws.path / "src/a.py").read_text() == "a\n"
    listed = git(root, "worktree", "list", "--porcelain")
    assert f"worktree {ws.path}" in listed and "branch refs/heads/fanout/run1/ag1" in listed
    assert not (root / ".git" / "worktrees" / "ag1" / "locked").exists()
    assert [w.path for w in list_workspaces(repo)] == [ws.path]
    # idempotent; and removal through git works on it
    assert (
        create_workspace(repo, base_commit=base, run_id="run1", agent_id="ag1", engine=engine) == ws
    )
    remove_workspace(repo, ws, delete_branch=True)
    assert "ag1" not in git(root, "worktree", "list")
    assert_fsck(root)


@ENGINES
def test_a_retry_after_a_lost_directory_reuses_the_branch(
    tmp_path: Path, engine: GitEngine
) -> None:
    root = make_repo(tmp_path / "r", {"src/a.py": "a\n"})
    repo = GitRepo(root)
    base = head(root)
    ws = create_workspace(repo, base_commit=base, run_id="run1", agent_id="ag1", engine=engine)
    shutil.rmtree(ws.path)  # the directory vanished; registration and branch remain
    again = create_workspace(repo, base_commit=base, run_id="run1", agent_id="ag1", engine=engine)
    assert (again.path / "src/a.py").read_text() == "a\n"
    assert git(again.path, "rev-parse", "--abbrev-ref", "HEAD").strip() == "fanout/run1/ag1"


def test_a_post_checkout_hook_still_runs(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r", {"src/a.py": "a\n"})
    hook = root / ".git" / "hooks" / "post-checkout"
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text("#!/bin/sh\necho ran > hook-ran.txt\n")
    hook.chmod(0o755)
    ws = create_workspace(GitRepo(root), base_commit=head(root), run_id="run1", agent_id="ag1")
    assert (ws.path / "hook-ran.txt").read_text() == "ran\n"


@ENGINES
def test_commit_leaves_the_worktree_index_at_the_commit(tmp_path: Path, engine: GitEngine) -> None:
    root = make_repo(tmp_path / "r", {"src/a.py": "a\n", "docs/d.md": "d\n"})
    ws = create_workspace(
        GitRepo(root), base_commit=head(root), run_id="run1", agent_id="ag1", engine=engine
    )
    write(ws.path, "src/a.py", "changed\n")
    write(ws.path, "src/new.py", "new\n")
    write(ws.path, "docs/d.md", "out of scope\n")
    first = commit_workspace(ws, message="one", write_scope=WriteScope.of(["src"]), engine=engine)
    assert first.commit is not None and first.dropped == ["docs/d.md"]
    # only the dropped change shows: the index holds the commit
    assert git(ws.path, "status", "--porcelain") == " M docs/d.md\n"
    write(ws.path, "src/new.py", "newer\n")
    second = commit_workspace(ws, message="two", write_scope=WriteScope.of(["src"]), engine=engine)
    assert second.commit is not None
    assert git(root, "rev-parse", f"{second.commit}^").strip() == first.commit
    assert [c.path for c in second.changes] == ["src/new.py"]
    assert git(root, "show", f"{second.commit}:docs/d.md") == "d\n"
    nothing = commit_workspace(
        ws, message="three", write_scope=WriteScope.of(["src"]), engine=engine
    )
    assert nothing.commit is None and nothing.dropped == ["docs/d.md"]
    assert_fsck(root)


@ENGINES
def test_an_out_of_scope_file_replacing_a_directory_is_dropped(
    tmp_path: Path, engine: GitEngine
) -> None:
    root = make_repo(tmp_path / "r", {"src/a.py": "a\n", "lib/x/y.py": "y\n"})
    ws = create_workspace(
        GitRepo(root), base_commit=head(root), run_id="run1", agent_id="ag1", engine=engine
    )
    shutil.rmtree(ws.path / "lib" / "x")
    write(ws.path, "lib/x", "now a file\n")
    write(ws.path, "src/a.py", "mine\n")
    result = commit_workspace(ws, message="work", write_scope=WriteScope.of(["src"]), engine=engine)
    assert result.commit is not None
    assert sorted(result.dropped) == ["lib/x", "lib/x/y.py"]
    assert git(root, "show", f"{result.commit}:lib/x/y.py") == "y\n"
    assert git(root, "show", f"{result.commit}:src/a.py") == "mine\n"
    assert_fsck(root)


def test_snapshot_reads_head_branch_and_dirt_from_one_status(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r", {"src/a.py": "a\n"})
    base = head(root)
    clean = snapshot(GitRepo(root), "run1")
    assert (clean.base_commit, clean.branch_ref, clean.dirty) == (base, "refs/heads/main", False)
    git(root, "checkout", "-q", "--detach")
    write(root, "new dir/n.txt", "untracked\n")
    dirty = snapshot(GitRepo(root), "run2")
    assert dirty.head_commit == base and dirty.branch_ref is None and dirty.dirty
    assert dirty.untracked_included == ["new dir/n.txt"]
    assert git(root, "show", f"{dirty.base_commit}:new dir/n.txt") == "untracked\n"


def test_the_run_is_pinned_in_process_unless_git_would_run_a_hook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_repo(tmp_path / "r", {"src/a.py": "a\n"})
    base = head(root)
    started: list[tuple[str, ...]] = []
    run_git = git_mod.run_git

    def spy(cwd: Path, *args: str, **kwargs: Any) -> Any:
        started.append(args)
        return run_git(cwd, *args, **kwargs)

    monkeypatch.setattr(git_mod, "run_git", spy)
    pin_snapshot(GitRepo(root), "run1", base)
    assert git(root, "rev-parse", "refs/fanout/snapshots/run1").strip() == base
    assert not any("update-ref" in args for args in started)
    # a reference-transaction hook, which git runs and libgit2 would not: git makes the ref
    hook = root / ".git" / "hooks" / "reference-transaction"
    hook.write_text(f'#!/bin/sh\necho "$1" >> {tmp_path / "hook.log"}\n', encoding="utf-8")
    hook.chmod(0o755)
    pin_snapshot(GitRepo(root), "run2", base)
    assert git(root, "rev-parse", "refs/fanout/snapshots/run2").strip() == base
    assert any("update-ref" in args for args in started)
    assert "committed" in (tmp_path / "hook.log").read_text(encoding="utf-8")
