"""A view's commit, quick (in the event loop's thread) or waited for (in a worker thread), when
what the agent left in its view is hostile: a directory swapped for a link out of the view, a
file swapped for a named pipe, names and attributes git treats apart. The commit reads nothing
beyond a link, never blocks, and makes the tree honest `git add -A` makes where git takes the
change; where git refuses an entry, that entry is left out and reported, the rest committed."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestration.workspace import GitRepo, WouldBlock, commit_workspace
from orchestration.workspace import layered as layered_module
from orchestration.workspace.engine import WorkCommit
from tests.orchestration.gitutil import (
    git,
    isolated_git,  # pyright: ignore[reportUnusedImport]  # noqa: F401  (autouse fixture)
    make_repo,
    needs_views,
    write,
)
from tests.orchestration.test_quick_workspace_ops import (
    _view,  # pyright: ignore[reportPrivateUsage]
    kernel_overlay,  # pyright: ignore[reportUnusedImport]  # noqa: F401  (autouse fixture)
)
from toolbus.resources import WriteScope

pytestmark = needs_views()

BASE = {
    ".gitignore": "*.log\nbuild/\n",
    "src/a.py": "a = 1\n",
    "src/pkg/b.py": "b = 2\n",
    "docs/guide.md": "# guide\n",
}
WAYS = pytest.mark.parametrize("wait", [False, True], ids=["quick", "thread"])


def _commit(ws: object, wait: bool, scope: WriteScope | None = None) -> WorkCommit:
    try:
        return commit_workspace(
            ws,  # pyright: ignore[reportArgumentType]
            message="w",
            write_scope=scope or WriteScope.of(None),
            wait=wait,
        )
    except WouldBlock:
        pytest.skip("this view's commit is not quick")


def _tree(root: Path, done: WorkCommit, base: str) -> str:
    return git(root, "rev-parse", f"{done.commit or base}^{{tree}}").strip()


def _honest(tmp: Path, root: Path, edit: Callable[[Path], None]) -> str:
    plain = tmp / "plain"
    git(tmp, "clone", "-q", str(root), str(plain))
    edit(plain)
    git(plain, "add", "-A")
    return git(plain, "write-tree").strip()


def _outside(tmp: Path) -> Path:
    outside = tmp / "outside"
    (outside / "pkg").mkdir(parents=True)
    (outside / "pkg" / "b.py").write_text("SECRET FROM OUTSIDE\n")
    (outside / "config.txt").write_text("SECRET FROM OUTSIDE\n")
    return outside


def _swap_for_link(target: Path, rel: str) -> Callable[[Path], None]:
    def edit(view: Path) -> None:
        shutil.rmtree(view / rel)
        os.symlink(target, view / rel)

    return edit


def _utf16_with_its_attribute(view: Path) -> None:
    write(view, "src/.gitattributes", "*.txt working-tree-encoding=UTF-16\n")
    (view / "src" / "u.txt").write_bytes("héllo\n".encode("utf-16"))


CASES: dict[str, Callable[[Path, Path], Callable[[Path], None]]] = {
    # a tracked directory swapped for a link out of the view: its files are gone, as git sees
    "directory-made-a-link-out": lambda tmp, _root: _swap_for_link(_outside(tmp), "src"),
    # a link to a directory, named as `build/` ignores directories: git commits the link
    "link-named-like-an-ignored-directory": lambda _tmp, _root: (
        lambda view: os.symlink("pkg", view / "src" / "build")
    ),
    # the agent's own attributes name one libgit2 does not apply: git stores UTF-8
    "working-tree-encoding-of-the-agent": lambda _tmp, _root: _utf16_with_its_attribute,
}


@WAYS
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_commit_is_honest_gits(tmp_path: Path, case: str, wait: bool) -> None:
    root = make_repo(tmp_path / "r", BASE)
    edit = CASES[case](tmp_path, root)
    ws = _view(GitRepo(root), "a")
    edit(ws.path)
    want = _honest(tmp_path, root, edit)
    done = _commit(ws, wait)
    assert _tree(root, done, ws.base_commit) == want
    found = subprocess.run(["git", "grep", "-q", "-e", "SECRET", want], cwd=root, check=False)
    assert found.returncode == 1  # nothing from outside the view


@WAYS
def test_nothing_beyond_a_link_above_the_scope_is_read(tmp_path: Path, wait: bool) -> None:
    root = make_repo(tmp_path / "r", BASE)
    ws = _view(GitRepo(root), "a")
    _swap_for_link(_outside(tmp_path), "src")(ws.path)
    done = _commit(ws, wait, WriteScope.of(["src/pkg"]))
    # as git sees it, src/pkg/b.py is gone (in scope); the link and src/a.py are not in scope
    assert [(c.path, c.status) for c in done.changes] == [("src/pkg/b.py", "deleted")]
    assert done.dropped == ["src", "src/a.py"]
    assert git(root, "ls-tree", "-r", "--name-only", str(done.commit)).split() == [
        ".gitignore",
        "docs/guide.md",
        "src/a.py",
    ]


@WAYS
def test_what_git_refuses_is_left_out_and_the_rest_committed(tmp_path: Path, wait: bool) -> None:
    root = make_repo(tmp_path / "r", BASE)
    ws = _view(GitRepo(root), "a")
    os.symlink("src/a.py", ws.path / ".gitmodules")  # git: "invalid path '.gitmodules'"
    write(ws.path, ".GIT", "x\n")  # git: "invalid path '.GIT'"
    write(ws.path, "src/new.py", "n = 1\n")
    done = _commit(ws, wait)
    assert [c.path for c in done.changes] == ["src/new.py"]
    assert done.dropped == [".gitmodules (a symbolic link named .gitmodules, which git refuses)"]
    assert done.planted == [".GIT (a .git the agent made; moved out of the workspace)"]
    assert not (ws.path / ".GIT").exists()


@WAYS
def test_a_file_swapped_for_a_pipe_while_hashed_does_not_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wait: bool
) -> None:
    root = make_repo(tmp_path / "r", BASE)
    ws = _view(GitRepo(root), "a")
    write(ws.path, "src/new.py", "n = 1\n")
    victim = ws.path / "src" / "new.py"
    real_hash = layered_module._hash  # pyright: ignore[reportPrivateUsage]

    def swapped_first(*args: object, **kwargs: object) -> object:
        # what a process the agent left behind may do between the listing and the hashing
        victim.unlink()
        os.mkfifo(victim)
        return real_hash(*args, **kwargs)  # pyright: ignore[reportArgumentType]

    monkeypatch.setattr(layered_module, "_hash", swapped_first)
    outcome: list[object] = []

    def commit() -> None:
        try:
            outcome.append(_commit(ws, wait))
        except BaseException as exc:  # (reported below)
            outcome.append(exc)

    # a blocked reader is let go after 20 s, so that a failing run ends
    rescue = subprocess.Popen(["sh", "-c", f"sleep 20; [ -p '{victim}' ] && : > '{victim}'"])
    try:
        worker = threading.Thread(target=commit, daemon=True)
        worker.start()
        worker.join(15)
        assert outcome, "the commit blocked on a named pipe the agent swapped in"
    finally:
        rescue.kill()
        rescue.wait()
    if isinstance(outcome[0], pytest.skip.Exception):
        pytest.skip("this view's commit is not quick")
    assert not isinstance(outcome[0], BaseException) or "pipe" in str(outcome[0]), outcome
