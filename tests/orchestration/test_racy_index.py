"""A copied index keeps git's racy-entry check. A file changed in the second its index was
written (same size, same times to the second) must be hashed again when the index is copied
(snapshots, the git engine's commits), not taken as unchanged because the copy is newer."""

from __future__ import annotations

import os
import time
from pathlib import Path

from orchestration.workspace.git import seed_index
from tests.orchestration.gitutil import (
    git,
    isolated_git,  # pyright: ignore[reportUnusedImport]  # noqa: F401  (autouse fixture)
    make_repo,
)


def test_a_change_in_the_index_second_is_staged_from_a_seeded_index(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r", {"a.py": "a = 2\n"})
    git(root, "config", "core.trustctime", "false")  # a test can set mtimes, not ctimes
    target, index = root / "a.py", root / ".git" / "index"
    second = time.time_ns() - 3_000_000_000  # the copy below is made seconds later
    os.utime(target, ns=(second, second))
    git(root, "add", "a.py")  # the entry records that mtime
    os.utime(index, ns=(second, second))  # the index written in the same second: racy
    with target.open("r+", encoding="utf-8") as f:  # same size, same inode, same mtime
        f.write("a = 3\n")
    os.utime(target, ns=(second, second))
    assert git(root, "diff-files", "--name-only") == "a.py\n"  # git sees it in the original
    seeded = root / ".git" / "seeded-index"
    env = {"GIT_INDEX_FILE": str(seeded)}
    seed_index(root, index, seeded, "HEAD", env)
    git(root, "add", "-A", env=env)
    tree = git(root, "write-tree", env=env).strip()
    assert git(root, "cat-file", "-p", f"{tree}:a.py") == "a = 3\n"
