"""The user's repository, snapshots of dirty work, agent worktrees and their commits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestration.errors import RepositoryError
from orchestration.workspace import (
    GIT,
    LIBGIT2,
    GitEngine,
    GitRepo,
    commit_workspace,
    create_workspace,
    diff,
    diffstat,
    ensure_registered,
    list_workspaces,
    remove_workspace,
    snapshot,
    workspace_disk_usage,
)
from orchestration.workspace.git import write_whole
from orchestration.workspace.worktrees import register_worktree
from tests.orchestration.gitutil import (
    assert_fsck,
    commit_files,
    git,
    head,
    isolated_git,  # pyright: ignore[reportUnusedImport]  # noqa: F401  (autouse fixture)
    make_repo,
    user_state,
    workspace_kind,  # pyright: ignore[reportUnusedImport]  # noqa: F401  (fixture)
    write,
)
from tests.orchestration.threads import race
from toolbus.resources import WriteScope

ENGINES = pytest.mark.parametrize("engine", [GIT, LIBGIT2], ids=["git", "libgit2"])

pytestmark = pytest.mark.usefixtures("workspace_kind")


def test_discover_finds_the_top_level_from_a_subdirectory(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r", {"src/a.py": "a\n"})
    repo = GitRepo.discover(root / "src")
    assert repo.root == root.resolve()
    assert repo.git_dir == (root / ".git").resolve()
    assert repo.state_dir == (root / ".git" / "fanout").resolve()
    assert repo.state_dir.is_dir()
    assert repo.canonical_ref() == "refs/heads/main"


def test_discover_outside_a_repository_says_what_to_do(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(RepositoryError, match="not a git repository: run `git init`"):
        GitRepo.discover(plain)


def test_a_repository_without_commits_is_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    repo = GitRepo.discover(root)
    with pytest.raises(RepositoryError, match="no commit yet"):
        snapshot(repo, "run1")


def test_git_failure_carries_stderr(tmp_path: Path) -> None:
    repo = GitRepo(make_repo(tmp_path / "r"))
    with pytest.raises(RepositoryError, match="no-such-rev"):
        repo.git("rev-parse", "--verify", "no-such-rev")


def test_clean_snapshot_is_head(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r")
    repo = GitRepo(root)
    snap = snapshot(repo, "run1")
    assert snap.base_commit == snap.head_commit == head(root)
    assert not snap.dirty
    assert snap.branch_ref == "refs/heads/main"
    assert head(root, "refs/fanout/snapshots/run1") == snap.base_commit
    assert git(root, "status", "--porcelain", "-uall") == ""
    assert_fsck(root)


def test_dirty_snapshot_captures_work_and_leaves_the_user_untouched(tmp_path: Path) -> None:
    root = make_repo(
        tmp_path / "r",
        {"a.txt": "a0\n", "b.txt": "b0\n", "gone.txt": "x\n", ".gitignore": "*.log\n"},
    )
    write(root, "a.txt", "a-staged\n")
    git(root, "add", "a.txt")
    write(root, "a.txt", "a-worktree\n")  # staged differs from the working tree
    write(root, "b.txt", "b-unstaged\n")
    (root / "gone.txt").unlink()
    write(root, "new/untracked.txt", "u\n")
    write(root, "debug.log", "ignored\n")
    before = user_state(root)
    index_bytes = (root / ".git" / "index").read_bytes()

    repo = GitRepo(root)
    snap = snapshot(repo, "run1")

    assert user_state(root) == before
    assert (root / ".git" / "index").read_bytes() == index_bytes
    assert snap.dirty
    assert snap.head_commit == head(root)
    assert snap.base_commit != snap.head_commit
    assert head(root, f"{snap.base_commit}^") == snap.head_commit
    assert head(root, "refs/fanout/snapshots/run1") == snap.base_commit
    assert snap.untracked_included == ["new/untracked.txt"]
    shown = git(root, "ls-tree", "-r", "--name-only", snap.base_commit).split()
    assert sorted(shown) == [".gitignore", "a.txt", "b.txt", "new/untracked.txt"]
    assert git(root, "show", f"{snap.base_commit}:a.txt") == "a-worktree\n"
    assert git(root, "show", f"{snap.base_commit}:b.txt") == "b-unstaged\n"
    # nothing of fanout's shows in the user's status
    assert ".git" not in before.status and "fanout" not in user_state(root).status
    assert_fsck(root)


def test_workspace_is_a_worktree_at_the_base_and_the_user_checkout_is_untouched(
    tmp_path: Path,
) -> None:
    root = make_repo(tmp_path / "r", {"src/a.py": "a\n", ".gitignore": ".env\nconfig/local.json\n"})
    write(root, ".env", "SECRET=1\n")
    write(root, "config/local.json", "{}\n")
    outside = tmp_path / "outside.txt"
    outside.write_text("not yours\n")
    os.symlink(outside, root / "config" / "escape.json")
    git(root, "add", "-f", "config/escape.json")  # make sure a tracked link is not copied twice
    git(root, "commit", "-q", "-m", "link")
    before = user_state(root)
    repo = GitRepo(root)
    base = head(root)

    ws = create_workspace(
        repo,
        base_commit=base,
        run_id="run1",
        agent_id="ag1",
        include=[".env", "config/*.json", "../outside.txt"],
    )

    assert ws.path == repo.state_dir / "worktrees" / "run1" / "ag1"
    assert ws.branch == "fanout/run1/ag1"
    assert [w.agent_id for w in list_workspaces(repo)] == ["ag1"]  # before git worked in it
    ensure_registered(ws)  # what the agent's first command does
    assert head(ws.path) == base
    assert head(root, "refs/heads/fanout/run1/ag1") == base
    assert (ws.path / "src" / "a.py").read_text() == "a\n"
    assert sorted(ws.included) == [".env", "config/local.json"]
    assert (ws.path / ".env").read_text() == "SECRET=1\n"
    assert not (ws.path / ".env").is_symlink()
    assert user_state(root) == before
    assert git(root, "status", "--porcelain", "-uall") == ""
    # asking again returns the same workspace
    again = create_workspace(repo, base_commit=base, run_id="run1", agent_id="ag1")
    assert again == ws
    assert [w.agent_id for w in list_workspaces(repo)] == ["ag1"]
    assert workspace_disk_usage(repo) > 0
    assert_fsck(root)


def test_bad_ids_are_refused(tmp_path: Path) -> None:
    repo = GitRepo(make_repo(tmp_path / "r"))
    with pytest.raises(RepositoryError, match="cannot name"):
        create_workspace(repo, base_commit="HEAD", run_id="../x", agent_id="a")


@ENGINES
def test_commit_workspace_commits_in_scope_and_drops_the_rest(
    tmp_path: Path,
    engine: GitEngine,
    workspace_kind: str,  # noqa: F811  (the fixture)
) -> None:
    root = make_repo(
        tmp_path / "r",
        {"src/a.py": "a\n", "src/old.py": "o\n", "docs/d.md": "d\n", ".gitignore": "*.pyc\n"},
    )
    repo = GitRepo(root)
    ws = create_workspace(
        repo, base_commit=head(root), run_id="run1", agent_id="ag1", engine=engine
    )
    write(ws.path, "src/a.py", "a\nb\n")
    write(ws.path, "src/new.py", "n1\nn2\n")
    (ws.path / "src" / "old.py").unlink()
    write(ws.path, "src/cache.pyc", "ignored")
    write(ws.path, "docs/d.md", "changed out of scope\n")
    write(ws.path, "stray.txt", "out of scope\n")

    result = commit_workspace(
        ws, message="agent work", write_scope=WriteScope.of(["src"]), engine=engine
    )

    assert result.commit is not None
    assert head(root, "refs/heads/fanout/run1/ag1") == result.commit
    changes = {c.path: c for c in result.changes}
    assert set(changes) == {"src/a.py", "src/new.py", "src/old.py"}
    assert changes["src/a.py"].status == "modified"
    assert (changes["src/a.py"].lines_added, changes["src/a.py"].lines_removed) == (1, 0)
    assert changes["src/new.py"].status == "added"
    assert changes["src/new.py"].lines_added == 2
    assert changes["src/old.py"].status == "deleted"
    assert changes["src/old.py"].blob is None
    assert result.dropped == ["docs/d.md", "stray.txt"]
    # dropped work stays on disk
    assert (ws.path / "stray.txt").read_text() == "out of scope\n"
    assert (ws.path / "docs" / "d.md").read_text() == "changed out of scope\n"
    tree = git(root, "ls-tree", "-r", "--name-only", result.commit).split()
    assert "stray.txt" not in tree and "src/cache.pyc" not in tree
    assert git(root, "show", f"{result.commit}:docs/d.md") == "d\n"
    if workspace_kind == "worktree":
        # the workspace's own status shows only the dropped paths (a view keeps its base's
        # index: its agent has ended, and rewriting the index would copy it whole)
        status = git(ws.path, "status", "--porcelain", "-uall").splitlines()
        assert sorted(s[3:] for s in status) == ["docs/d.md", "stray.txt"]

    # nothing new: no commit
    assert (
        commit_workspace(
            ws, message="again", write_scope=WriteScope.of(["src"]), engine=engine
        ).commit
        is None
    )
    # later edits go on top
    write(ws.path, "src/a.py", "a\nb\nc\n")
    second = commit_workspace(ws, message="more", write_scope=WriteScope.of(["src"]), engine=engine)
    assert second.commit is not None
    assert head(root, f"{second.commit}^") == result.commit
    assert [c.path for c in second.changes] == ["src/a.py"]
    stat = diffstat(repo, ws.base_commit, second.commit)
    assert (stat.files, stat.insertions, stat.deletions) == (3, 4, 1)
    text = diff(repo, ws.base_commit, second.commit)
    assert "+++ b/src/new.py" in text and "+c" in text
    assert git(root, "status", "--porcelain", "-uall") == ""
    assert_fsck(root)


@ENGINES
def test_commit_workspace_undoes_out_of_scope_commits_the_agent_made_itself(
    tmp_path: Path, engine: GitEngine
) -> None:
    root = make_repo(tmp_path / "r", {"src/a.py": "a\n", "docs/d.md": "d\n"})
    repo = GitRepo(root)
    ws = create_workspace(
        repo, base_commit=head(root), run_id="run1", agent_id="ag1", engine=engine
    )
    ensure_registered(ws)  # the agent runs git: its command registers the workspace
    commit_files(ws.path, {"docs/d.md": "sneaky\n", "src/a.py": "mine\n"}, "agent ran git")
    result = commit_workspace(
        ws, message="agent work", write_scope=WriteScope.of(["src"]), engine=engine
    )
    assert result.commit is not None
    assert result.dropped == ["docs/d.md"]
    assert git(root, "diff", "--name-only", ws.base_commit, result.commit).split() == ["src/a.py"]
    assert (ws.path / "docs" / "d.md").read_text() == "sneaky\n"
    assert_fsck(root)


@ENGINES
def test_read_only_scope_commits_nothing(tmp_path: Path, engine: GitEngine) -> None:
    root = make_repo(tmp_path / "r", {"a.txt": "a\n"})
    repo = GitRepo(root)
    ws = create_workspace(
        repo, base_commit=head(root), run_id="run1", agent_id="ag1", engine=engine
    )
    write(ws.path, "a.txt", "b\n")
    result = commit_workspace(ws, message="x", write_scope=WriteScope.of([]), engine=engine)
    assert result.commit is None
    assert result.dropped == ["a.txt"]
    assert (ws.path / "a.txt").read_text() == "b\n"


@ENGINES
def test_renames_are_reported(tmp_path: Path, engine: GitEngine) -> None:
    body = "".join(f"line {i}\n" for i in range(40))
    root = make_repo(tmp_path / "r", {"src/old_name.py": body})
    repo = GitRepo(root)
    ws = create_workspace(
        repo, base_commit=head(root), run_id="run1", agent_id="ag1", engine=engine
    )
    (ws.path / "src" / "old_name.py").rename(ws.path / "src" / "new_name.py")
    result = commit_workspace(ws, message="rename", write_scope=WriteScope.of(None), engine=engine)
    assert [(c.path, c.status, c.old_path) for c in result.changes] == [
        ("src/new_name.py", "renamed", "src/old_name.py")
    ]


def test_remove_workspace_only_on_request_and_prunes(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r")
    repo = GitRepo(root)
    ws = create_workspace(repo, base_commit=head(root), run_id="run1", agent_id="ag1")
    write(ws.path, "scratch.txt", "x\n")
    keep = create_workspace(repo, base_commit=head(root), run_id="run1", agent_id="ag2")
    remove_workspace(repo, ws, delete_branch=False)
    assert not ws.path.exists()
    assert head(root, "refs/heads/fanout/run1/ag1")  # branch kept
    assert [w.agent_id for w in list_workspaces(repo)] == ["ag2"]
    remove_workspace(repo, keep, delete_branch=True)
    assert git(root, "branch", "--list", "fanout/run1/ag2") == ""
    assert list_workspaces(repo) == []
    assert not (repo.worktrees_dir / "run1").exists()
    assert git(root, "worktree", "list").count("\n") == 1
    outside = ws.model_copy(update={"path": root})
    with pytest.raises(RepositoryError, match="refusing"):
        remove_workspace(repo, outside, delete_branch=False)
    assert_fsck(root)


@ENGINES
def test_commit_lands_on_the_agent_branch_even_if_the_agent_detached_head(
    tmp_path: Path, engine: GitEngine
) -> None:
    root = make_repo(tmp_path / "r", {"src/a.py": "a\n"})
    repo = GitRepo(root)
    ws = create_workspace(
        repo, base_commit=head(root), run_id="run1", agent_id="ag1", engine=engine
    )
    ensure_registered(ws)  # the agent runs git: its command registers the workspace
    git(ws.path, "checkout", "-q", "--detach")
    write(ws.path, "src/a.py", "b\n")
    result = commit_workspace(ws, message="work", write_scope=WriteScope.of(["src"]), engine=engine)
    assert result.commit is not None
    assert head(root, "refs/heads/fanout/run1/ag1") == result.commit
    assert head(root, f"{result.commit}^") == ws.base_commit
    assert (ws.path / "src" / "a.py").read_text() == "b\n"
    assert_fsck(root)


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no cleanup."""


@pytest.mark.parametrize("written", [0, 1, 2, 3, 4])
def test_a_registration_cut_short_at_any_point_leaves_git_consistent(
    tmp_path: Path, written: int
) -> None:
    """A server killed while registering a worktree: `git fsck --strict` and `git worktree
    list` are still clean, whatever the registration had written (`written` of its four
    files; 4: all of them, killed before it removed its `locked` marker)."""
    root = make_repo(tmp_path / "repo")
    repo = GitRepo.discover(root)
    done: list[Path] = []

    def cut(path: Path, text: str) -> None:
        if len(done) == written:
            raise _Killed
        write_whole(path, text)
        done.append(path)

    path = repo.git_dir / "fanout" / "worktrees" / "r1" / "r1-a1"
    admin = repo.git_dir / "worktrees" / path.name
    try:
        register_worktree(repo, path, "fanout/r1/r1-a1", head(root), write=cut)
    except _Killed:
        pass
    else:
        assert written == 4
        (admin / "locked").write_text("initializing\n", encoding="utf-8")
    assert len(done) == written
    assert (admin / "locked").is_file()
    assert_fsck(root)
    listed = git(root, "worktree", "list", "--porcelain")
    assert (f"worktree {path.resolve()}" in listed) is (written == 4)


def test_threads_writing_one_file_whole_never_share_a_temporary_file(tmp_path: Path) -> None:
    """Each writer's temporary file is its own: sixteen threads released at once all succeed,
    and the file holds one writer's text, whole."""
    target = tmp_path / "record"

    def one(n: int) -> None:
        for _ in range(20):
            write_whole(target, f"writer {n}\n" * 100)

    race(one, 16)  # (an error of any is raised)
    text = target.read_text(encoding="utf-8")
    assert len(set(text.splitlines())) == 1 and text.count("\n") == 100
    assert [p.name for p in tmp_path.iterdir()] == ["record"]


def test_the_state_dir_is_its_owners_alone(tmp_path: Path) -> None:
    # what agents' commands leave below it (set-ID files among them) no other user may run
    fresh = make_repo(tmp_path / "fresh")
    assert GitRepo(fresh).state_dir.stat().st_mode & 0o777 == 0o700
    older = make_repo(tmp_path / "older")
    (older / ".git" / "fanout").mkdir(mode=0o755)
    os.chmod(older / ".git" / "fanout", 0o755)
    assert GitRepo(older).state_dir.stat().st_mode & 0o777 == 0o700
