"""The jail: every way out is refused with a message that says what to do."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from toolbus.errors import FileNotFound, NotAFile, PathEscape
from toolbus.jail import Jail


@pytest.fixture
def root(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    (ws / "src" / "pkg").mkdir(parents=True)
    (ws / "src" / "pkg" / "mod.py").write_text("x = 1\n")
    (ws / ".git").write_text("gitdir: /somewhere/.git/worktrees/ws\n")  # a worktree's .git file
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    os.symlink(outside, ws / "out")
    os.symlink("../../..", ws / "src" / "pkg" / "up")
    os.symlink(".git", ws / "gitlink")
    os.symlink("src/pkg", ws / "pkglink")
    os.symlink(ws / "src", ws / "abs_inside")
    return ws


ESCAPES = [
    ("../x", "climbs out"),
    ("src/../../x", "climbs out"),
    ("/etc/passwd", "absolute path"),
    ("a\x00b", "NUL"),
    ("a/" * 2100, "longer than"),
    ("a/" + "b" * 300, "longer than 255"),
    (".git", "inside .git"),
    (".git/config", "inside .git"),
    ("sub/.git/HEAD", "inside .git"),
    (".GIT/config", "inside .git"),
    ("out/secret.txt", "symlink that leads outside"),
    ("out", "symlink that leads outside"),
    ("src/pkg/up/x", "symlink that leads outside"),
    ("gitlink/config", "into .git"),
]


@pytest.mark.parametrize(("path", "message"), ESCAPES)
def test_escapes_are_refused(root: Path, path: str, message: str) -> None:
    with pytest.raises(PathEscape, match=message):
        Jail(root).resolve(path)


def test_plain_and_inside_symlink_paths_resolve_to_real_paths(root: Path) -> None:
    jail = Jail(root)
    assert jail.resolve("src/pkg/mod.py") == "src/pkg/mod.py"
    assert jail.resolve("./src//pkg/") == "src/pkg"
    assert jail.resolve("pkglink/mod.py") == "src/pkg/mod.py"
    assert jail.resolve("abs_inside/pkg/mod.py") == "src/pkg/mod.py"
    assert jail.resolve("new/dir/file.txt") == "new/dir/file.txt"
    assert jail.resolve("") == ""
    assert jail.resolve(".gitignore") == ".gitignore"


def test_file_used_as_directory(root: Path) -> None:
    with pytest.raises(NotAFile, match="not a directory"):
        Jail(root).resolve("src/pkg/mod.py/x")


def test_open_dir_refuses_a_symlink_swapped_in_after_resolution(root: Path, tmp_path: Path) -> None:
    jail = Jail(root)
    real = jail.resolve("src/pkg/mod.py")
    (root / "src" / "pkg").rename(root / "src" / "moved")
    os.symlink(tmp_path / "outside", root / "src" / "pkg")
    with pytest.raises(PathEscape, match="became a symlink"):
        jail.open_dir(real.rpartition("/")[0])


def test_open_dir_creates_missing_directories_only_when_asked(root: Path) -> None:
    jail = Jail(root)
    with pytest.raises(FileNotFound):
        jail.open_dir("a/b")
    fd = jail.open_dir("a/b", create=True)
    os.close(fd)
    assert (root / "a" / "b").is_dir()


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFound):
        Jail(tmp_path / "nope")


@pytest.mark.parametrize("proc", [True, False], ids=["proc", "no-proc"])
def test_the_root_is_the_real_directory(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, proc: bool
) -> None:
    """A root named through a link is the directory's real path, which the checks of links
    inside compare with; a file is no root. Without `/proc`, the path is looked at instead."""
    if not proc:
        readlink = os.readlink

        def no_proc(path: str) -> str:
            if path.startswith("/proc/"):
                raise FileNotFoundError(path)
            return readlink(path)

        monkeypatch.setattr(os, "readlink", no_proc)
    os.symlink(root, tmp_path / "via")
    jail = Jail(tmp_path / "via")
    assert jail.root == Path(os.path.realpath(root))
    with pytest.raises(PathEscape, match="leads outside"):
        jail.resolve("out/secret.txt")
    with pytest.raises(FileNotFound):
        Jail(root / "src" / "pkg" / "mod.py")
