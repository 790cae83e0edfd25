"""Walking and deleting the trees an agent made: as `os.walk` walks, at any depth, and
deleting them without following a link."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path

from toolbus.trees import remove_tree, walk

_Entry = tuple[str, list[str], list[str]]


def _nest(top: Path, depth: int) -> None:
    """`depth` directories `d` one in another below `top`, a file at the bottom (made step by
    step: `os.makedirs` itself recurses once per level)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            below = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = below
        out = os.open("bottom.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.close(out)
    finally:
        os.close(fd)


def lengthen(start: Path) -> None:
    """A path longer than any system call takes below `start` (twenty directories of 250
    bytes, made a step at a time), a file `far.txt` at its end."""
    fd = os.open(start, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for c in "abcdefghijklmnopqrst":
            os.mkdir(c * 250, dir_fd=fd)
            below = os.open(c * 250, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = below
        os.close(os.open("far.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


def _sample(tmp_path: Path) -> Path:
    top = tmp_path / "top"
    for rel in ("a/b/c.txt", "a/d.txt", "e.txt", "f/g/h/i.txt", "skip/x.txt"):
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        (top / rel).write_text(rel)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "kept.txt").write_text("the user's\n")
    os.symlink(tmp_path / "outside", top / "a" / "link")
    os.symlink("e.txt", top / "to-file")
    return top


def test_walk_walks_as_os_walk_does(tmp_path: Path) -> None:
    top = _sample(tmp_path)

    def listing(walker: Iterable[tuple[str, list[str], list[str]]]) -> list[_Entry]:
        out: list[_Entry] = []
        for here, dirs, files in walker:
            dirs[:] = [d for d in dirs if d != "skip"]  # pruned as os.walk allows
            out.append((here, sorted(dirs), sorted(files)))
        return sorted(out)

    assert listing(walk(top)) == listing(os.walk(top))
    assert any(here.endswith("/a") and "link" in dirs for here, dirs, _ in listing(walk(top)))
    assert not any("outside" in here or "skip" in here for here, _, _ in listing(walk(top)))


def test_walk_gives_what_it_cannot_read_to_onerror_as_os_walk_does(tmp_path: Path) -> None:
    """A directory whose path no system call takes (made a step at a time) is skipped, its
    error given to `onerror`, as `os.walk` gives it; the rest is walked."""
    top = tmp_path / "top"
    top.mkdir()
    (top / "kept.txt").write_text("x")
    lengthen(top)
    try:
        ours: list[OSError] = []
        theirs: list[OSError] = []
        walked = [here for here, _, _ in walk(top, onerror=ours.append)]
        assert [here for here, _, _ in os.walk(top, onerror=theirs.append)] == walked
        assert [e.errno for e in ours] == [e.errno for e in theirs] == [errno.ENAMETOOLONG]
        assert walked[0] == str(top) and len(walked) < 1 + 20  # not the deepest
    finally:
        remove_tree(top)


def test_walk_and_remove_go_past_the_recursion_limit(tmp_path: Path) -> None:
    top = tmp_path / "top"
    top.mkdir()
    _nest(top, 1500)
    walked = list(walk(top))
    assert len(walked) == 1501
    assert walked[-1][2] == ["bottom.txt"]
    remove_tree(top)
    assert not os.path.lexists(top)


def test_remove_tree_removes_links_and_leaves_what_they_point_at(tmp_path: Path) -> None:
    top = _sample(tmp_path)
    (top / "a").chmod(0o555)  # a directory its owner may not change
    remove_tree(top)
    assert not os.path.lexists(top)
    assert (tmp_path / "outside" / "kept.txt").read_text() == "the user's\n"


def test_remove_tree_of_a_file_a_link_or_nothing(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    os.symlink(tmp_path / "file", tmp_path / "link")
    remove_tree(tmp_path / "link")
    assert (tmp_path / "file").read_text() == "x"
    remove_tree(tmp_path / "file")
    remove_tree(tmp_path / "never-made")
    assert list(tmp_path.iterdir()) == []
