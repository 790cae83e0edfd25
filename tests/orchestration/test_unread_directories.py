"""What git's own `add -A` (the commit of the worktree fallback when libgit2 declines) leaves
out with a warning is named in the agent's result: read from the warnings of a real git."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from orchestration.workspace.cli_git import unread_directories
from toolbus.trees import remove_tree


def test_a_directory_git_could_not_enter_is_named(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "ok.txt").write_text("kept\n")
    fd = os.open(repo, os.O_RDONLY | os.O_DIRECTORY)
    try:  # a path longer than any system call takes, made a step at a time
        for c in "abcdefghijklmnopqrst":
            os.mkdir(c * 250, dir_fd=fd)
            below = os.open(c * 250, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = below
        os.close(os.open("far.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
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
