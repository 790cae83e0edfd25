"""A view's quick commit goes through a libgit2 handle kept for every view on its base (its
work tree the base's checkout) wherever what libgit2 reads there is the view's: it must give
the commit a handle on the view itself gives, and leave the view to that handle where the
rules may differ (a rule file of the user's ignored environment, a base directory where the
view holds a file, a conversion of the file's bytes)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestration.workspace import GitRepo, Workspace, commits, layer_of, prepare_commit
from orchestration.workspace import layered as layered_mod
from orchestration.workspace.layered import (
    _attribute_files,  # pyright: ignore[reportPrivateUsage]
    _base_rules_hold,  # pyright: ignore[reportPrivateUsage]
    _config_of,  # pyright: ignore[reportPrivateUsage]
    _may_convert,  # pyright: ignore[reportPrivateUsage]
    quick_upper,
    view_commit_handle,
)
from tests.orchestration.gitutil import (
    git,
    isolated_git,  # pyright: ignore[reportUnusedImport]  # noqa: F401  (autouse fixture)
    make_repo,
    needs_views,
    write,
)
from tests.orchestration.test_quick_workspace_ops import (
    _assert_same_commit,  # pyright: ignore[reportPrivateUsage]
    _commit,  # pyright: ignore[reportPrivateUsage]
    _view,  # pyright: ignore[reportPrivateUsage]
    kernel_overlay,  # pyright: ignore[reportUnusedImport]  # noqa: F401  (autouse fixture)
)
from tests.orchestration.test_workspace_in_process import SCOPE

pytestmark = needs_views()

BASE = {
    ".gitignore": "*.log\nbuild/\n",
    "src/a.py": "a = 1\n",
    "src/pkg/b.py": "b = 2\n",
    "src/pkg/.gitignore": "*.tmp\n",
    "docs/guide.md": "# guide\n",
}


def _edit(path: Path) -> None:
    write(path, "src/a.py", "a = 10\n")
    write(path, "src/new.py", "n = 1\n")
    write(path, "src/debug.log", "ignored\n")
    write(path, "src/pkg/c.tmp", "ignored below\n")
    write(path, "src/pkg/c.py", "c = 3\n")
    write(path, "src/build/out.txt", "ignored dir\n")
    (path / "src/data.bin").write_bytes(b"\x00\x01binary\r\n\x00")
    (path / "src/crlf.py").write_bytes(b"x = 1\r\ny = 2\r\n")  # converted where text


def _dir_to_file(path: Path) -> None:
    for child in (path / "src/pkg").iterdir():
        child.unlink()
    (path / "src/pkg").rmdir()
    write(path, "src/pkg", "now a file\n")


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Which handle each quick commit took: 'kept', or 'view' (one opened on the view)."""
    took: list[str] = []
    kept, own = commits.view_commit_handle, commits.pin_and_open_view

    def kept_one(*args: object) -> object:
        got = kept(*args)  # type: ignore[arg-type]
        took.append("kept" if got is not None else "declined")
        return got

    def own_one(*args: object) -> object:
        took.append("view")
        return own(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(commits, "view_commit_handle", kept_one)
    monkeypatch.setattr(commits, "pin_and_open_view", own_one)
    return took


CONFIGS: dict[str, Callable[[Path], object]] = {
    "plain": lambda root: None,
    "crlf-attribute": lambda root: (root / ".git/info/attributes").write_text("*.py text\n"),
    "autocrlf": lambda root: git(root, "config", "core.autocrlf", "true"),
    # attributes that change no bytes but how a change is counted (a binary file's lines):
    # beyond the work tree, in the base, and staged by the user only (not in the agents' base)
    "diff-attribute": lambda root: (root / ".git/info/attributes").write_text("*.py -diff\n"),
    "committed-attributes": lambda root: (
        write(root, "src/.gitattributes", "*.py -diff\n"),
        git(root, "add", "src/.gitattributes"),
        git(root, "commit", "-q", "-m", "attributes"),
    ),
    "staged-attributes": lambda root: (
        write(root, "src/.gitattributes", "*.py -diff\n"),
        git(root, "add", "src/.gitattributes"),
    ),
}


NO_CONVERSION = ("plain", "diff-attribute", "committed-attributes", "staged-attributes")


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("edit", [_edit, _dir_to_file], ids=["files", "dir-to-file"])
def test_the_kept_handle_commits_as_the_views_own(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    config: str,
    edit: Callable[[Path], None],
) -> None:
    root = make_repo(tmp_path / "r", BASE)
    (root / ".git/info").mkdir(exist_ok=True)
    CONFIGS[config](root)
    repo = GitRepo(root)
    here, there = _view(repo, "q"), _view(repo, "t")
    for ws in (here, there):
        edit(ws.path)
    took = _spy(monkeypatch)
    got = _commit(here, wait=False)  # quick: through the kept handle where it may
    quick_took = list(took)
    want = _commit(there, wait=True)  # in a thread: through a handle on the view itself
    _assert_same_commit(root, here, got, want, config)
    assert got.commit is not None
    if config in NO_CONVERSION and edit is _edit:
        assert quick_took == ["kept"]
    else:  # a base directory where the view has a file; a conversion of a file's bytes
        assert quick_took == ["declined", "view"]
    if config in ("diff-attribute", "committed-attributes") and edit is _edit:
        # the attribute told: the Python files' changes are counted as binary ones
        counted = {c.path: c.lines_added for c in got.changes if c.path.endswith(".py")}
        assert counted and set(counted.values()) == {0}, counted
    assert took[len(quick_took) :] == ["view"]


def test_what_libgit2_may_misjudge_in_the_base_leaves_the_view_to_its_own_handle(
    tmp_path: Path,
) -> None:
    """Where the base's checkout may not tell a file's rules as the view does (a directory of
    the user's ignored environment laid under the view, a link in the base where the view has
    a directory, a directory at the file's path), or a conversion may apply to its bytes."""
    root = make_repo(tmp_path / "r", {"x": "x\n"})
    base, layers = tmp_path / "base", tmp_path / "layers"
    write(base, "src/a.py", "a\n")
    write(base, "lib/real/b.py", "b\n")
    (base / "linked").symlink_to("lib/real")
    (base / "dir.py").mkdir()
    layers.mkdir()
    listing = [("src", True), ("src/n.py", False)]
    pyrepo = GitRepo(root).open()
    pyrepo.workdir = str(base)

    def holds(entries: list[tuple[str, bool]] = listing) -> bool:
        converting = _may_convert(_attribute_files(pyrepo, _config_of(pyrepo)[1]))
        return _base_rules_hold(pyrepo, layers, str(base), entries, converting=converting)

    try:
        assert holds()
        assert not holds([("linked", True), ("linked/n.py", False)])
        assert not holds([("dir.py", False)])
        write(layers, "incl/0/path", "src\n")  # the user's `src` laid under the view
        assert not holds()
        assert holds([("lib", True), ("lib/n.py", False)])
        (layers / "incl/0/path").unlink()
        (layers / "incl/0").rmdir()
        write(base, "src/.gitattributes", "*.py diff=python\n")  # attributes, no conversion
        assert holds()
        write(base, "src/.gitattributes", "*.py text\n")
        assert not holds()
        (base / "src/.gitattributes").unlink()
        write(root, ".git/info/attributes", "*.py ident\n")
        assert not holds()
        (root / ".git/info/attributes").unlink()
        assert holds()
    finally:
        pyrepo.free()
    # (a handle reads core.autocrlf once: `view_commit_handle` opens another when it changed)
    git(root, "config", "core.autocrlf", "input")
    pyrepo = GitRepo(root).open()
    pyrepo.workdir = str(base)
    try:
        assert not holds()
    finally:
        pyrepo.free()


def test_one_handle_serves_the_views_of_a_base(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r", BASE)
    repo = GitRepo(root)
    handles: list[object] = []
    for n in range(3):
        ws = _view(repo, "k", f"a{n}")
        write(ws.path, "src/new.py", f"n = {n}\n")
        layers = layer_of(ws)
        assert layers is not None
        listing = quick_upper(layers, ws.base_commit)
        assert listing is not None
        got = view_commit_handle(ws, layers, listing)
        assert got is not None
        handles.append(got[1])
        assert got[0].work_tree == ws.path
    assert handles[0] is handles[1] is handles[2]
    # a setting libgit2 reads once takes a new handle
    git(root, "config", "core.autocrlf", "input")
    ws = _view(repo, "k", "a9")
    write(ws.path, "src/new.py", "n = 9\n")
    layers = layer_of(ws)
    assert layers is not None
    listing = quick_upper(layers, ws.base_commit)
    assert listing is not None
    assert view_commit_handle(ws, layers, listing) is None  # (and a conversion applies)
    git(root, "config", "--unset", "core.autocrlf")
    again = view_commit_handle(ws, layers, listing)
    assert again is not None and again[1] is not handles[0]
    layered_mod.drop_idle_view_handles(0.0)


def test_a_commit_prepared_through_the_kept_handle_is_finished_by_its_thread(
    tmp_path: Path,
) -> None:
    root = make_repo(tmp_path / "r", BASE)
    ws: Workspace = _view(GitRepo(root), "p")
    write(ws.path, "src/new.py", "n = 1\n")
    prepared = prepare_commit(ws, write_scope=SCOPE)
    assert prepared is not None and prepared.job.shared_handle
    finished: list[object] = []
    other = threading.Thread(target=lambda: finished.append(prepared.finish("work")))
    other.start()
    other.join()
    assert finished == [None]  # another thread's: the commit is made anew
    done = prepared.finish("work")
    assert done is not None and done.commit is not None
    prepared.close()
    assert git(root, "show", f"{done.commit}:src/new.py") == "n = 1\n"
