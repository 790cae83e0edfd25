"""`GitRepo.paths_at` lists a tree in-process for a small checkout and by git otherwise; both
give what `git ls-tree -r --name-only` gives, in its order, odd names included."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestration.workspace import git as git_mod
from orchestration.workspace.git import GitRepo
from tests.orchestration.gitutil import (
    git,
    isolated_git,  # pyright: ignore[reportUnusedImport]  # noqa: F401  (autouse fixture)
    make_repo,
)


def _odd_repo(tmp_path: Path) -> Path:
    root = make_repo(
        tmp_path / "r",
        {
            "a.b": "x\n",  # sorts before the directory a/ in git's order
            "a/b/c.txt": "c\n",
            "a b/with space.md": "s\n",
            "z/deep/er/file.py": "p\n",
            "Upper/ü.txt": "u\n",
        },
    )
    latin = os.fsencode(str(root)) + b"/caf\xe9.txt"  # a name that is not UTF-8
    with open(latin, "wb") as f:
        f.write(b"l\n")
    os.symlink("a.b", root / "link")
    (root / "new\nline").write_text("n\n", encoding="utf-8")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "odd names")
    # a gitlink (a submodule's commit), listed and not entered
    head = git(root, "rev-parse", "HEAD").strip()
    git(root, "update-index", "--add", "--cacheinfo", f"160000,{head},vendored")
    git(root, "commit", "-q", "-m", "gitlink")
    return root


def _by_git(root: Path) -> list[str]:
    """git's own listing, decoded as the server decodes git's output."""
    out = git_mod.run_git(root, "ls-tree", "-r", "--name-only", "-z", "HEAD").stdout
    return [p for p in out.split("\x00") if p]


def test_the_in_process_listing_is_gits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _odd_repo(tmp_path)
    repo = GitRepo(root)
    want = _by_git(root)
    assert len(want) == 9 and "vendored" in want
    listed = repo._paths_in_process("HEAD")  # pyright: ignore[reportPrivateUsage]
    assert listed == want
    assert repo.paths_at("HEAD") == want
    # over either bound, git lists it, the same
    monkeypatch.setattr(git_mod, "IN_PROCESS_LISTING_MAX", 3)
    assert repo._paths_in_process("HEAD") is None  # pyright: ignore[reportPrivateUsage]
    assert repo.paths_at("HEAD") == want
    monkeypatch.setattr(git_mod, "IN_PROCESS_LISTING_INDEX_BYTES", 10)
    assert repo._paths_in_process("HEAD") is None  # pyright: ignore[reportPrivateUsage]
    assert repo.paths_at("HEAD") == want
