"""`edit_tree` against git's own trees, for names libgit2's tree builder does not take."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pygit2
import pytest

from orchestration.workspace.tree_edits import TreeEdit, edit_tree


def _git(repo: Path, *args: str | bytes, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, check=True, env={**os.environ, **(env or {})}
    )
    return done.stdout.decode().strip()


def test_names_that_are_not_utf8_make_the_tree_git_makes(tmp_path: Path) -> None:
    """Entries named in bytes that are not UTF-8, among names that sort around them (a
    directory sorts as if its name ended in `/`): the tree is the one `git write-tree` writes
    for the same index, and `git fsck` finds nothing wrong with it."""
    repo = tmp_path / "r"
    _git(tmp_path, "init", "-q", str(repo))
    pyrepo = pygit2.Repository(str(repo))
    blob = pyrepo.create_blob(b"x\n")
    other = pyrepo.create_blob(b"y\n")
    base: dict[bytes, pygit2.Oid] = {
        b"a/f": blob,
        b"a.b": blob,
        b"a-c": blob,
        b"a0": blob,
        b"keep/\xe9t\xe9": blob,  # already in the base, not UTF-8
    }
    env = {"GIT_INDEX_FILE": str(tmp_path / "index")}

    def add(mode: str, oid: pygit2.Oid, path: bytes) -> None:
        _git(
            repo, "update-index", "--add", "--cacheinfo", f"{mode},{oid},".encode() + path, env=env
        )

    for path, oid in base.items():
        add("100644", oid, path)
    base_tree = pyrepo[pygit2.Oid(hex=_git(repo, "write-tree", env=env))].peel(pygit2.Tree)

    edits: dict[str, TreeEdit] = {
        os.fsdecode(b"a\xff"): (other, pygit2.enums.FileMode.BLOB),
        os.fsdecode(b"a/\xfe"): (other, pygit2.enums.FileMode.BLOB_EXECUTABLE),
        os.fsdecode(b"new\xe0/deep/f"): (blob, pygit2.enums.FileMode.BLOB),
        "a-c": None,
        os.fsdecode(b"keep/\xe9t\xe9"): None,
        "keep/plain": (other, pygit2.enums.FileMode.BLOB),
    }
    made = edit_tree(pyrepo, base_tree, edits)

    add("100644", other, b"a\xff")
    add("100755", other, b"a/\xfe")
    add("100644", blob, b"new\xe0/deep/f")
    add("100644", other, b"keep/plain")
    _git(repo, "update-index", "--force-remove", "a-c", b"keep/\xe9t\xe9", env=env)
    assert str(made) == _git(repo, "write-tree", env=env)
    _git(repo, "fsck", "--strict", "--no-progress")
    pyrepo.free()


def test_a_directory_written_in_bytes_keeps_libgit2s_checks_and_drops_a_gitlink(
    tmp_path: Path,
) -> None:
    """Beside a name that is not UTF-8, the other names of the directory are still checked
    as libgit2 checks them (no `.git` in any spelling), and a gitlink is deleted as any
    entry is."""
    repo = tmp_path / "r"
    _git(tmp_path, "init", "-q", str(repo))
    pyrepo = pygit2.Repository(str(repo))
    blob = pyrepo.create_blob(b"x\n")
    builder = pyrepo.TreeBuilder()
    builder.insert("sub", pygit2.Oid(hex="1" * 40), pygit2.enums.FileMode.COMMIT)
    builder.insert("f", blob, pygit2.enums.FileMode.BLOB)
    base = pyrepo[builder.write()].peel(pygit2.Tree)
    odd = os.fsdecode(b"caf\xe9")
    for planted in (".git", ".GIT", "GIT~1", ".git."):
        with pytest.raises(pygit2.GitError, match="invalid name"):
            edit_tree(
                pyrepo, base, {odd: (blob, pygit2.enums.FileMode.BLOB), planted: (blob, 0o100644)}
            )
    made = edit_tree(pyrepo, base, {odd: (blob, pygit2.enums.FileMode.BLOB), "sub": None})
    assert made is not None
    assert sorted(e.raw_name or b"" for e in pyrepo[made].peel(pygit2.Tree)) == [b"caf\xe9", b"f"]
    _git(repo, "fsck", "--strict", "--no-progress")
    pyrepo.free()
