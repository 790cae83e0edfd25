"""`GitEngine` by git's own commands, pinned to the workspace's recorded git dir: what the
server falls back to whenever libgit2 declines."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import pygit2

from orchestration.workspace.diffs import file_changes
from orchestration.workspace.engine import (
    CommitJob,
    WorkCommit,
    base_entries,
    changed_paths,
    commit_message,
)
from orchestration.workspace.git import (
    FANOUT_IDENTITY,
    ZERO_OID,
    copy_index,
    run_git,
    seed_index,
    tree_of,
)
from toolbus.gitcmd import Pinned


class CliGit:
    """Checkout by `git reset --hard`; commits by `add -A`, `write-tree`, `commit-tree` and a
    compare-and-swap `update-ref`, staged in a temporary index. Never declines."""

    def checkout(self, pinned: Pinned, base: str) -> bool:
        del base  # the worktree's HEAD is the new branch, at the base already
        run_git(
            pinned.work_tree,
            "reset",
            "--hard",
            "--no-recurse-submodules",
            "--quiet",
            pinned=pinned,
        )
        return True

    def commit(self, job: CommitJob) -> WorkCommit:
        pyrepo, pinned, base = job.pyrepo, job.pinned, job.base
        cwd, git_dir = pinned.work_tree, pinned.git_dir
        head, head_tree = str(job.head.id), str(job.head.tree_id)
        fd, name = tempfile.mkstemp(prefix="fanout-index-", dir=git_dir)
        os.close(fd)
        index = Path(name)
        index.unlink()
        try:
            env = {"GIT_INDEX_FILE": str(index)}
            if not _index_is_at(pyrepo, git_dir / "index", head_tree, index):
                seed_index(cwd, git_dir / "index", index, head, env, pinned=pinned)
            added = run_git(cwd, "add", "-A", "--", ":/", env=env, pinned=pinned)
            unread = unread_directories(added.stderr)
            tree = run_git(cwd, "write-tree", env=env, pinned=pinned).stdout.strip()
            dropped: list[str] = []
            if tree != str(tree_of(pyrepo, base).id):
                changed = changed_paths(pyrepo, base, tree)
                dropped = sorted(p for p in changed if not job.write_scope.allows(p))
                if dropped:
                    _reset_paths(pyrepo, pinned, base, dropped, env)
                    tree = run_git(cwd, "write-tree", env=env, pinned=pinned).stdout.strip()
            dropped += unread
            if tree == head_tree:
                return WorkCommit(commit=None, changes=[], dropped=dropped)
            identity = job.author.env(author=True, committer=False)
            commit = run_git(
                cwd,
                "commit-tree",
                tree,
                "-p",
                head,
                "-m",
                commit_message(job.message),
                env=identity | FANOUT_IDENTITY.env(author=False),
                pinned=pinned,
            ).stdout.strip()
            run_git(
                cwd,
                "update-ref",
                "-m",
                "fanout: commit agent work",
                job.ref,
                commit,
                head,
                pinned=pinned,
            )
            on_branch = None if pyrepo.head_is_detached else pyrepo.references["HEAD"].target
            # bring the worktree's own index to the new commit (files on disk are not touched)
            if job.ref == "HEAD" or on_branch == job.ref:
                _install_index(pinned, index, commit)
        finally:
            index.unlink(missing_ok=True)
        return WorkCommit(
            commit=commit, changes=file_changes(pyrepo, head, commit), dropped=dropped
        )


# how `git add` says it could not enter a directory (nothing below it is added)
_UNREAD = "warning: could not open directory '"


def unread_directories(stderr: str) -> list[str]:
    """The directories `git add` could not enter, from its warnings, as the agent's result
    names what it left out. Git cuts a warning at about 4 KB, so a path too long for the
    system (the usual cause) may come without its reason."""
    out: list[str] = []
    for line in stderr.splitlines():
        if not line.startswith(_UNREAD):
            continue
        path, sep, reason = line[len(_UNREAD) :].partition("': ")
        why = reason.strip() if sep else "its path is too long for this system"
        shown = path.rstrip("/")
        shown = shown if len(shown) <= 300 else shown[:300] + "..."
        out.append(f"{shown} (git could not read it: {why}; it is not committed)")
    return out


def _index_is_at(pyrepo: pygit2.Repository, source: Path, tree: str, index: Path) -> bool:
    """Copy the worktree's index to `index` if it holds exactly `tree` (its stat data kept)."""
    try:
        if str(pygit2.Index(str(source)).write_tree(pyrepo)) != tree:
            return False
        copy_index(source, index)
    except (OSError, pygit2.GitError, ValueError):
        index.unlink(missing_ok=True)
        return False
    return True


def _install_index(pinned: Pinned, index: Path, commit: str) -> None:
    """Make `index` (which holds `commit`'s tree) the worktree's index, under git's index lock."""
    cwd, git_dir = pinned.work_tree, pinned.git_dir
    lock = git_dir / "index.lock"
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError:
        fd = None
    if fd is not None:
        os.close(fd)
        try:
            os.replace(index, git_dir / "index")
            return
        except OSError:
            pass
        finally:
            lock.unlink(missing_ok=True)
    if run_git(cwd, "read-tree", "-m", commit, check=False, pinned=pinned).returncode != 0:
        run_git(cwd, "read-tree", commit, pinned=pinned)


def _reset_paths(
    pyrepo: pygit2.Repository,
    pinned: Pinned,
    base: str,
    paths: Sequence[str],
    env: Mapping[str, str],
) -> None:
    """Set `paths` in the (temporary) index to their content in `base`, removing absent ones."""
    lines: list[str] = []
    for p, entry in base_entries(pyrepo, base, paths):
        if entry is None:
            lines.append(f"0 {ZERO_OID}\t{p}")  # absent in the base (or a directory there)
        else:
            lines.append(f"{int(entry.filemode):06o} {entry.id}\t{p}")
    run_git(
        pinned.work_tree,
        "update-index",
        "-z",
        "--index-info",
        input="\0".join(lines) + "\0",
        env=env,
        pinned=pinned,
    )
