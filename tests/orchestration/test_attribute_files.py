"""The files git reads its rules from inside a workspace (`.gitattributes`, `.gitignore`,
`.gitmodules`) are the agent's content, and the server's commit must neither hang on them nor
read them otherwise than git does.

A named pipe opened for reading blocks until something writes to it: git and libgit2 both
open these files as they find them, so one the agent left there as a pipe (or a link to one)
would stop the commit, and the agent's finish, for good. And an agent's view is committed
with the attributes of its own files, as git's `hash-object` reads them: never with rules of
an index that the view's files do not hold, such as the ones the user stages in their own
repository while the agents work."""

from __future__ import annotations

import os
import threading
import time
from functools import partial
from pathlib import Path

import pytest

from orchestration.workspace import (
    GitRepo,
    WorkCommit,
    Workspace,
    commit_workspace,
    create_workspace,
)
from orchestration.workspace.layered import ensure_registered, layer_of, listing_git_dir
from tests.orchestration.gitutil import (
    assert_fsck,
    git,
    head,
    isolated_git,  # pyright: ignore[reportUnusedImport]  # noqa: F401  (autouse fixture)
    make_repo,
    needs_views,
    workspace_kind,  # pyright: ignore[reportUnusedImport]  # noqa: F401  (fixture)
    write,
)
from tests.toolbus.test_fileops import RevocableFence
from toolbus.fileops import FileOps
from toolbus.jail import Jail
from toolbus.resources import WriteScope

SCOPE = WriteScope.of(["src", ".gitattributes", ".gitignore"])
CRLF = b"x\r\ny\r\n"


def _commit_within(ws: Workspace, seconds: float = 20.0) -> WorkCommit:
    """`commit_workspace` in a thread, failing the test (not hanging it) past `seconds`."""
    out: list[WorkCommit] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(commit_workspace(ws, message="work", write_scope=SCOPE))
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        _unblock(ws.path)
        worker.join(10)
        pytest.fail(f"the commit of {ws.path} did not end within {seconds} s")
    if errors:
        raise errors[0]
    return out[0]


def _unblock(root: Path) -> None:
    """Open every named pipe under `root` for writing once, so that a reader stuck on one
    goes on (the test has failed by then; this only lets its thread end)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                continue
            os.close(fd)


def _blob(root: Path, rev: str) -> str:
    return git(root, "rev-parse", rev).strip()


def _raw_blob(root: Path, data: bytes) -> str:
    """The id of `data` stored as it is (no conversion)."""
    return git(root, "hash-object", "--stdin", "--no-filters", input=data.decode()).strip()


@pytest.mark.usefixtures("workspace_kind")
@pytest.mark.parametrize("place", ["root", "nested"])
def test_a_named_pipe_where_git_reads_rules_is_removed_before_the_commit(
    tmp_path: Path, place: str
) -> None:
    root = make_repo(tmp_path / "r", {"src/a.py": "a = 1\n", "src/keep.txt": "k\n"})
    repo = GitRepo(root)
    ws = create_workspace(repo, base_commit=head(root), run_id="run", agent_id="a")
    prefix = "" if place == "root" else "src/"
    for name in (".gitattributes", ".gitignore", ".gitmodules"):
        os.mkfifo(ws.path / f"{prefix}{name}")
    write(ws.path, "src/a.py", "a = 2\n")
    done = _commit_within(ws)
    assert done.commit is not None
    names = (".gitattributes", ".gitignore", ".gitmodules")
    removed = sorted(p.split(" ")[0] for p in done.planted)
    assert removed == sorted(f"{prefix}{n}" for n in names)
    assert all("named pipe" in p for p in done.planted)
    assert not any(os.path.lexists(ws.path / f"{prefix}{n}") for n in names)
    assert git(root, "diff", "--name-only", ws.base_commit, done.commit).split() == ["src/a.py"]
    assert_fsck(root)


@pytest.mark.usefixtures("workspace_kind")
def test_a_link_to_a_named_pipe_where_git_reads_rules_is_removed(tmp_path: Path) -> None:
    """A link to a file there stays, and is read as git reads it: not at all."""
    root = make_repo(tmp_path / "r", {"src/a.py": "a = 1\n"})
    repo = GitRepo(root)
    ws = create_workspace(repo, base_commit=head(root), run_id="run", agent_id="a")
    os.mkfifo(ws.path / "src" / "pipe")
    os.symlink("src/pipe", ws.path / ".gitignore")
    os.symlink("pipe", ws.path / "src" / ".gitattributes")
    write(ws.path, "src/rules", "*.tmp\n")
    os.symlink("rules", ws.path / "src" / ".gitignore")
    write(ws.path, "src/a.py", "a = 2\n")
    write(ws.path, "src/x.tmp", "not ignored: git reads no rules through a link\n")
    done = _commit_within(ws)
    assert done.commit is not None
    assert sorted(p.split(" ")[0] for p in done.planted) == [".gitignore", "src/.gitattributes"]
    assert all("a link to a named pipe" in p for p in done.planted)
    assert os.path.islink(ws.path / "src" / ".gitignore")
    changed = git(root, "diff", "--name-only", ws.base_commit, done.commit).split()
    assert changed == ["src/.gitignore", "src/a.py", "src/rules", "src/x.tmp"]


def _view_with(tmp_path: Path, files: dict[str, str], registered: bool) -> tuple[Path, Workspace]:
    root = make_repo(tmp_path / "r", files)
    ws = create_workspace(GitRepo(root), base_commit=head(root), run_id="run", agent_id="a")
    assert layer_of(ws) is not None
    if registered:
        ensure_registered(ws)
    return root, ws


@needs_views()
@pytest.mark.parametrize("registered", [False, True], ids=["not-registered", "registered"])
def test_attributes_the_user_stages_meanwhile_do_not_reach_a_views_commit(
    tmp_path: Path, registered: bool
) -> None:
    root, ws = _view_with(tmp_path, {"src/a.txt": "a\n"}, registered)
    # the user stages attributes in their own repository while the agent works
    write(root, ".gitattributes", "*.txt text\n")
    git(root, "add", ".gitattributes")
    (ws.path / "src" / "b.txt").write_bytes(CRLF)
    done = _commit_within(ws)
    assert done.commit is not None
    assert _blob(root, f"{done.commit}:src/b.txt") == _raw_blob(root, CRLF)
    assert git(root, "diff", "--name-only", ws.base_commit, done.commit).split() == ["src/b.txt"]


@needs_views()
@pytest.mark.parametrize("registered", [False, True], ids=["not-registered", "registered"])
@pytest.mark.parametrize(
    ("attributes", "converted"),
    [("*.md text\n", False), ("*.txt text\n*.md text\n", True), (None, False)],
    ids=["rule-dropped", "rule-kept", "file-deleted"],
)
def test_a_views_commit_reads_the_attributes_of_its_own_files(
    tmp_path: Path, registered: bool, attributes: str | None, converted: bool
) -> None:
    """The agent rewrote (or deleted) the base's `.gitattributes`: its new files are stored
    under the rules of its own `.gitattributes`, not of the base's."""
    root, ws = _view_with(
        tmp_path, {"src/a.txt": "a\n", ".gitattributes": "*.txt text\n"}, registered
    )
    if attributes is None:
        (ws.path / ".gitattributes").unlink()
    else:
        write(ws.path, ".gitattributes", attributes)
    (ws.path / "src" / "b.txt").write_bytes(CRLF)
    done = _commit_within(ws)
    assert done.commit is not None
    expected = b"x\ny\n" if converted else CRLF
    assert _blob(root, f"{done.commit}:src/b.txt") == _raw_blob(root, expected)


@needs_views()
@pytest.mark.parametrize("registered", [False, True], ids=["not-registered", "registered"])
def test_the_bases_attributes_still_convert_a_views_files(tmp_path: Path, registered: bool) -> None:
    root, ws = _view_with(
        tmp_path, {"src/a.txt": "a\n", "src/.gitattributes": "*.txt text\n"}, registered
    )
    (ws.path / "src" / "b.txt").write_bytes(CRLF)
    done = _commit_within(ws)
    assert done.commit is not None
    assert _blob(root, f"{done.commit}:src/b.txt") == _raw_blob(root, b"x\ny\n")


@needs_views()
def test_a_views_listing_does_not_wait_on_a_named_pipe_where_git_reads_rules(
    tmp_path: Path,
) -> None:
    """The listing's git reads every `.gitignore`: a pipe there would hold it until its
    timeout (a minute), then leave the agent a listing without git's ignore rules."""
    _, ws = _view_with(tmp_path, {"src/a.py": "a = 1\n", ".gitignore": "*.log\n"}, False)
    write(ws.path, "debug.log", "ignored\n")
    os.mkfifo(ws.path / "src" / ".gitignore")
    ops = FileOps(
        Jail(ws.path),
        WriteScope.of(["src"]),
        RevocableFence(),
        git_dir=partial(listing_git_dir, ws),
    )
    started = time.monotonic()
    listed = ops.list(pattern="*")
    assert time.monotonic() - started < 20
    assert listed.entries == [".gitignore", "src/a.py"]  # git's listing: the log is ignored
    assert not os.path.lexists(ws.path / "src" / ".gitignore")
