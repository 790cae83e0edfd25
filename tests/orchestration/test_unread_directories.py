"""What git's own `add -A` (the commit of the worktree fallback when libgit2 declines) leaves
out with a warning is named in the agent's result: read from the warnings of a real git."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pygit2

from orchestration.workspace.cli_git import unread_directories
from orchestration.workspace.libgit2_git import _unreadable_below  # pyright: ignore[reportPrivateUsage]
from tests.toolbus.test_trees import lengthen
from toolbus.trees import remove_tree


def test_a_directory_git_could_not_enter_is_named(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "ok.txt").write_text("kept\n")
    lengthen(repo)
    try:
        added = subprocess.run(
            ["git", "-C", str(repo), "add", "-A", "--", ":/"],
            capture_output=True,
            text=True,
            check=True,
        )
        named = unread_directories(added.stderr)
        assert len(named) == 1, added.stderr[:300]
        assert named[0].startswith("a" * 250 + "/" + "b" * 49)
        assert "git could not read it" in named[0] and named[0].endswith("it is not committed)")
        assert len(named[0]) < 420
        assert unread_directories("warning: LF will be replaced by CRLF in x.txt\n") == []
        staged = subprocess.run(
            ["git", "-C", str(repo), "diff", "--cached", "--name-only"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert staged.stdout.split() == ["ok.txt"]
    finally:
        remove_tree(repo)


def test_libgit2_stages_only_where_it_can_read_whatever_git_would_add(tmp_path: Path) -> None:
    """libgit2's `add_all` passes over what it cannot read without a word, so the in-process
    commit declines (git stages it, and names it) where git would walk into such a place; not
    where git does not walk: an ignored directory the repository does not track, another
    repository. Git also stages a directory whose name is not UTF-8, which pygit2 cannot ask
    libgit2 about."""
    repo = tmp_path / "r"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text("cache/\n")
    (repo / "src").mkdir()
    (repo / "src" / "ok.txt").write_text("kept\n")
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "i"],
        check=True,
    )
    handle = pygit2.Repository(str(repo))
    tree = handle.head.peel(pygit2.Commit).tree
    try:
        assert not _unreadable_below(handle, tree)
        (repo / "cache").mkdir()
        lengthen(repo / "cache")
        (repo / "vendored" / ".git").mkdir(parents=True)
        lengthen(repo / "vendored")
        assert not _unreadable_below(handle, tree)  # ignored, or another repository's
        (repo / "cache" / os.fsdecode(b"caf\xe9")).mkdir()  # ignored: not walked into
        assert not _unreadable_below(handle, tree)
        (repo / os.fsdecode(b"caf\xe9")).mkdir()  # a name libgit2 cannot be asked about
        assert _unreadable_below(handle, tree)
        (repo / os.fsdecode(b"caf\xe9")).rmdir()
        lengthen(repo / "src")
        assert _unreadable_below(handle, tree)
    finally:
        handle.free()
        remove_tree(repo)
