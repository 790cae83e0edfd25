"""Copy-on-write views: the same commits as worktrees, in proportion to the change.

Each case of the engine comparison (`test_workspace_in_process.CASES`) is applied to a view and
to a git worktree committed by git itself: the trees, what was dropped, the changes and the
files must be the same. Then what only a view has: one base shared by every view of a commit,
nothing of it left once its views are gone, a view mounted again by whoever commits it after
its server died, the user's ignored directories laid in without copies, and what a view adds
on disk."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestration.workspace import (
    DEFAULT_ENGINE,
    GIT,
    GitRepo,
    Workspace,
    clear_partial_writes,
    commit_workspace,
    create_workspace,
    drop_idle_branch_handle,
    layer_of,
    layered,
    list_workspaces,
    quick_files,
    remove_workspace,
)
from orchestration.workspace.layered import ensure_registered, unmount_view, view_admin_dir
from orchestration.workspace.overlay import (
    FUSE,
    OVERLAY,
    is_mounted,
    probe_overlay,
)
from tests.orchestration.gitutil import (
    assert_fsck,
    git,
    head,
    isolated_git,  # pyright: ignore[reportUnusedImport]  # noqa: F401  (autouse fixture)
    make_repo,
    needs_views,
    write,
)
from tests.orchestration.test_workspace_in_process import BASE_FILES, CASES, SCOPE, files_of
from toolbus.resources import WriteScope

pytestmark = needs_views()


@pytest.fixture(params=[OVERLAY, FUSE])
def driver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """Views by the kernel's overlayfs, then by fuse-overlayfs (the fallback), where each
    mounts here."""
    name = str(request.param)
    if name == FUSE:
        monkeypatch.setenv("FANOUT_WORKSPACES", FUSE)
        scratch = tmp_path / "probe"
        scratch.mkdir()
        support = probe_overlay(scratch, FUSE)
        if support.kind != FUSE:
            pytest.skip(support.note)
    return name


def _view(repo: GitRepo, run: str, agent: str = "a", base: str | None = None) -> Workspace:
    ws = create_workspace(repo, base_commit=base or head(repo.root), run_id=run, agent_id=agent)
    assert layer_of(ws) is not None and is_mounted(ws.path) and os.path.ismount(ws.path)
    return ws


def _worktree(
    repo: GitRepo, monkeypatch: pytest.MonkeyPatch, run: str, agent: str = "a"
) -> Workspace:
    with monkeypatch.context() as m:
        m.setenv("FANOUT_WORKSPACES", "worktree")
        ws = create_workspace(repo, base_commit=head(repo.root), run_id=run, agent_id=agent)
    assert layer_of(ws) is None
    return ws


RUNS_GIT = {"staged_by_the_agent"}
"""The cases whose agent runs git in its workspace: a command registers a view first."""


@pytest.mark.parametrize(
    ("case", "registered"),
    [(c, True) for c in sorted(CASES)] + [(c, False) for c in sorted(CASES) if c not in RUNS_GIT],
)
def test_a_view_commits_what_git_commits_from_a_worktree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, registered: bool, driver: str
) -> None:
    """Registered as a git worktree (a command ran in it) or not (git never worked in it), a
    view's commit is the worktree's."""
    root = make_repo(tmp_path / "r", BASE_FILES)
    repo = GitRepo(root)
    view = _view(repo, f"view-{case}")
    tree = _worktree(repo, monkeypatch, f"git-{case}")
    if registered:
        ensure_registered(view)
    for w in (view, tree):
        CASES[case](w.path)
    assert (view_admin_dir(view) is not None) == registered
    got = commit_workspace(view, message="work", write_scope=SCOPE)
    want = commit_workspace(tree, message="work", write_scope=SCOPE, engine=GIT)
    assert [p.split(" ")[0] for p in got.planted] == [p.split(" ")[0] for p in want.planted]
    assert (got.commit is None) == (want.commit is None)
    assert got.dropped == want.dropped
    assert [c.model_dump() for c in got.changes] == [c.model_dump() for c in want.changes]
    if got.commit is not None and want.commit is not None:
        assert git(root, "rev-parse", f"{got.commit}^{{tree}}") == git(
            root, "rev-parse", f"{want.commit}^{{tree}}"
        )
        assert git(root, "rev-parse", f"{got.commit}^").strip() == view.base_commit
    assert files_of(view.path) == files_of(tree.path)
    assert_fsck(root)


def test_views_of_a_commit_share_one_base_and_leave_nothing(tmp_path: Path, driver: str) -> None:
    root = make_repo(tmp_path / "r", BASE_FILES)
    repo = GitRepo(root)
    first, second = _view(repo, "run1", "a1"), _view(repo, "run1", "a2")
    bases = repo.state_dir / "bases"
    assert [p.name for p in bases.iterdir() if p.is_dir()] == [first.base_commit]
    write(first.path, "src/a.py", "mine\n")
    assert (second.path / "src/a.py").read_text() == BASE_FILES["src/a.py"]
    assert (bases / first.base_commit / "tree" / "src/a.py").read_text() == BASE_FILES["src/a.py"]
    assert sorted(w.agent_id for w in list_workspaces(repo)) == ["a1", "a2"]
    # git's own housekeeping leaves a view alone while it is not mounted
    unmount_view(second.path)
    git(root, "worktree", "prune")
    assert sorted(w.agent_id for w in list_workspaces(repo)) == ["a1", "a2"]
    remove_workspace(repo, first, delete_branch=True)
    assert (bases / first.base_commit).is_dir()  # the second view still stands on it
    remove_workspace(repo, second, delete_branch=False)
    assert not any(p for p in bases.iterdir() if p.is_dir())
    assert not (repo.state_dir / "layers" / "run1").exists()
    assert not (repo.state_dir / "worktrees" / "run1").exists()
    assert list_workspaces(repo) == []
    assert git(root, "branch", "--list", "fanout/*").split() == ["fanout/run1/a2"]
    assert_fsck(root)


def test_a_view_is_mounted_again_to_commit_after_its_server_died(
    tmp_path: Path, driver: str
) -> None:
    root = make_repo(tmp_path / "r", BASE_FILES)
    repo = GitRepo(root)
    ws = _view(repo, "run1")
    write(ws.path, "src/a.py", "left by a killed server\n")
    (ws.path / "src/b.py").unlink()
    unmount_view(ws.path)  # what the death of its server's namespace does
    assert not is_mounted(ws.path) and not os.path.ismount(ws.path)
    assert not (ws.path / "src").exists()
    # recovery records no layer: it finds one from the path, as from an agent record
    bare = Workspace(
        path=ws.path, branch=ws.branch, base_commit=ws.base_commit, run_id="run1", agent_id="a"
    )
    done = commit_workspace(bare, message="recovered", write_scope=WriteScope.of(["src"]))
    assert done.commit is not None
    assert {(c.path, c.status) for c in done.changes} == {
        ("src/a.py", "modified"),
        ("src/b.py", "deleted"),
    }
    assert is_mounted(ws.path) and os.path.ismount(ws.path)
    assert git(root, "show", f"{done.commit}:src/a.py") == "left by a killed server\n"


def test_ignored_directories_are_laid_in_and_writes_stay_in_the_view(
    tmp_path: Path, driver: str
) -> None:
    root = make_repo(tmp_path / "r", {**BASE_FILES, ".gitignore": ".venv/\n.env\n"})
    write(root, ".venv/lib/site.py", "site\n")
    os.symlink("/usr/bin/python3", root / ".venv/python")
    write(root, ".env", "KEY=1\n")
    repo = GitRepo(root)
    ws = create_workspace(
        repo, base_commit=head(root), run_id="run1", agent_id="a", include=[".venv", ".env"]
    )
    assert sorted(ws.included) == [".env", ".venv"]
    assert (ws.path / ".venv/lib/site.py").read_text() == "site\n"
    assert os.readlink(ws.path / ".venv/python") == "/usr/bin/python3"
    write(ws.path, ".venv/lib/new.py", "installed by the agent\n")
    write(ws.path, ".venv/lib/site.py", "patched by the agent\n")
    assert not (root / ".venv/lib/new.py").exists()
    assert (root / ".venv/lib/site.py").read_text() == "site\n"
    layers = layer_of(ws)
    assert layers is not None
    assert not any(layers.joinpath("upper").rglob("site.py"))  # not copied into the view
    done = commit_workspace(ws, message="w", write_scope=WriteScope.of(None))
    assert done.commit is None  # ignored: nothing to commit
    remove_workspace(repo, ws, delete_branch=True)
    assert not layers.exists()
    assert (root / ".venv/lib/site.py").read_text() == "site\n"


def test_a_view_adds_on_disk_what_its_agent_wrote(tmp_path: Path) -> None:
    files = {f"pkg{i // 100}/m{i}.py": f"value = {i}\n" * 20 for i in range(2000)}
    root = make_repo(tmp_path / "r", files)
    repo = GitRepo(root)
    first = _view(repo, "run1", "a1")
    before = _disk(repo.state_dir)
    second = _view(repo, "run1", "a2")
    write(second.path, "pkg3/m300.py", "changed\n")
    added = _disk(repo.state_dir) - before
    assert added < 64 * 1024, added  # the repository's files are ~400 KB; the view adds its change
    assert (first.path / "pkg3/m300.py").read_text() == files["pkg3/m300.py"]


def _disk(path: Path) -> int:
    """Bytes of the blocks allocated under `path`, mounted views not entered."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if not os.path.ismount(os.path.join(dirpath, d))]
        for name in (*filenames, *dirnames):
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if st.st_nlink > 1 and not os.path.isdir(os.path.join(dirpath, name)):
                continue  # a hard link to the base's index
            total += st.st_blocks * 512
    return total


@pytest.mark.parametrize("driver", [False, True], ids=["libgit2", "git"])
def test_a_view_applies_the_attributes_conversions_as_git_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, driver: bool
) -> None:
    """Line endings normalized by `text`, in-process or (with a filter driver configured, which
    libgit2 cannot run) by pinned git; a name with a newline in it hashed too."""
    root = make_repo(tmp_path / "r", {".gitattributes": "*.txt text\n", "a.txt": "a\n"})
    if driver:
        git(root, "config", "filter.never.clean", "false")
    repo = GitRepo(root)
    view = _view(repo, "view")
    tree = _worktree(repo, monkeypatch, "git")
    for w in (view, tree):
        write(w.path, "a.txt", "one\r\ntwo\r\n")
        write(w.path, "odd\nname.txt", "x\r\n")
        os.symlink("a.txt", w.path / "link")
    got = commit_workspace(view, message="w", write_scope=WriteScope.of(None))
    want = commit_workspace(tree, message="w", write_scope=WriteScope.of(None), engine=GIT)
    assert got.commit is not None and want.commit is not None
    assert git(root, "rev-parse", f"{got.commit}^{{tree}}") == git(
        root, "rev-parse", f"{want.commit}^{{tree}}"
    )
    assert git(root, "show", f"{got.commit}:a.txt") == "one\ntwo\n"


@pytest.mark.parametrize("registered_first", [True, False])
def test_a_checkpoint_leaves_the_views_git_status_as_a_worktrees(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, driver: str, registered_first: bool
) -> None:
    """A view's index starts as its base's, shared with the base's other views; after a
    checkpoint (the agent goes on) it holds the commit, as a worktree's does, and the other
    views' index is untouched. A view that git had not worked in yet gets an index of its
    branch's tree when it is registered after the checkpoint."""
    root = make_repo(tmp_path / "r", BASE_FILES)
    repo = GitRepo(root)
    view, other = _view(repo, "view"), _view(repo, "view", "b")
    tree = _worktree(repo, monkeypatch, "git")
    if registered_first:
        ensure_registered(view)
    ensure_registered(other)
    rounds: list[Callable[[Path], None]] = [_out_of_scope_and_in, _a_changed]
    for edit in rounds:
        for w in (view, tree):
            edit(w.path)
            engine = GIT if w is tree else DEFAULT_ENGINE
            done = commit_workspace(
                w, message="checkpoint", write_scope=SCOPE, keep_working=True, engine=engine
            )
            assert done.commit is not None
        ensure_registered(view)  # what the agent's next command does
        assert git(view.path, "status", "--porcelain") == git(tree.path, "status", "--porcelain")
        assert git(view.path, "diff", "--cached", "--name-only") == ""
    assert git(other.path, "status", "--porcelain") == ""
    assert git(view.path, "show", "HEAD:src/a.py") == "a = 30\n"


def _a_changed(root: Path) -> None:
    write(root, "src/a.py", "a = 30\n")


def _out_of_scope_and_in(root: Path) -> None:
    write(root, "src/new.py", "new\n")
    (root / "src/b.py").unlink()
    write(root, "docs/guide.md", "# outside\n")


MARK_NAMES = (".wh.notes", "src/.wh.a.py", "src/.wh..wh..opq", "docs/.wh..opq")


def test_files_named_like_overlay_marks_are_committed_or_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, driver: str
) -> None:
    """fuse-overlayfs keeps its marks as `.wh.` names in the upper layer and refuses such names
    through its mount; the kernel's overlayfs marks by devices and attributes, so there they
    are an agent's files like any other, committed as git commits them, and they hide nothing
    of the base."""
    root = make_repo(tmp_path / "r", BASE_FILES)
    repo = GitRepo(root)
    view = _view(repo, "view")
    if driver == FUSE:
        for name in MARK_NAMES:
            with pytest.raises(OSError):
                write(view.path, name, "mine\n")
        assert commit_workspace(view, message="w", write_scope=WriteScope.of(None)).commit is None
        return
    tree = _worktree(repo, monkeypatch, "git")
    for w in (view, tree):
        for name in MARK_NAMES:
            write(w.path, name, f"{name}\n")
    got = commit_workspace(view, message="w", write_scope=WriteScope.of(None))
    want = commit_workspace(tree, message="w", write_scope=WriteScope.of(None), engine=GIT)
    assert got.commit is not None and want.commit is not None
    assert git(root, "rev-parse", f"{got.commit}^{{tree}}") == git(
        root, "rev-parse", f"{want.commit}^{{tree}}"
    )
    assert sorted(c.path for c in got.changes) == sorted(MARK_NAMES)
    assert git(root, "show", f"{got.commit}:src/a.py") == BASE_FILES["src/a.py"]


def test_agents_of_the_same_id_in_two_runs_get_a_view_each(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r", BASE_FILES)
    repo = GitRepo(root)
    first, second = _view(repo, "run1", "a"), _view(repo, "run2", "a")
    write(second.path, "src/a.py", "second\n")
    done = commit_workspace(second, message="w", write_scope=SCOPE)
    assert done.commit is not None
    assert head(root, "refs/heads/fanout/run1/a") == first.base_commit
    remove_workspace(repo, second, delete_branch=True)
    assert [w.agent_id for w in list_workspaces(repo)] == ["a"]
    assert (first.path / "src/a.py").read_text() == BASE_FILES["src/a.py"]
    remove_workspace(repo, first, delete_branch=True)
    assert not (root / ".git" / "worktrees").exists() or not any(
        (root / ".git" / "worktrees").iterdir()
    )


@pytest.mark.anyio
async def test_spawn_warns_when_agents_get_full_checkouts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that could not enter its namespace gives worktrees, and says so and why."""
    from orchestration.contracts import SpawnRequest, TaskSpec
    from orchestration.orchestrator import Orchestrator
    from orchestration.workspace import overlay
    from tests.orchestration.scripts import by_task
    from tests.orchestration.scripts import make_repo as make_scripted_repo
    from tests.orchestration.test_orchestrator import settings, wait_until_final

    monkeypatch.setattr(overlay, "in_private_mounts", lambda: False)
    repo = make_scripted_repo(tmp_path / "repo")
    model = by_task({"T": [("write_file", {"path": "src/new.py", "content": "x = 1\n"})]})
    async with Orchestrator(settings(repo), lambda _n: model) as orch:
        spawned = await orch.spawn(
            SpawnRequest(tasks=[TaskSpec(prompt="T", name="t", write_scope=["src"])])
        )
        await wait_until_final(orch, spawned.run_id)
    warned = [w for w in spawned.warnings if "full checkout" in w]
    assert warned and "no copy-on-write views" in warned[0], spawned.warnings
    assert not (repo / ".git" / "fanout" / "layers" / spawned.run_id).exists()
    assert git(repo, "show", f"fanout/{spawned.run_id}/{spawned.agents[0].agent_id}:src/new.py")


def test_a_view_of_a_nearby_commit_stands_on_an_existing_base(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dependent's or a rerun's start commit gets no checkout of its own: it stands on the
    base already there, the difference in its upper layer, and looks and commits exactly as a
    checkout of that commit."""
    root = make_repo(
        tmp_path / "r",
        {**BASE_FILES, "gone/deep/x.py": "x\n", "was_file": "f\n", "was_dir/inner.py": "i\n"},
    )
    repo = GitRepo(root)
    first = _view(repo, "run1", "a1")
    write(root, "src/a.py", "a = 2\n")
    write(root, "src/added/new.py", "new\n")
    (root / "docs/old.md").unlink()
    for p in ("gone/deep/x.py", "was_file", "was_dir/inner.py"):
        (root / p).unlink()
    (root / "was_dir").rmdir()
    write(root, "was_file/now_a_dir.py", "d\n")
    write(root, "was_dir", "now a file\n")
    (root / "src/tool.sh").chmod(0o755)
    os.symlink("src/a.py", root / "alias")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "next")
    second = _view(repo, "run2", "a2", base=head(root))
    bases = repo.state_dir / "bases"
    assert [p.name for p in bases.iterdir() if p.is_dir()] == [first.base_commit]
    tree = _worktree(repo, monkeypatch, "run3", "a3")
    assert head(root) == tree.base_commit == second.base_commit
    assert files_of(second.path) == files_of(tree.path)
    ensure_registered(second)
    assert git(second.path, "status", "--porcelain", "-uall") == ""
    for w in (second, tree):
        write(w.path, "src/a.py", "a = 3\n")
        write(w.path, "was_file/more.py", "m\n")
    got = commit_workspace(second, message="w", write_scope=WriteScope.of(None))
    want = commit_workspace(tree, message="w", write_scope=WriteScope.of(None), engine=GIT)
    assert got.commit is not None and want.commit is not None
    assert git(root, "rev-parse", f"{got.commit}^{{tree}}") == git(
        root, "rev-parse", f"{want.commit}^{{tree}}"
    )
    assert [c.model_dump() for c in got.changes] == [c.model_dump() for c in want.changes]
    remove_workspace(repo, first, delete_branch=True)
    assert (bases / first.base_commit).is_dir()  # the second view stands on it
    remove_workspace(repo, second, delete_branch=True)
    assert not any(p for p in bases.iterdir() if p.is_dir())


def test_a_view_another_server_removed_is_unmounted_by_its_own(tmp_path: Path) -> None:
    """Another server merged the agent and deleted its layers; only the server whose namespace
    holds the mount can let it go, and its heartbeat does."""
    from orchestration.workspace import unmount_orphaned_views
    from orchestration.workspace.overlay import remove_layer

    root = make_repo(tmp_path / "r", BASE_FILES)
    repo = GitRepo(root)
    kept, removed = _view(repo, "run1", "a1"), _view(repo, "run1", "a2")
    layers = layer_of(removed)
    assert layers is not None
    remove_layer(layers)  # what the other server's removal does here
    assert unmount_orphaned_views(repo) == [removed.path]
    assert not os.path.ismount(removed.path) and not is_mounted(removed.path)
    assert os.path.ismount(kept.path) and unmount_orphaned_views(repo) == []


def _odd_names(root: Path) -> None:
    """Files whose names are not UTF-8 (hostile, or a stray byte), one in a new directory
    whose name is not UTF-8 either, beside an ordinary change."""
    top = os.fsencode(root)
    with open(os.path.join(top, b"src", b"bad\xff.py"), "wb") as f:
        f.write(b"x = 1\n")
    os.mkdir(os.path.join(top, b"src", b"d\xe9"))
    with open(os.path.join(top, b"src", b"d\xe9", b"in.txt"), "wb") as f:
        f.write(b"inner\n")
    write(root, "src/a.py", "a = 5\n")


def test_a_name_that_is_not_utf8_is_committed_as_a_worktree_commits_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, driver: str
) -> None:
    """libgit2's tree builder takes UTF-8 names only; git stores any name byte for byte, so a
    worktree's `git add -A` commits such a file. A view's commit makes the same tree."""
    root = make_repo(tmp_path / "r", BASE_FILES)
    repo = GitRepo(root)
    ws = _view(repo, "run1")
    _odd_names(ws.path)
    done = commit_workspace(ws, message="w", write_scope=SCOPE)
    assert done.commit is not None and done.dropped == []
    odd = [os.fsdecode(b"src/bad\xff.py"), os.fsdecode(b"src/d\xe9/in.txt")]
    assert sorted(c.path for c in done.changes) == sorted(["src/a.py", *odd])
    tree = git(root, "rev-parse", f"{done.commit}^{{tree}}").strip()
    listed = subprocess.run(
        ["git", "ls-tree", "-r", "-z", "--name-only", done.commit],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    assert b"src/bad\xff.py" in listed and b"src/d\xe9/in.txt" in listed
    assert_fsck(root)

    wt = _worktree(repo, monkeypatch, "run2")
    _odd_names(wt.path)
    in_worktree = commit_workspace(wt, message="w", write_scope=SCOPE)
    assert in_worktree.commit is not None
    assert git(root, "rev-parse", f"{in_worktree.commit}^{{tree}}").strip() == tree


def test_a_killed_writes_temporary_file_is_cleared_from_an_unmounted_view(
    tmp_path: Path, driver: str
) -> None:
    root = make_repo(tmp_path / "r", BASE_FILES)
    repo = GitRepo(root)
    ws = _view(repo, "run1")
    write(ws.path, "src/a.py", "kept\n")
    write(ws.path, "src/.a.py.fanout-4242-123456.tmp", "half of a write\n")
    unmount_view(ws.path)  # what the death of its server's namespace does
    bare = Workspace(
        path=ws.path, branch=ws.branch, base_commit=ws.base_commit, run_id="run1", agent_id="a"
    )
    assert clear_partial_writes(bare) == ["src/.a.py.fanout-4242-123456.tmp"]
    done = commit_workspace(bare, message="recovered", write_scope=WriteScope.of(["src"]))
    assert {c.path for c in done.changes} == {"src/a.py"}


def test_a_views_branch_is_made_in_the_repository_now_at_its_path(tmp_path: Path) -> None:
    """Views' branches are made through a handle each thread keeps on the repository: a view
    of a new repository at the same path gets its branch there, at its commit; an idle handle
    is freed (it would keep open pack files that a `git gc` deleted)."""
    root = tmp_path / "r"
    first = _view(GitRepo(make_repo(root, BASE_FILES)), "one")
    assert git(root, "rev-parse", first.branch_ref).strip() == first.base_commit
    unmount_view(first.path)
    shutil.rmtree(root)
    repo = GitRepo(make_repo(root, {"other.txt": "other\n"}))
    second = _view(repo, "two")
    assert second.base_commit == head(root) != first.base_commit
    assert git(root, "rev-parse", second.branch_ref).strip() == second.base_commit
    assert layered._BRANCH_HANDLES.held is not None  # pyright: ignore[reportPrivateUsage]
    drop_idle_branch_handle(3600.0)
    assert layered._BRANCH_HANDLES.held is not None  # pyright: ignore[reportPrivateUsage]
    drop_idle_branch_handle(0.0)
    assert layered._BRANCH_HANDLES.held is None  # pyright: ignore[reportPrivateUsage]
    third = _view(repo, "three")
    assert git(root, "rev-parse", third.branch_ref).strip() == third.base_commit


def test_only_a_kernel_overlay_view_takes_quick_file_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, driver: str
) -> None:
    """The bus runs small file calls in the event loop's thread only in a view of the kernel's
    overlayfs: fuse-overlayfs's daemon, or a worktree's unknown filesystem, could keep a call
    waiting."""
    repo = GitRepo(make_repo(tmp_path / "r", BASE_FILES))
    assert quick_files(_view(repo, "run1")) == (driver == OVERLAY)
    assert not quick_files(_worktree(repo, monkeypatch, "run2"))
