"""Checkout and work commits in-process (libgit2) give exactly what git's own commands give.

Each case makes two workspaces of one base, applies the same edits to both, and commits one
with the libgit2 engine and the other with the git engine: the commits' trees, what was
dropped, the changes and the worktrees' `git status` must be the same. Repositories whose
files git would filter or re-encode, or whose refs have a transaction hook, go to git."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pygit2
import pytest

from orchestration import workspace as ws_mod
from orchestration.workspace import (
    GIT,
    CommitJob,
    GitEngine,
    GitRepo,
    InProcessFirst,
    Libgit2Git,
    WorkCommit,
    Workspace,
    commit_workspace,
    create_workspace,
)
from tests.orchestration.gitutil import (
    assert_fsck,
    git,
    head,
    isolated_git,  # pyright: ignore[reportUnusedImport]  # noqa: F401  (autouse fixture)
    make_repo,
    worktrees_only,  # pyright: ignore[reportUnusedImport]  # noqa: F401  (fixture)
    write,
)
from toolbus.gitcmd import Pinned
from toolbus.resources import WriteScope

BASE_FILES = {
    "src/a.py": "a = 1\n",
    "src/b.py": "b = 2\n",
    "src/tool.sh": "#!/bin/sh\necho hi\n",
    "docs/guide.md": "# guide\n",
    "docs/old.md": "old\n",
    ".gitignore": "*.log\nbuild/\n",
}
SCOPE = WriteScope.of(["src"])

Edit = Callable[[Path], None]

pytestmark = pytest.mark.usefixtures("worktrees_only")


def _edits_in_scope(root: Path) -> None:
    write(root, "src/a.py", "a = 10\n")
    write(root, "src/new/c.py", "c = 3\n")
    (root / "src/b.py").unlink()
    (root / "src/tool.sh").chmod(0o755)


def _ignored_and_empty(root: Path) -> None:
    write(root, "src/debug.log", "noise\n")
    write(root, "src/build/out.bin", "binary\n")
    (root / "src/empty").mkdir()
    write(root, "src/a.py", "a = 11\n")


def _out_of_scope(root: Path) -> None:
    write(root, "src/a.py", "a = 12\n")
    write(root, "docs/guide.md", "# changed outside the scope\n")
    write(root, "docs/new.md", "new outside\n")
    (root / "docs/old.md").unlink()


def _symlink_and_file_to_dir(root: Path) -> None:
    os.symlink("a.py", root / "src/link.py")
    (root / "src/b.py").unlink()
    write(root, "src/b.py/inner.py", "inner\n")


def _staged_by_the_agent(root: Path) -> None:
    write(root, "src/a.py", "a = 13\n")
    git(root, "add", "src/a.py")
    write(root, "src/a.py", "a = 14\n")  # the working tree wins, as with `git add -A`
    write(root, "src/staged_new.py", "s\n")
    git(root, "add", "src/staged_new.py")


def _nested_repository(root: Path) -> None:
    inner = root / "src/vendored"
    write(inner, "lib.py", "lib\n")
    git(inner, "init", "-q")
    git(inner, "add", "lib.py")
    git(inner, "commit", "-q", "-m", "inner")
    write(root, "src/a.py", "a = 15\n")


def _nothing(root: Path) -> None:
    del root


def _only_out_of_scope(root: Path) -> None:
    write(root, "docs/guide.md", "# only outside\n")


CASES: dict[str, Edit] = {
    "in_scope": _edits_in_scope,
    "ignored_and_empty": _ignored_and_empty,
    "out_of_scope": _out_of_scope,
    "symlink_and_file_to_dir": _symlink_and_file_to_dir,
    "staged_by_the_agent": _staged_by_the_agent,
    "nested_repository": _nested_repository,
    "nothing": _nothing,
    "only_out_of_scope": _only_out_of_scope,
}


@dataclass
class Recording:
    """An engine that records what the engine it wraps answered (True/None: declined)."""

    engine: GitEngine
    checkouts: list[bool] = field(default_factory=list[bool])
    commits: list[WorkCommit | None] = field(default_factory=list[WorkCommit | None])

    def checkout(self, pinned: Pinned, base: str) -> bool:
        self.checkouts.append(self.engine.checkout(pinned, base))
        return self.checkouts[-1]

    def commit(self, job: CommitJob) -> WorkCommit | None:
        self.commits.append(self.engine.commit(job))
        return self.commits[-1]


def _libgit2(**options: int) -> tuple[GitEngine, Recording]:
    """The server's engine (libgit2, git where it declines), with a record of libgit2's part."""
    recording = Recording(Libgit2Git(**options))
    return InProcessFirst(recording, GIT), recording


def _pair(root: Path, name: str) -> tuple[Workspace, Workspace]:
    repo = GitRepo(root)
    base = head(root)
    fast = create_workspace(repo, base_commit=base, run_id=f"in-{name}", agent_id="a")
    slow = create_workspace(repo, base_commit=base, run_id=f"git-{name}", agent_id="a")
    return fast, slow


def _tree(path: Path, rev: str) -> str:
    return git(path, "rev-parse", f"{rev}^{{tree}}").strip()


def files_of(root: Path) -> dict[str, tuple[int, str]]:
    """Every file below root except .git: (mode bits, content or link target)."""
    found: dict[str, tuple[int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if rel in (".git", ws_mod.WORKSPACE_META):
                continue
            st = path.lstat()
            body = os.readlink(path) if path.is_symlink() else path.read_text(encoding="utf-8")
            found[rel] = (st.st_mode & 0o777 if not path.is_symlink() else 0, body)
    return found


@pytest.mark.parametrize("case", sorted(CASES))
def test_in_process_commit_equals_git(tmp_path: Path, case: str) -> None:
    root = make_repo(tmp_path / "r", BASE_FILES)
    fast, slow = _pair(root, case)
    for w in (fast, slow):
        CASES[case](w.path)
    engine, ran = _libgit2()
    got = commit_workspace(fast, message="work", write_scope=SCOPE, engine=engine)
    # libgit2 did it (a nested repository's .git is moved out of the workspace first)
    assert ran.commits and ran.commits[0] is not None
    want = commit_workspace(slow, message="work", write_scope=SCOPE, engine=GIT)
    assert [p.split(" ")[0] for p in got.planted] == [p.split(" ")[0] for p in want.planted]
    assert bool(got.planted) == (case == "nested_repository")
    assert (got.commit is None) == (want.commit is None)
    assert got.dropped == want.dropped
    assert [c.model_dump() for c in got.changes] == [c.model_dump() for c in want.changes]
    if got.commit is not None and want.commit is not None:
        assert _tree(fast.path, got.commit) == _tree(slow.path, want.commit)
        assert git(fast.path, "rev-parse", "HEAD").strip() == got.commit
        parent = git(fast.path, "rev-parse", f"{got.commit}^").strip()
        assert parent == fast.base_commit
        log = git(fast.path, "log", "-1", "--format=%an|%cn|%B", got.commit)
        assert log == git(slow.path, "log", "-1", "--format=%an|%cn|%B", want.commit)
    # the worktrees' index and files agree (dropped edits stay on disk in both)
    assert git(fast.path, "status", "--porcelain") == git(slow.path, "status", "--porcelain")
    assert files_of(fast.path) == files_of(slow.path)
    assert_fsck(root)


def test_a_second_commit_goes_on_top(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r", BASE_FILES)
    fast, _ = _pair(root, "twice")
    write(fast.path, "src/a.py", "first\n")
    first = commit_workspace(fast, message="one", write_scope=SCOPE).commit
    write(fast.path, "src/a.py", "second\n")
    second = commit_workspace(fast, message="two", write_scope=SCOPE).commit
    assert first and second
    assert git(fast.path, "rev-parse", f"{second}^").strip() == first
    assert git(fast.path, "status", "--porcelain") == ""
    assert git(root, "rev-parse", f"refs/heads/{fast.branch}").strip() == second


def test_in_process_checkout_equals_git(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r", BASE_FILES)
    git(root, "update-index", "--chmod=+x", "src/tool.sh")
    os.symlink("src/a.py", root / "alias.py")
    git(root, "add", "alias.py")
    git(root, "commit", "-q", "-m", "mode and link")
    repo = GitRepo(root)
    engine, ran = _libgit2()
    fast = create_workspace(repo, base_commit=head(root), run_id="in", agent_id="a", engine=engine)
    assert ran.checkouts == [True]
    slow = create_workspace(repo, base_commit=head(root), run_id="git", agent_id="a", engine=GIT)
    assert files_of(fast.path) == files_of(slow.path)
    assert files_of(fast.path)["src/tool.sh"][0] & 0o111
    assert git(fast.path, "status", "--porcelain") == ""
    # the index was written with the files' stat data: nothing needs re-hashing
    assert git(fast.path, "diff-files", "--name-only") == ""
    listed = git(fast.path, "ls-files", "-s")
    assert listed == git(slow.path, "ls-files", "-s")


def _verdict(root: Path) -> bool:
    pyrepo = pygit2.Repository(str(root))
    try:
        return Libgit2Git().accepts(pyrepo, pyrepo.head.peel(pygit2.Tree))
    finally:
        pyrepo.free()


def test_plain_repository_goes_in_process(tmp_path: Path) -> None:
    assert _verdict(make_repo(tmp_path / "r", BASE_FILES))


def test_a_filter_driver_sends_the_work_to_git(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r", {**BASE_FILES, ".gitattributes": "*.bin filter=lfs\n"})
    assert _verdict(root)  # an attribute without a configured driver: git ignores it too
    git(root, "config", "filter.lfs.clean", "git-lfs clean -- %f")
    assert not _verdict(root)


def test_working_tree_encoding_sends_the_work_to_git(tmp_path: Path) -> None:
    files = {**BASE_FILES, "legacy/.gitattributes": "*.txt working-tree-encoding=UTF-16\n"}
    assert not _verdict(make_repo(tmp_path / "r", files))


def test_a_reference_transaction_hook_sends_the_work_to_git(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r", BASE_FILES)
    hook = root / ".git" / "hooks" / "reference-transaction"
    hook.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    hook.chmod(0o755)
    assert not _verdict(root)


def test_a_filter_driver_smudges_the_base_but_never_cleans_the_agents_work(
    tmp_path: Path,
) -> None:
    root = make_repo(tmp_path / "r", {**BASE_FILES, ".gitattributes": "*.up filter=upper\n"})
    git(root, "config", "filter.upper.clean", "tr a-z A-Z")
    git(root, "config", "filter.upper.smudge", "cat")
    engine, ran = _libgit2()
    repo = GitRepo(root)
    w = create_workspace(repo, base_commit=head(root), run_id="f", agent_id="a", engine=engine)
    assert ran.checkouts == [False]  # git checked the base out, with the user's smudge filter
    write(w.path, "src/shout.up", "quiet words\n")
    done = commit_workspace(w, message="filtered", write_scope=SCOPE, engine=engine)
    assert done.commit is not None
    # a filter program would run on content the agent wrote, picked by attributes the agent
    # may write: it never runs on the agent's work, which is committed as written
    assert git(w.path, "show", f"{done.commit}:src/shout.up") == "quiet words\n"


def test_a_moved_branch_is_refused_not_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_repo(tmp_path / "r", BASE_FILES)
    fast, _ = _pair(root, "moved")
    write(fast.path, "src/a.py", "mine\n")
    real_transaction = pygit2.Repository.transaction
    ref = f"refs/heads/{fast.branch}"

    def racing(self: pygit2.Repository) -> object:
        # another writer moves the branch after we read it and before we lock it
        tip = git(root, "rev-parse", ref).strip()
        other = git(root, "commit-tree", "-p", tip, "-m", "other", f"{tip}^{{tree}}").strip()
        git(root, "update-ref", ref, other)
        return real_transaction(self)

    monkeypatch.setattr(pygit2.Repository, "transaction", racing)
    with pytest.raises(ws_mod.RepositoryError, match="moved"):
        commit_workspace(fast, message="lost race", write_scope=SCOPE)
    monkeypatch.undo()
    # the other writer's commit is kept; our work is still on disk, to be committed again
    assert git(root, "log", "-1", "--format=%s", ref).strip() == "other"
    assert (fast.path / "src/a.py").read_text() == "mine\n"


def test_locks_left_by_a_killed_commit_are_cleared_for_recovery(tmp_path: Path) -> None:
    """A server killed inside a commit leaves the branch's ref lock and the worktree's index
    lock; they refuse the next commit until recovery clears them."""
    root = make_repo(tmp_path / "r", BASE_FILES)
    repo = GitRepo(root)
    fast, _ = _pair(root, "killed")
    write(fast.path, "src/a.py", "work of a killed server\n")
    ref_lock = root / ".git" / "refs" / "heads" / f"{fast.branch}.lock"
    ref_lock.write_text("", encoding="utf-8")
    admin = Path(git(fast.path, "rev-parse", "--absolute-git-dir").strip())
    (admin / "index.lock").write_text("", encoding="utf-8")
    with pytest.raises(ws_mod.RepositoryError, match="lock"):
        commit_workspace(fast, message="blocked", write_scope=SCOPE)
    removed = ws_mod.clear_dead_locks(repo, fast.path, fast.branch)
    assert sorted(removed) == sorted([ref_lock.name, "index.lock"])
    done = commit_workspace(fast, message="recovered", write_scope=SCOPE)
    assert done.commit is not None
    assert git(fast.path, "show", f"{done.commit}:src/a.py") == "work of a killed server\n"
    assert ws_mod.clear_dead_locks(repo, fast.path, fast.branch) == []
    assert_fsck(root)


def test_a_large_tree_is_checked_out_by_git(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r", BASE_FILES)
    repo = GitRepo(root)
    engine, ran = _libgit2()
    create_workspace(repo, base_commit=head(root), run_id="small", agent_id="a", engine=engine)
    smaller, ran_smaller = _libgit2(checkout_max_files=len(BASE_FILES) - 1)
    large = create_workspace(
        repo, base_commit=head(root), run_id="large", agent_id="a", engine=smaller
    )
    done = ran.checkouts + ran_smaller.checkouts
    assert done == [True, False]  # libgit2 for the small tree, git for the "large" one
    assert git(large.path, "status", "--porcelain") == ""
    assert sorted(files_of(large.path)) == sorted(BASE_FILES)
