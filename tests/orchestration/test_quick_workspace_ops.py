"""Workspace operations made on the event loop when they are quick, in a thread otherwise.

A view's creation on a base that is checked out, and its commit when the upper layer is small,
run without `wait` (`WouldBlock` otherwise, with nothing changed); they must give what the same
operation allowed to wait gives, and decline whatever could wait or grow with the repository or
the change: a base not checked out or locked, included files, a worktree, fuse-overlayfs,
deletions (whiteouts, opaque directories, which stand for base subtrees), many or large files.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orchestration.workspace import (
    BaseNotReady,
    GitRepo,
    WorkCommit,
    Workspace,
    WouldBlock,
    commit_workspace,
    create_workspace,
    layer_of,
    layered,
    prepare_commit,
)
from orchestration.workspace.diffs import file_changes
from orchestration.workspace.git import tree_of
from orchestration.workspace.layered import (
    QUICK_COMMIT_BYTES,
    QUICK_COMMIT_ENTRIES,
    QUICK_COMMIT_INDEX_BYTES,
    _candidates,  # pyright: ignore[reportPrivateUsage]
    ensure_registered,
    quick_upper,
    view_git_dir,
)
from orchestration.workspace.overlay import FUSE, OVERLAY, probe_overlay
from orchestration.workspace.pinning import (
    commit_git_dir,
    pin_and_open,
    pin_and_open_view,
    secure_workspace_git,
)
from tests.orchestration.gitutil import (
    git,
    head,
    isolated_git,  # pyright: ignore[reportUnusedImport]  # noqa: F401  (autouse fixture)
    make_repo,
    needs_views,
    write,
)
from tests.orchestration.test_views import RUNS_GIT
from tests.orchestration.test_workspace_in_process import BASE_FILES, CASES, SCOPE, files_of
from tests.orchestration.threads import race
from toolbus.resources import WriteScope

pytestmark = needs_views()


@pytest.fixture(autouse=True)
def kernel_overlay(tmp_path: Path) -> None:
    scratch = tmp_path / "probe"
    scratch.mkdir()
    support = probe_overlay(scratch, None)
    if support.kind != OVERLAY:
        pytest.skip(support.note)


def _view(repo: GitRepo, run: str, agent: str = "a") -> Workspace:
    return create_workspace(repo, base_commit=head(repo.root), run_id=run, agent_id=agent)


def _commit(ws: Workspace, *, wait: bool) -> WorkCommit:
    return commit_workspace(ws, message="work", write_scope=SCOPE, wait=wait)


def _branch_head(root: Path, ws: Workspace) -> str:
    return git(root, "rev-parse", ws.branch_ref).strip()


def _edited_cases(
    root: Path, here: str, there: str
) -> Iterator[tuple[str, Workspace, Workspace, tuple[str, dict[str, tuple[int, str]]]]]:
    """For each case: two views of the repository at `root` with the same edit of it, and the
    first one's branch head and files before anything commits it."""
    repo = GitRepo(root)
    for case, edit in sorted(CASES.items()):
        views = _view(repo, f"{here}-{case}"), _view(repo, f"{there}-{case}")
        for w in views:
            if case in RUNS_GIT:
                ensure_registered(w)  # the agent's git command registers its view
            edit(w.path)
        yield case, *views, (_branch_head(root, views[0]), files_of(views[0].path))


def _assert_same_commit(
    root: Path, ws: Workspace, got: WorkCommit, want: WorkCommit, case: str
) -> None:
    assert (got.commit is None) == (want.commit is None), case
    assert got.dropped == want.dropped, case
    assert [p.split(" ")[0] for p in got.planted] == [p.split(" ")[0] for p in want.planted]
    assert [c.model_dump() for c in got.changes] == [c.model_dump() for c in want.changes]
    assert got.parent == want.parent == ws.base_commit
    if got.commit is not None and want.commit is not None:
        assert git(root, "rev-parse", f"{got.commit}^{{tree}}") == git(
            root, "rev-parse", f"{want.commit}^{{tree}}"
        )


def test_a_quick_commit_is_the_commit_made_in_a_thread(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r", BASE_FILES)
    quick: list[str] = []
    for case, here, there, before in _edited_cases(root, "q", "t"):
        try:
            got = _commit(here, wait=False)
            quick.append(case)
        except WouldBlock:
            # declined with nothing changed: the branch and the files are as they were
            assert (_branch_head(root, here), files_of(here.path)) == before
            got = _commit(here, wait=True)
        _assert_same_commit(root, here, got, _commit(there, wait=True), case)
    # the cases without deletions are quick; those that delete a base file (a whiteout) not
    assert set(quick) == set(CASES) - {"in_scope", "out_of_scope", "symlink_and_file_to_dir"}


def test_large_or_deleting_layers_are_not_quick(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r", BASE_FILES)
    repo = GitRepo(root)

    def layers_after(agent: str, edit: Callable[[Path], object]) -> tuple[Path, str]:
        ws = _view(repo, "r1", agent)
        edit(ws.path)
        layers = layer_of(ws)
        assert layers is not None
        return layers, ws.base_commit

    assert quick_upper(*layers_after("small", lambda p: write(p, "src/n.py", "n\n"))) is not None
    assert quick_upper(*layers_after("del", lambda p: (p / "docs/old.md").unlink())) is None

    def replace_dir(p: Path) -> None:
        for f in (p / "docs").iterdir():
            f.unlink()
        (p / "docs").rmdir()
        write(p, "docs/new.md", "new\n")  # an opaque directory over the base's docs/

    assert quick_upper(*layers_after("opaque", replace_dir)) is None

    def many(p: Path) -> None:
        for n in range(QUICK_COMMIT_ENTRIES + 1):
            write(p, f"src/many/f{n}.py", "x\n")

    assert quick_upper(*layers_after("many", many)) is None
    big = "x" * (QUICK_COMMIT_BYTES + 1)
    assert quick_upper(*layers_after("big", lambda p: write(p, "src/big.txt", big))) is None
    layers, base = layers_after("fuse", lambda p: write(p, "src/n.py", "n\n"))
    (layers / "driver").write_text(FUSE + "\n", encoding="ascii")
    assert quick_upper(layers, base) is None
    ws = _view(repo, "r1", "quick")
    write(ws.path, "src/n.py", "n\n")
    assert _commit(ws, wait=False).commit is not None


def test_the_quick_listing_gives_the_candidates_a_walk_gives(tmp_path: Path) -> None:
    """The quick commit takes its candidates from the entries `quick_upper` read; they are
    those a walk of the upper layer finds, `.git` directories left out below any depth."""
    root = make_repo(tmp_path / "r", BASE_FILES)
    repo = GitRepo(root)
    ws = _view(repo, "c")
    write(ws.path, "src/new/deep/a.py", "a\n")
    write(ws.path, "src/n.py", "n\n")
    os.symlink("n.py", ws.path / "src" / "link")
    write(ws.path, "sub/.GIT/config", "[core]\n")
    write(ws.path, "sub/.git/HEAD", "ref: refs/heads/main\n")
    write(ws.path, "other/.git", "gitdir: elsewhere\n")
    layers = layer_of(ws)
    assert layers is not None
    listing = quick_upper(layers, ws.base_commit)
    assert listing is not None
    pyrepo = repo.open()
    try:
        base_tree = tree_of(pyrepo, ws.base_commit)
        walked = _candidates(layers / "upper", base_tree, OVERLAY)
        assert _candidates(layers / "upper", base_tree, OVERLAY, listing) == walked
    finally:
        pyrepo.free()
    assert {"src/new/deep/a.py", "src/n.py", "src/link", "other/.git"} <= walked
    assert not any(".git/" in rel.casefold() for rel in walked)


def test_securing_a_view_from_the_quick_listing_finds_what_a_walk_finds(tmp_path: Path) -> None:
    """The planted `.git`s and the links to pipes where git reads rules are found alike in the
    entries `quick_upper` read and by a walk of the upper layer, and reported in one order."""
    root = make_repo(tmp_path / "r", BASE_FILES)
    repo = GitRepo(root)
    os.mkfifo(tmp_path / "pipe")
    found: list[list[str]] = []
    for agent, quick in (("walked", False), ("listed", True)):
        ws = _view(repo, "s", agent)
        write(ws.path, "z/.git/HEAD", "ref: refs/heads/main\n")
        write(ws.path, "b/c/.GIT", "gitdir: elsewhere\n")
        write(ws.path, "a/.git/.gitignore", "*\n")
        os.symlink(tmp_path / "pipe", ws.path / "src" / ".gitattributes")
        os.symlink(tmp_path / "pipe", ws.path / "docs" / ".gitmodules")
        layers = layer_of(ws)
        assert layers is not None
        listing = quick_upper(layers, ws.base_commit) if quick else None
        assert (listing is not None) == quick
        pinned, pyrepo = pin_and_open_view(view_git_dir(ws.path), ws.path)
        pyrepo.free()
        found.append(
            secure_workspace_git(pinned, upper=layers / "upper", gitfile=False, listing=listing)
        )
        assert not (ws.path / "z" / ".git").exists()
        assert not os.path.lexists(ws.path / "docs" / ".gitmodules")
    assert found[0] == found[1]
    assert [line.split(" ")[0] for line in found[0]] == [
        "docs/.gitmodules",
        "src/.gitattributes",
        "a/.git",
        "b/c/.GIT",
        "z/.git",
    ]


def test_a_view_is_made_quickly_only_on_a_free_checked_out_base(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_repo(tmp_path / "r", BASE_FILES)
    repo = GitRepo(root)
    base = head(root)

    def make(agent: str, *, wait: bool, include: tuple[str, ...] = ()) -> Workspace:
        return create_workspace(
            repo, base_commit=base, run_id="r1", agent_id=agent, include=include, wait=wait
        )

    with pytest.raises(BaseNotReady):
        make("first", wait=False)  # the base is not checked out yet
    first = make("first", wait=True)  # what the declined call left is no obstacle
    second = make("second", wait=False)
    assert files_of(second.path) == files_of(first.path)
    assert layer_of(second) is not None and second.branch == "fanout/r1/second"
    lock = os.open(str(repo.state_dir / "bases" / base) + ".lock", os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a base being made or removed
        with pytest.raises(BaseNotReady):
            make("third", wait=False)
    finally:
        os.close(lock)
    assert make("third", wait=False).agent_id == "third"
    (root / ".env").write_text("KEY=1\n", encoding="utf-8")
    with pytest.raises(WouldBlock) as slow:
        make("included", wait=False, include=(".env",))
    assert not isinstance(slow.value, BaseNotReady)  # slow whatever the others do
    monkeypatch.setenv("FANOUT_WORKSPACES", "worktree")
    with pytest.raises(WouldBlock) as slow:
        make("worktree", wait=False)
    assert not isinstance(slow.value, BaseNotReady)
    worktree = make("worktree", wait=True)
    assert layer_of(worktree) is None
    write(worktree.path, "src/n.py", "n\n")
    with pytest.raises(WouldBlock):
        _commit(worktree, wait=False)
    assert _commit(worktree, wait=True).commit is not None


def test_a_view_of_a_large_repository_is_not_committed_quickly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the base's index is over the limit (some commits read an index or diff whole trees
    of that size), the commit goes to a thread, and makes the same; the repository's index,
    which a view's commit never reads, does not count."""
    root = make_repo(tmp_path / "r", BASE_FILES)
    repo = GitRepo(root)
    views = [_view(repo, "big", agent) for agent in ("a", "b", "c")]
    for ws in views:
        write(ws.path, "src/new.py", "new\n")
    layers, base = layer_of(views[0]), views[0].base_commit
    assert layers is not None
    base_size = os.stat(repo.state_dir / "bases" / base / "index").st_size
    # the person stages many files meanwhile: the repository's index grows, the base's not
    for n in range(40):
        (root / f"staged{n:02d}.txt").write_text(f"{n}\n", encoding="utf-8")
    git(root, "add", ".")
    assert os.stat(repo.state_dir.parent / "index").st_size > base_size
    monkeypatch.setattr(layered, "QUICK_COMMIT_INDEX_BYTES", base_size)
    assert quick_upper(layers, base) is not None  # the base's index at the limit: quick
    monkeypatch.setattr(layered, "QUICK_COMMIT_INDEX_BYTES", base_size - 1)
    assert quick_upper(layers, base) is None  # over it
    with pytest.raises(WouldBlock):
        _commit(views[0], wait=False)
    monkeypatch.setattr(layered, "QUICK_COMMIT_INDEX_BYTES", QUICK_COMMIT_INDEX_BYTES)
    quick = _commit(views[1], wait=False)
    slow = _commit(views[2], wait=True)
    assert quick.commit is not None and slow.commit is not None
    assert git(root, "rev-parse", f"{quick.commit}^{{tree}}") == git(
        root, "rev-parse", f"{slow.commit}^{{tree}}"
    )


def test_a_views_commit_handle_has_no_index(tmp_path: Path) -> None:
    """The handle a view not registered is committed through has the repository's objects,
    references and configuration, and no index: it never loads the repository's (whose size is
    the repository's), and looks attributes up in the view's files alone, as git does there."""
    root = make_repo(tmp_path / "r", BASE_FILES)
    git(root, "config", "fanout.test", "yes")
    repo = GitRepo(root)
    ws = _view(repo, "h")
    pinned, pyrepo = pin_and_open_view(view_git_dir(ws.path), ws.path)
    try:
        assert pinned.git_dir == repo.git_dir  # git itself is pinned as before
        assert len(pyrepo.index) == 0 and len(repo.open().index) == len(BASE_FILES)
        assert str(pyrepo.revparse_single(ws.branch_ref).id) == ws.base_commit
        assert pyrepo.config["fanout.test"] == "yes"
        assert os.path.realpath(str(pyrepo.workdir)) == os.path.realpath(ws.path)
        write(ws.path, ".gitattributes", "*.dat -diff\n")
        assert pyrepo.get_attr("x.dat", "diff") is False
    finally:
        pyrepo.free()


def _more_edits() -> dict[str, Callable[[Path], None]]:
    def binary(root: Path) -> None:
        (root / "src" / "blob.bin").write_bytes(b"\x00\x01" * 50)
        write(root, "src/a.py", "".join(f"line {n}\n" for n in range(30)))

    def modes_and_links(root: Path) -> None:
        (root / "src" / "tool.sh").chmod(0o755)
        (root / "src" / "link").symlink_to("a.py")
        write(root, "src/ünï/cödé.py", "x = 'é'\n")

    def link_for_file(root: Path) -> None:
        (root / "src" / "b.py").unlink()
        (root / "src" / "b.py").symlink_to("a.py")

    def deletion(root: Path) -> None:
        (root / "src" / "b.py").unlink()
        write(root, "src/b2.py", "b = 2\n")

    def attributes(root: Path) -> None:
        write(root, ".gitattributes", "*.dat -diff\n")
        write(root, "src/x.dat", "one\ntwo\n")
        write(root, "src/a.py", "a = 11\nb = 12\n")

    return {
        **CASES,
        "binary": binary,
        "modes_and_links": modes_and_links,
        "link_for_file": link_for_file,
        "deletion": deletion,
        "attributes": attributes,
    }


@pytest.mark.parametrize("renames", [None, "copies"])
def test_a_commits_changes_are_those_of_a_whole_tree_diff(
    tmp_path: Path, renames: str | None
) -> None:
    """The changes a view's first commit reports, read from its changed paths alone, are those
    a diff of the base's tree and the commit's gives (renames, copies, kinds, binaries)."""
    root = make_repo(tmp_path / "r", BASE_FILES)
    if renames is not None:
        git(root, "config", "diff.renames", renames)
    repo = GitRepo(root)
    scope = WriteScope.of(None)
    for case, edit in sorted(_more_edits().items()):
        ws = _view(repo, f"d-{case}")
        if case in RUNS_GIT:
            ensure_registered(ws)  # the agent's git command registers its view
        edit(ws.path)
        work = commit_workspace(ws, message="work", write_scope=scope)
        if work.commit is None:
            continue
        # as the commit reads it: the view its work tree (its attributes say what is binary)
        if case in RUNS_GIT:
            pyrepo = pin_and_open(ws.path)[1]
            assert pyrepo is not None
        else:
            pyrepo = pin_and_open_view(view_git_dir(ws.path), ws.path)[1]
        try:
            whole = file_changes(pyrepo, ws.base_commit, work.commit)
        finally:
            pyrepo.free()
        assert work.changes == whole, case


def test_the_commit_git_dir_is_made_once_by_racing_threads(tmp_path: Path) -> None:
    """Agents of a fresh repository commit at once, from threads and processes: each finds
    the handle's git dir whole, made by whichever came first."""
    root = make_repo(tmp_path / "r", BASE_FILES)
    git_dir = GitRepo(root).git_dir
    made = race(lambda _n: commit_git_dir(git_dir), 16)
    assert len(made) == 16 and len(set(made)) == 1
    assert sorted(p.name for p in made[0].iterdir()) == ["HEAD", "commondir"]
    assert [p.name for p in made[0].parent.iterdir() if p.name.startswith(".commit")] == []


def test_a_commit_prepared_ahead_is_the_commit_made_at_once(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r", BASE_FILES)
    prepared_cases: list[str] = []
    for case, here, there, before in _edited_cases(root, "p", "w"):
        prepared = prepare_commit(here, write_scope=SCOPE)
        if prepared is None:
            # declined with nothing changed
            assert (_branch_head(root, here), files_of(here.path)) == before
        else:
            prepared_cases.append(case)
            assert _branch_head(root, here) == before[0]  # no reference moved yet
        got = commit_workspace(here, message="work", write_scope=SCOPE, prepared=prepared)
        _assert_same_commit(root, here, got, _commit(there, wait=True), case)
        if got.commit is not None:
            assert git(root, "log", "-1", "--format=%s", got.commit).strip() == "work"
    # the quick ones (see above) but for a registered view and a `.git` in the upper layer
    assert set(prepared_cases) == {"ignored_and_empty", "nothing", "only_out_of_scope"}


def test_a_commit_prepared_before_the_branch_moved_is_made_anew(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r", BASE_FILES)
    ws = _view(GitRepo(root), "r1")
    write(ws.path, "src/n.py", "n = 1\n")
    prepared = prepare_commit(ws, write_scope=SCOPE)
    assert prepared is not None
    first = _commit(ws, wait=True)  # a checkpoint moves the branch
    write(ws.path, "src/m.py", "m = 2\n")
    done = commit_workspace(ws, message="later", write_scope=SCOPE, prepared=prepared)
    assert done.commit is not None and done.parent == first.commit
    assert git(root, "show", f"{done.commit}:src/m.py") == "m = 2\n"
    assert prepared.finish("again") is None  # closed by the commit that declined it
    write(ws.path, "src/.gitattributes", "*.py text\n")  # a rule file: committed at the end
    assert prepare_commit(ws, write_scope=SCOPE) is None
