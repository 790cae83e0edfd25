"""Workspaces as copy-on-write views: one read-only base per commit, an upper layer per agent.

Layout under the state dir:
- `bases/<commit>/tree/`: the commit checked out once, shared read-only by every view on it;
  `bases/<commit>/index`: its index, hard-linked into each registered view's admin dir (git
  replaces an index, never rewrites it, and commands see the admin dir read-only).
- `layers/<run>/<agent>/`: `upper/` (what the agent wrote: files, whiteouts for deletions,
  opaque dirs), `work/` (overlayfs's), `lower` (the commit of the base under the view),
  `incl/<n>/` (the layers of an ignored directory laid in, such as `.venv`), and the view's
  record (`fanout-workspace.json`, written last).
- `worktrees/<run>/<agent>/`: the view's mount point. It is registered as a git worktree
  (locked) only once git is to work inside it (`ensure_registered`: a command, a listing);
  until then its commits go through the repository's git dir.

The view is mounted in the server's own mount namespace, so it exists only while a server that
mounted it runs; `ensure_mounted` mounts it again wherever it is needed (a recovery, a commit).
An agent's commit is the start commit's tree with the upper layer applied: only the paths the
agent wrote (and the subtrees it deleted) are hashed, so it costs what the change costs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pygit2

from orchestration.contracts import is_utf8, shown_path
from orchestration.errors import RepositoryError
from orchestration.workspace import overlay
from orchestration.workspace.diffs import applied_changes, file_changes
from orchestration.workspace.engine import (
    BaseNotReady,
    CommitJob,
    GitEngine,
    WorkCommit,
    WouldBlock,
    advance_branch,
    changed_paths,
    reset_index_paths,
)
from orchestration.workspace.engines import DEFAULT_ENGINE
from orchestration.workspace.git import (
    BRANCH_PREFIX,
    FULL_OID,
    WORKSPACE_META,
    GitRepo,
    check_component,
    copy_index,
    read_record,
    read_whole,
    run_git,
    tree_of,
    write_whole,
)
from orchestration.workspace.included import copy_beneath, included_paths
from orchestration.workspace.libgit2_git import (
    NOT_IN_PROCESS_ATTRIBUTE,
    Libgit2Git,
    common_dir,
)
from orchestration.workspace.pinning import (
    Workspace,
    admin_dir_of,
    commit_git_dir,
    listed_below,
    lists_secured,
    pin_at,
    pin_listed,
    points_here,
    remove_blocking_rule_files,
    secure_workspace_git,
)
from orchestration.workspace.tree_edits import TreeEdit, edit_tree
from orchestration.workspace.worktrees import (
    GitWorktrees,
    Workspaces,
    plain_worktrees,
    read_meta,
)
from toolbus import gitcmd
from toolbus.audit import append_text
from toolbus.errors import FileNotFound, NotAFile, PathEscape
from toolbus.fileops import read_regular_file
from toolbus.gitcmd import Pinned
from toolbus.jail import DIR_FLAGS, Jail
from toolbus.resources import WriteScope, is_within
from toolbus.trees import PATH_MAX, remove_tree, walk

log = logging.getLogger(__name__)

LOCK_REASON = "fanout: a copy-on-write view, mounted only while a server uses it"
_TREE = pygit2.enums.FileMode.TREE
_LINK = pygit2.enums.FileMode.LINK
_GITLINK = pygit2.enums.FileMode.COMMIT
_EXEC = pygit2.enums.FileMode.BLOB_EXECUTABLE
_BLOB = pygit2.enums.FileMode.BLOB
_LIBGIT2 = Libgit2Git()


def layer_dir(state_dir: Path, run_id: str, agent_id: str) -> Path:
    """The directory of an agent's layers."""
    return state_dir / "layers" / run_id / agent_id


# a view's path -> its layers and their upper layer's path: every step of an agent asks
_LAYERS_OF: dict[str, tuple[Path, str] | None] = {}
_LAYERS_KNOWN = 4096


def layer_of(ws: Workspace) -> Path | None:
    """The layers of the view at `ws.path`, None when the workspace is a plain worktree."""
    key = str(ws.path)
    try:
        known = _LAYERS_OF[key]
    except KeyError:
        known = None
        if len(ws.path.parents) >= 3:
            # <state dir>/worktrees/<run>/<agent> -> <state dir>/layers/<run>/<agent>
            agent_dir, agent = os.path.split(key)
            runs_dir, run = os.path.split(agent_dir)
            layers = os.path.join(os.path.dirname(runs_dir), "layers", run, agent)
            known = (Path(layers), os.path.join(layers, "upper"))
        if len(_LAYERS_OF) >= _LAYERS_KNOWN:
            _LAYERS_OF.clear()
        _LAYERS_OF[key] = known
    return known[0] if known is not None and os.path.isdir(known[1]) else None


def quick_files(ws: Workspace) -> bool:
    """Whether the agent's small file calls may run in the event loop's thread: its view is
    mounted by the kernel's overlayfs, whose layers lie on a local filesystem (it takes no
    network filesystem for an upper layer), with no daemon in between that could keep a call
    waiting (fuse-overlayfs's)."""
    layers = layer_of(ws)
    return layers is not None and _driver_of(layers) == overlay.OVERLAY


def _base_dir(state_dir: Path, commit: str) -> Path:
    return state_dir / "bases" / commit


def _in_base(layers: Path, commit: str, name: str) -> str:
    """`_base_dir(<state dir>, commit) / name` for the view whose layers are `layers`
    (`<state dir>/layers/<run>/<agent>`), joined as strings: a quick commit asks it."""
    state_dir = os.path.dirname(os.path.dirname(os.path.dirname(layers)))
    return os.path.join(state_dir, "bases", commit, name)


class ChosenWorkspaces(GitWorktrees):
    """Copy-on-write views where this process can mount them (`view_support`), git worktrees
    otherwise; an existing workspace is handled as the kind it is. Listing and the git
    registration are a worktree's for both."""

    def create(
        self,
        repo: GitRepo,
        *,
        base_commit: str,
        run_id: str,
        agent_id: str,
        include: Sequence[str] = (),
        engine: GitEngine = DEFAULT_ENGINE,
        wait: bool = True,
        kind: str | None = None,
        agents_work: bool = False,
    ) -> Workspace:
        """As `Workspaces.create`. Not `wait`: raises `WouldBlock`, having made nothing that
        a second call minds, unless the workspace is a view of the kernel's overlayfs on a base
        already checked out, with nothing included (a mount and a few small files)."""
        kind = kind or view_support(repo).kind
        if not wait and (kind != overlay.OVERLAY or include):
            raise WouldBlock(f"making a workspace of {kind} may take a while")
        if kind not in overlay.DRIVERS:
            return super().create(
                repo,
                base_commit=base_commit,
                run_id=run_id,
                agent_id=agent_id,
                include=include,
                engine=engine,
                agents_work=agents_work,
            )
        return self.create_view(
            repo,
            base_commit=base_commit,
            run_id=run_id,
            agent_id=agent_id,
            include=include,
            driver=kind,
            wait=wait,
            agents_work=agents_work,
        )

    def create_view(
        self,
        repo: GitRepo,
        *,
        base_commit: str,
        run_id: str,
        agent_id: str,
        include: Sequence[str] = (),
        driver: str = overlay.OVERLAY,
        wait: bool = True,
        agents_work: bool = False,
    ) -> Workspace:
        """Mount a view of `base_commit` for the agent (the base checked out once per commit);
        `include`'s ignored directories are layered in read-only, its files copied. The same
        workspace again (mounted) when it exists. Not `wait`: `WouldBlock` when the base is
        not checked out yet or its lock is taken. `agents_work`: see `Workspaces.create`."""
        check_component(run_id, "run id")
        check_component(agent_id, "agent id")
        base = base_commit if FULL_OID.fullmatch(base_commit) else repo.resolve(base_commit)
        path = repo.worktrees_dir / run_id / agent_id
        layers = layer_dir(repo.state_dir, run_id, agent_id)
        existing = _read_view_meta(layers, path)
        if existing is None and os.path.lexists(path):
            existing = read_meta(path)  # a worktree's record: only where something is
        if existing is not None and layer_of(existing) is not None:
            ensure_mounted(existing)
            return existing
        upper, work = layers / "upper", layers / "work"
        base_dir, lower = _hold_base(repo, base, layers, wait=wait, agents_work=agents_work)
        branch = f"{BRANCH_PREFIX}{run_id}/{agent_id}"
        _make_dir(upper)
        _make_dir(work)
        if driver != overlay.OVERLAY:
            write_whole(layers / "driver", driver + "\n")
        if lower != base:
            # an existing base of a nearby commit: the difference goes in the upper layer,
            # and the view gets an index of its own (for its registration)
            _layer_difference(
                repo, lower, base, upper=upper, lower_index=base_dir / "index", layers=layers
            )
        if not _create_branch(repo, branch, base):
            raise RepositoryError(
                f"the workspace of {agent_id} could not be made: its branch {branch} exists "
                "from an earlier attempt at another commit; rerun the agent"
            )
        _make_dir(path)
        if not overlay.is_mounted(path):
            overlay.mount_view(driver, [base_dir / "tree"], upper, work, path)
        included = _layer_included(repo, path, layers, include, driver)
        ws = Workspace(
            path=path,
            branch=branch,
            base_commit=base,
            run_id=run_id,
            agent_id=agent_id,
            included=included,
        )
        _write_view_meta(layers, ws)
        return ws

    def existing(self, repo: GitRepo) -> list[Workspace]:
        """The views (registered as git worktrees or not yet) and the worktrees."""
        found: dict[str, Workspace] = {}
        for layers in sorted(_layer_dirs(repo.state_dir)):
            ws = _read_view_meta(layers, repo.worktrees_dir / layers.parent.name / layers.name)
            if ws is not None:
                found[os.path.realpath(ws.path)] = ws
        for ws in super().existing(repo):
            found.setdefault(os.path.realpath(ws.path), ws)
        return sorted(found.values(), key=lambda w: str(w.path))

    def remove(self, repo: GitRepo, ws: Workspace, *, delete_branch: bool) -> None:
        """Unmount the view, delete its layers and registration (its branch when asked), and
        the base once no view stands on it."""
        layers = layer_of(ws)
        if layers is None:
            super().remove(repo, ws, delete_branch=delete_branch)
            return
        path = Path(ws.path)
        if not is_within(str(path.resolve()), str(repo.worktrees_dir.resolve())):
            raise RepositoryError(f"{path} is not a fanout workspace; refusing to remove it")
        unmount_view(path)
        lower = _lower_of(layers)
        admin = view_admin_dir(ws)
        if admin is not None:
            shutil.rmtree(admin, ignore_errors=True)
        with contextlib.suppress(OSError):
            path.rmdir()
        overlay.remove_layer(layers)
        with contextlib.suppress(OSError):
            layers.parent.rmdir()
        if delete_branch and ws.branch:
            run_git(repo.root, "update-ref", "-d", ws.branch_ref, check=False)
        with contextlib.suppress(OSError):
            path.parent.rmdir()
        if lower is not None:
            release_base(repo.state_dir, lower)

    def discard_unstarted(self, repo: GitRepo, run_id: str, agent_id: str) -> list[str]:
        """Also the layers a cut-short creation left."""
        layers = layer_dir(repo.state_dir, run_id, agent_id)
        unmount_view(repo.worktrees_dir / run_id / agent_id)
        removed = super().discard_unstarted(repo, run_id, agent_id)
        staging = _staging_of(repo.state_dir, run_id, agent_id)
        if os.path.lexists(staging):
            overlay.remove_layer(staging)
            removed.append(str(staging.relative_to(repo.git_dir)))
        if os.path.lexists(layers):
            lower = _lower_of(layers)
            overlay.remove_layer(layers)
            removed.append(str(layers.relative_to(repo.git_dir)))
            if lower is not None:
                release_base(repo.state_dir, lower)
        return removed


# per thread, a libgit2 handle on the repository whose views' branches it made last: every
# agent's view makes one branch, and opening a handle costs more than making it
_BRANCH_HANDLES = threading.local()


def _branch_handle(repo: GitRepo) -> pygit2.Repository:
    """This thread's handle on `repo`, opened anew when the repository at its path is another
    (its git dir is not the same directory)."""
    st = os.stat(repo.git_dir)
    key = (str(repo.root), st.st_dev, st.st_ino)
    held: tuple[tuple[str, int, int], pygit2.Repository, float] | None = getattr(
        _BRANCH_HANDLES, "held", None
    )
    if held is not None and held[0] != key:
        _drop_branch_handle()
        held = None
    handle = held[1] if held is not None else pygit2.Repository(str(repo.root))
    _BRANCH_HANDLES.held = (key, handle, time.monotonic())
    return handle


def _drop_branch_handle() -> None:
    held = getattr(_BRANCH_HANDLES, "held", None)
    _BRANCH_HANDLES.held = None
    if held is not None:
        held[1].free()


def drop_idle_branch_handle(idle_s: float) -> None:
    """Free this thread's kept handle if no branch was made through it for `idle_s`: an open
    handle keeps the pack files it read open, and a `git gc` of the repository may have
    deleted them since. (A worker thread's goes with the thread.) Its kept view handles too
    (`drop_idle_view_handles`)."""
    held = getattr(_BRANCH_HANDLES, "held", None)
    if held is not None and time.monotonic() - held[2] >= idle_s:
        _drop_branch_handle()
    drop_idle_view_handles(idle_s)


def _create_branch(repo: GitRepo, branch: str, base: str) -> bool:
    """Make the view's `branch` at `base`; True as well when an earlier attempt made it there.
    False when it names another commit (or cannot be made)."""
    for _fresh in (False, True):  # a kept handle that fails is dropped, and a fresh one tried
        try:
            pyrepo = _branch_handle(repo)
            target = pyrepo[pygit2.Oid(hex=base)].peel(pygit2.Commit)
            try:
                pyrepo.create_branch(branch, target)
            except pygit2.AlreadyExistsError:
                return str(pyrepo.references[f"refs/heads/{branch}"].resolve().target) == base
            return True
        except (pygit2.GitError, KeyError, ValueError, OSError):
            _drop_branch_handle()
    return False


def _read_view_meta(layers: Path, path: Path) -> Workspace | None:
    """The record of the view whose layers are `layers`, mounted at `path`; None when there is
    none (not a view, or its creation was cut short). It is the second line of `lower`
    (`_write_lower`), or in layers an earlier version made, a file of its own."""
    try:
        _, _, text = read_whole(os.path.join(layers, "lower")).partition(b"\n")
        if not text.strip():
            text = read_whole(os.path.join(layers, WORKSPACE_META))
        ws = Workspace.model_validate_json(text)
    except (OSError, ValueError):
        return None
    if not os.path.isdir(os.path.join(layers, "upper")):
        return None
    return ws.model_copy(update={"path": path})


def _make_dir(path: str | Path) -> None:
    """`mkdir -p path`: one system call where its parent exists."""
    try:
        os.mkdir(path)
    except FileNotFoundError:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        if not os.path.isdir(path):
            raise


# a view's registration and its commits exclude each other in this process (a lock per view,
# striped: views are many, their registrations rare)
_REGISTERING = tuple(threading.Lock() for _ in range(64))


def view_git_dir(path: Path) -> Path:
    """The repository's git dir of the view at `path` (`<git dir>/fanout/worktrees/<run>/
    <agent>`)."""
    return path.parents[3]


def _admin_names(path: Path) -> tuple[str, str]:
    """The names a view's registration takes under `.git/worktrees`, in order: the agent's
    id, or, when another run's agent of the same id holds it, the id and the run's."""
    return path.name, f"{path.name}.{path.parent.name}"


def view_admin_dir(ws: Workspace) -> Path | None:
    """The admin dir of the view `ws` when it is registered as a git worktree, else None; for a
    worktree, its admin dir (`admin_dir_of`). A view's registration is under one of the two
    names `ensure_registered` gives it, so only those are looked at."""
    path = ws.path
    if layer_of(ws) is None:
        return admin_dir_of(path)
    git_dir = view_git_dir(path)
    worktrees = os.path.join(git_dir, "worktrees")
    names = [name for name in _admin_names(path) if os.path.isdir(os.path.join(worktrees, name))]
    if not names:
        return None  # most views are never registered: no path is resolved for them
    admins = Path(os.path.realpath(git_dir)) / "worktrees"
    want = os.path.join(os.path.realpath(path), ".git")
    for name in names:
        admin = admins / name
        if points_here(admin, want):
            return admin
    return None


def ensure_registered(ws: Workspace) -> Path:
    """Register the view `ws` as a git worktree on its branch if it is not yet, and return its
    admin dir; a worktree's admin dir as it is. A view is registered only when git is to work
    inside it (a command, a listing, a checkpoint's index): most agents never need it, and its
    files cost each of them.

    The admin dir is made whole (HEAD, commondir, gitdir, `locked`, an index of the branch's
    tree) beside `.git/worktrees` and renamed into it, so that no `git worktree prune` ever sees
    it half made, and no lock across processes is needed; then the view's `.git` file is
    written, any `.git` in the view being moved out first (`secure_workspace_git`). Once
    registered, the view's `.git` is left as it is: the agent's commands may change it, and
    its commit reports and undoes that."""
    path = Path(ws.path)
    layers = layer_of(ws)
    if layers is None:
        admin = admin_dir_of(path)
        if admin is None:
            raise RepositoryError(f"the workspace {path} is not registered in the repository")
        return admin
    with _registration_lock(ws):
        admin = view_admin_dir(ws)
        if admin is not None and os.path.lexists(path / ".git"):
            # registered: a `.git` the agent changed since is its own, reported at its commit
            return admin
        ensure_mounted(ws)
        if admin is None:
            admin = _register(ws, layers)
        # the view's `.git` (again, if a kill came between the rename and it)
        if os.path.lexists(path / ".git"):
            secure_workspace_git(Pinned(admin, path), upper=layers / "upper")
        else:
            write_whole(path / ".git", f"gitdir: {admin}\n")
        return admin


def listing_git_dir(ws: Workspace) -> Path | None:
    """The workspace's admin dir for `list_files` and `search` (a view is registered now if it
    is not yet); None, logged, when that fails: they then walk the files instead. In a view,
    rule files git would wait on are removed first (the commit reports them when it removes
    them; a listing's git would wait until its timeout): only its upper layer is read."""
    try:
        admin = ensure_registered(ws)
        layers = layer_of(ws)
        if layers is not None:
            removed = remove_blocking_rule_files(Path(ws.path), layers / "upper")
            if removed:
                log.warning("workspace %s: %s", ws.path, "; ".join(removed))
        return admin
    except (RepositoryError, OSError, pygit2.GitError) as exc:
        log.warning("listing %s without git: %s", ws.path, exc)
        return None


@contextlib.contextmanager
def registration_held(ws: Workspace, *, wait: bool = True) -> Generator[bool]:
    """Whether the view `ws` is registered as a git worktree, kept so (in this process) until
    the block ends. Not `wait`: `WouldBlock` when a registration is under way."""
    with _registration_lock(ws, wait=wait):
        yield view_admin_dir(ws) is not None


@contextlib.contextmanager
def _registration_lock(ws: Workspace, *, wait: bool = True) -> Generator[None]:
    # striped by the view's run and agent ids, which every spelling of its path ends in
    path = ws.path
    lock = _REGISTERING[hash((path.parent.name, path.name)) % len(_REGISTERING)]
    if not lock.acquire(blocking=wait):
        raise WouldBlock(f"the view {ws.path} is being registered")
    try:
        yield
    finally:
        lock.release()


def _register(ws: Workspace, layers: Path) -> Path:
    path = Path(ws.path)
    git_dir, state_dir = view_git_dir(path), path.parents[2]
    if not ws.branch:
        raise RepositoryError(f"the view {path} has no branch recorded; rerun the agent")
    staging = _staging_of(state_dir, path.parent.name, path.name)
    overlay.remove_layer(staging)
    staging.mkdir(parents=True)
    (staging / "locked").write_text(LOCK_REASON + "\n", encoding="utf-8")
    (staging / "HEAD").write_text(f"ref: refs/heads/{ws.branch}\n", encoding="utf-8")
    (staging / "commondir").write_text("../..\n", encoding="utf-8")
    want = f"{os.path.realpath(path)}/.git"
    (staging / "gitdir").write_text(want + "\n", encoding="utf-8")
    _view_index(git_dir, ws, layers, staging / "index")
    admins = git_dir / "worktrees"
    admins.mkdir(exist_ok=True)
    for name in _admin_names(path):
        admin = admins / name
        try:
            os.rename(staging, admin)
        except OSError:
            if points_here(admin, want):  # registered meanwhile, by another process
                overlay.remove_layer(staging)
                return admin.resolve()
            continue
        return admin.resolve()
    overlay.remove_layer(staging)
    raise RepositoryError(
        f"the view {path} could not be registered as a git worktree: .git/worktrees/"
        + " and .git/worktrees/".join(_admin_names(path))
        + " are taken"
    )


def _view_index(git_dir: Path, ws: Workspace, layers: Path, target: Path) -> None:
    """The index of a view being registered: its base's (hard-linked where the branch is still
    at the view's start), with the paths its commits changed since set to the branch's tree."""
    source = layers / "index"  # a view on a nearby commit's base has an index of its own
    if not source.is_file():
        source = _base_dir(layers.parents[2], _lower_of(layers) or "") / "index"
    pyrepo = pygit2.Repository(str(git_dir), pygit2.enums.RepositoryOpenFlag.NO_SEARCH)
    try:
        tip = str(pyrepo.references[ws.branch_ref].resolve().target)
        if tip == ws.base_commit:
            try:
                os.link(source, target)
            except OSError:
                copy_index(source, target)
            return
        copy_index(source, target)
        index = pygit2.Index(str(target))
        reset_index_paths(pyrepo, index, tip, changed_paths(pyrepo, ws.base_commit, tip))
        index.write()
    except (KeyError, pygit2.GitError) as exc:
        raise RepositoryError(
            f"the branch {ws.branch} of the view {ws.path} is missing: {exc}"
        ) from exc
    finally:
        pyrepo.free()


def _staging_of(state_dir: Path, run_id: str, agent_id: str) -> Path:
    return state_dir / "staging" / f"admin-{run_id}-{agent_id}"


def _layer_dirs(state_dir: Path) -> Iterator[Path]:
    """Every agent's layers dir (`layers/<run>/<agent>`), a run's dir removed meanwhile
    skipped."""
    root = state_dir / "layers"
    for run in root.iterdir() if root.is_dir() else ():
        if not run.is_dir():
            continue
        with contextlib.suppress(FileNotFoundError):
            yield from list(run.iterdir())


def _lower_of(layers: Path) -> str | None:
    """The commit of the base the layers stand on (the first line of `lower`)."""
    # (the line's 40 digits and its end: the view's record may follow)
    text = read_record(os.path.join(layers, "lower"), limit=41)
    return text if text is not None and FULL_OID.fullmatch(text) else None


@contextlib.contextmanager
def _base_lock(base_dir: Path, *, shared: bool, wait: bool = True) -> Generator[None]:
    """The base's lock: shared by the views that stand on it, exclusive to make or delete it
    (`flock`, so waiters sleep in the kernel instead of polling). Not `wait`: `WouldBlock`
    when it is taken."""
    path = str(base_dir) + ".lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # the repository's first base
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
            fcntl.flock(fd, mode if wait else mode | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BaseNotReady(f"the lock of {base_dir} is taken") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # deleted with its base while this waited: lock the new one
    try:
        yield
    finally:
        os.close(fd)


MAX_LAYERED_PATHS = 2_000
"""A view of a commit with no base of its own stands on an existing base whose tree differs
from it in at most this many paths (a dependent's start, a rerun's), the difference written
into its upper layer, instead of checking the whole commit out."""


def _hold_base(
    repo: GitRepo, commit: str, layers: Path, *, wait: bool = True, agents_work: bool = False
) -> tuple[Path, str]:
    """A checked-out base for a view of `commit`, and its commit: `commit`'s own, or an existing
    one close to it, or a new checkout (without the user's filters for `agents_work`: see
    `Workspaces.create`). `layers` is recorded as standing on it before the base's lock is let
    go, so that no removal deletes it in between. Not `wait`: `WouldBlock` unless `commit`'s
    own base is there and its lock free."""
    base_dir = _base_dir(repo.state_dir, commit)
    _make_dir(layers)
    with _base_lock(base_dir, shared=True, wait=wait):
        if os.path.isfile(os.path.join(base_dir, "index")):
            _write_lower(layers, commit)
            return base_dir, commit
    if not wait:
        raise BaseNotReady(f"{commit[:12]} is not checked out as a base yet")
    for other in _near_bases(repo, commit):
        near_dir = _base_dir(repo.state_dir, other)
        with _base_lock(near_dir, shared=True):
            if (near_dir / "index").is_file():
                _write_lower(layers, other)
                return near_dir, other
    with _base_lock(base_dir, shared=False):
        if not (base_dir / "index").is_file():
            _materialise(repo, commit, base_dir, users=not agents_work)
        _write_lower(layers, commit)
    return base_dir, commit


def _write_lower(layers: Path, commit: str) -> None:
    """Record that the layers stand on the base of `commit`, under that base's shared lock. In
    place: the one reader that matters, `release_base` of the same base, holds its exclusive
    lock, and a torn record names no base (a kill while it was written: the view was not made).
    The view's own record follows as the file's second line once the view is made
    (`_write_view_meta`): one file for both, since each file is an inode to allocate, on a
    churned disk the costliest part of a view's creation."""
    fd = os.open(
        os.path.join(layers, "lower"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666
    )
    try:
        os.write(fd, (commit + "\n").encode("ascii"))
    finally:
        os.close(fd)


def _write_view_meta(layers: Path, ws: Workspace) -> None:
    """Append the view's record to `lower`, last, in place: found torn (a kill while it was
    written), it is taken for none (`_read_view_meta`), as it was a moment before."""
    append_text(layers / "lower", ws.model_dump_json() + "\n")


def _near_bases(repo: GitRepo, commit: str) -> list[str]:
    """Existing bases whose trees differ from `commit`'s in at most `MAX_LAYERED_PATHS` paths,
    the closest first."""
    root = repo.state_dir / "bases"
    found: list[tuple[int, str]] = []
    pyrepo = repo.open()
    try:
        want = tree_of(pyrepo, commit)
        for entry in root.iterdir() if root.is_dir() else ():
            if not FULL_OID.fullmatch(entry.name) or not (entry / "index").is_file():
                continue
            try:
                delta = tree_of(pyrepo, entry.name).diff_to_tree(want)
            except (KeyError, ValueError, pygit2.GitError):
                continue
            if len(delta) <= MAX_LAYERED_PATHS:
                found.append((len(delta), entry.name))
    finally:
        pyrepo.free()
    return [name for _, name in sorted(found)]


def _layer_difference(
    repo: GitRepo, lower: str, commit: str, *, upper: Path, lower_index: Path, layers: Path
) -> Path:
    """Write into `upper` what makes the base of `lower` look like `commit` (changed files
    whole; a deletion as a whiteout at the highest directory `commit` lacks), and make the
    view's own index: the base's, with those paths changed (git hashes them on its first look).
    Returns the index's path."""
    own = layers / "index"
    copy_index(lower_index, own)
    pyrepo = repo.open()
    try:
        old, new = tree_of(pyrepo, lower), tree_of(pyrepo, commit)
        index = pygit2.Index(str(own))
        for delta in old.diff_to_tree(new).deltas:
            if delta.status == pygit2.enums.DeltaStatus.DELETED:
                rel = delta.old_file.path
                with contextlib.suppress(KeyError, OSError, pygit2.GitError):
                    index.remove(rel)
                hide = _whiteout_at(new, rel)
                if hide is not None and not os.path.lexists(upper / hide):
                    (upper / hide).parent.mkdir(parents=True, exist_ok=True)
                    os.mknod(upper / hide, stat.S_IFCHR, 0)  # overlayfs's whiteout
                continue
            rel, mode = delta.new_file.path, delta.new_file.mode
            if mode == _GITLINK:
                continue
            target = upper / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            data = pyrepo[delta.new_file.id].peel(pygit2.Blob).data
            if os.path.lexists(target):
                target.unlink()
            if mode == _LINK:
                os.symlink(os.fsdecode(data), target)
            else:
                target.write_bytes(data)
                target.chmod(0o755 if mode == _EXEC else 0o644)
            index.add(pygit2.IndexEntry(rel, delta.new_file.id, mode))
        index.write()
    finally:
        pyrepo.free()
    return own


def _whiteout_at(tree: pygit2.Tree, rel: str) -> str | None:
    """Where one whiteout hides the deleted `rel` in a view of `tree`: its highest directory
    that `tree` lacks, or `rel` itself; None when `tree` has a file on the way (the upper
    layer's file hides the base's directory) or a directory at `rel`."""
    parts = rel.split("/")
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        try:
            entry = tree[prefix]
        except KeyError:
            return prefix
        if entry.filemode != _TREE:
            return None
    return None


def _materialise(repo: GitRepo, commit: str, base_dir: Path, *, users: bool = True) -> None:
    """Check `commit` out into `base_dir/tree` with its own index, through a temporary
    directory renamed into place (a kill leaves no half base behind a complete-looking name).
    As a first checkout of the user's files (`users`), before any agent ran, the user's smudge
    filters apply; on an agent's own work, whose attributes would pick them, none does."""
    staging = base_dir.with_name(f".{base_dir.name}.{os.getpid()}.tmp")
    overlay.remove_layer(staging)
    shutil.rmtree(base_dir, ignore_errors=True)
    tree = staging / "tree"
    tree.mkdir(parents=True)
    env = {"GIT_INDEX_FILE": str(staging / "index")}
    pinned = Pinned(repo.git_dir, tree, safe=False) if users else pin_at(repo.git_dir, tree)
    done = gitcmd.run(tree, ["read-tree", "--reset", "-u", commit], pinned=pinned, env=env)
    if done.returncode != 0:
        overlay.remove_layer(staging)
        raise RepositoryError(f"could not check out the base {commit[:12]}: {done.stderr.strip()}")
    staging.rename(base_dir)


def release_base(state_dir: Path, commit: str) -> None:
    """Delete the base of `commit` when no agent's layers stand on it any more."""
    base_dir = _base_dir(state_dir, commit)
    if not base_dir.parent.is_dir():
        return
    with _base_lock(base_dir, shared=False):
        if any(_lower_of(layers) == commit for layers in _layer_dirs(state_dir)):
            return
        overlay.remove_layer(base_dir)
        with contextlib.suppress(OSError):
            os.unlink(str(base_dir) + ".lock")


def ensure_mounted(ws: Workspace) -> None:
    """Mount the view at `ws.path` in this process's namespace if it is not."""
    path = Path(ws.path)
    layers = layer_of(ws)
    if layers is None or overlay.is_mounted(path):
        return
    lower = _lower_of(layers)
    if lower is None:
        raise RepositoryError(f"the layers of {path} name no base; the workspace is damaged")
    base_dir = _base_dir(path.parents[2], lower)
    if not (base_dir / "tree").is_dir():
        raise RepositoryError(f"the base {lower[:12]} of {path} is gone; rerun the agent")
    if not overlay.in_private_mounts():
        raise RepositoryError(
            f"{path} is a copy-on-write view, and this server cannot mount one "
            "(it runs without a private mount namespace)"
        )
    path.mkdir(parents=True, exist_ok=True)
    driver = _driver_of(layers)
    overlay.mount_view(driver, [base_dir / "tree"], layers / "upper", layers / "work", path)
    incl = layers / "incl"
    if incl.is_dir():
        for entry in sorted(incl.iterdir()):
            _mount_included(entry, path, driver)


def _driver_of(layers: Path) -> str:
    """How the view was mounted (its upper layer's marks are that driver's)."""
    text = read_record(os.path.join(layers, "driver"))
    return text if text is not None and text in overlay.DRIVERS else overlay.OVERLAY


def unmount_orphaned_views(repo: GitRepo) -> list[Path]:
    """Unmount this process's views of `repo` whose layers are gone (another server merged or
    discarded their agents): otherwise they would hold their deleted layers' space until this
    server exits. Returns their paths."""
    root = os.path.abspath(repo.worktrees_dir)
    gone: list[Path] = []
    for point in overlay.mounted_views():
        if not str(point).startswith(root + "/") or len(point.relative_to(root).parts) != 2:
            continue  # not a view's root in this repository (an included directory, say)
        layers = layer_dir(repo.state_dir, point.parent.name, point.name)
        if not (layers / "upper").is_dir():
            unmount_view(point)
            gone.append(point)
    return gone


def unmount_view(path: Path) -> None:
    """Detach the view at `path` (and the directories layered into it), if mounted here."""
    with contextlib.suppress(OSError):
        overlay.unmount(path)


def _layer_included(
    repo: GitRepo, view: Path, layers: Path, patterns: Sequence[str], driver: str
) -> list[str]:
    """Lay the user's ignored directories that `patterns` name under the view read-only, each
    with an upper layer of the agent's own (writes land there, never in the user's copy);
    ignored files are copied into the view. Returns the repository paths of the files.

    The base may hold a link (an agent's, merged) where an included path or one of its
    directories goes: nothing is copied or mounted through it, and that path is left out."""
    out: list[str] = []
    incl = layers / "incl"
    jail = Jail(view)
    for rel, src in included_paths(repo.root, patterns):
        if src.is_dir():
            entry = incl / str(len(out))
            entry.mkdir(parents=True, exist_ok=True)
            (entry / "upper").mkdir(exist_ok=True)
            (entry / "work").mkdir(exist_ok=True)
            write_whole(entry / "source", str(src) + "\n")
            write_whole(entry / "path", rel + "\n")
            if not _mount_included(entry, view, driver):
                remove_tree(entry, ignore_errors=True)
                continue
        elif not copy_beneath(jail, rel, src):
            continue
        out.append(rel)
    return sorted(out)


def _mount_included(entry: Path, view: Path, driver: str) -> bool:
    """Mount the included directory `entry` records at its place in the view, which must be a
    directory reached without a link (made where missing); whether it is mounted."""
    try:
        source = Path((entry / "source").read_text(encoding="utf-8").strip())
        rel = (entry / "path").read_text(encoding="utf-8").strip()
    except OSError:
        return False
    if not source.is_dir():
        return False
    try:
        # (what the agent made in the view, or merged into its base, may be a link there)
        os.close(Jail(view).open_dir(rel, create=True))
    except (PathEscape, NotAFile, FileNotFound, OSError) as exc:
        log.warning("%s not laid into %s: %s", rel, view, exc)
        return False
    overlay.mount_view(driver, [source], entry / "upper", entry / "work", view / rel)
    return True


# --- committing a view ---------------------------------------------------------------------


@dataclass(frozen=True)
class ViewTree:
    """The tree of a view's commit (`view_tree`), before the commit is made."""

    tree: str
    base_tree: pygit2.Tree
    changes: dict[str, tuple[str, int] | None]
    """What the tree changes of the base: each path's blob and mode, or None (deleted)."""
    dropped: list[str]
    """The out-of-scope changes (and the names git cannot commit), reported, not committed."""


def view_tree(job: CommitJob, layers: Path, listing: UpperListing | None = None) -> ViewTree:
    """The tree of `job`'s commit of the view in `layers` (see `commit_view`), written to the
    object store; no reference moves."""
    pyrepo = job.pyrepo
    upper = layers / "upper"
    if listing is not None:
        lower, driver = job.base, overlay.OVERLAY
    else:
        lower, driver = _lower_of(layers) or job.base, _driver_of(layers)
    base_tree = tree_of(pyrepo, job.base)
    candidates = _candidates(upper, base_tree, driver, listing)
    if lower != job.base:
        candidates.update(changed_paths(pyrepo, job.base, str(tree_of(pyrepo, lower).id)))
    changes, dropped = _view_changes(
        pyrepo,
        job.pinned,
        base_tree,
        candidates,
        job.write_scope,
        shared=job.shared_handle,
        config=job.config,
    )
    tree = _apply(pyrepo, base_tree, changes)
    tree_id = str(tree) if tree is not None else str(pyrepo.TreeBuilder().write())
    return ViewTree(tree=tree_id, base_tree=base_tree, changes=changes, dropped=dropped)


def commit_view(
    job: CommitJob,
    layers: Path,
    *,
    keep_working: bool = False,
    listing: UpperListing | None = None,
    made: ViewTree | None = None,
) -> WorkCommit:
    """Commit a view's work as `job` says (`commit_workspace` makes the job): the start
    commit's tree with what the upper layer in `layers` changed applied, out-of-scope changes
    dropped and reported. `keep_working`: the agent goes on in the view, so its index is made
    the commit's tree, as a worktree's is (or `git status` there shows the commit's changes
    staged in reverse). `listing`: its upper layer's entries as `quick_upper` read them (so
    the view is the kernel overlay's, on the base of its start commit, `job.base`). `made`:
    the tree, made earlier by `view_tree` for this job but for its message and of a view
    unchanged since."""
    pyrepo, head = job.pyrepo, job.head
    made = made or view_tree(job, layers, listing)
    if made.tree == str(head.tree_id):
        return WorkCommit(commit=None, changes=[], dropped=made.dropped)
    commit = advance_branch(
        pyrepo, ref=job.ref, head=head, tree=made.tree, message=job.message, author=job.author
    )
    if keep_working:
        _follow_commit(pyrepo, made.tree)
    # the first commit on the base: its changes are the ones applied, read from their paths
    # alone; a diff of the two whole trees grows with the repository
    base_tree = made.base_tree
    known = (
        applied_changes(pyrepo, base_tree, made.changes, plain=job.plain_paths, config=job.config)
        if head.tree_id == base_tree.id
        else None
    )
    return WorkCommit(
        commit=str(commit),
        changes=known if known is not None else file_changes(pyrepo, str(head.id), str(commit)),
        dropped=made.dropped,
    )


def _follow_commit(pyrepo: pygit2.Repository, tree_id: str) -> None:
    """Make the view's index hold the tree `tree_id`: only the entries that differ are
    replaced, so the others keep their stat data. The index is written anew (a lock file
    renamed over it), never in place: it starts as a hard link to its base's index, which
    the base's other views share."""
    try:
        index = pyrepo.index
        index.read(force=True)
        tree = tree_of(pyrepo, pygit2.Oid(hex=tree_id))
        stale = [d.new_file.path for d in index.diff_to_tree(tree).deltas]
        if not stale:
            return
        reset_index_paths(pyrepo, index, tree_id, stale)
        index.write()
    except (pygit2.GitError, KeyError, ValueError, OSError) as exc:
        # the work is committed and the branch moved; only `git status` in the view shows it
        log.warning("the index of %s was not updated after its commit: %s", pyrepo.workdir, exc)


QUICK_COMMIT_ENTRIES = 256
QUICK_COMMIT_BYTES = 4 << 20
QUICK_COMMIT_INDEX_BYTES = 256 << 10
"""A registered view's commit reads its index, and some commits (a path that changes kind, or
whose attributes name a diff driver) compare the start tree with the new one as a whole: both
grow with the repository, so a view whose base's index exceeds this is not committed on the
event loop."""


UpperListing = list[tuple[str, bool]]
"""An upper layer's entries as `quick_upper` read them: each path and whether it is a
directory."""


def quick_upper(layers: Path, base: str) -> UpperListing | None:
    """The upper layer's entries when the view in `layers` commits quickly: a view of the
    kernel's overlayfs on the base of its own start commit (`base`), whose upper layer holds at
    most `QUICK_COMMIT_ENTRIES` entries and `QUICK_COMMIT_BYTES` of files, and no whiteout or
    opaque directory (each stands for a base subtree of any size); else None. It reads only the
    upper layer's directories, and stops at the first sign of a large change. The commit takes
    its candidates from these entries (`commit_view`) instead of reading them again. A large
    repository's view never commits quickly (`QUICK_COMMIT_INDEX_BYTES`)."""
    if _driver_of(layers) != overlay.OVERLAY or _lower_of(layers) != base:
        return None
    try:
        if os.stat(_in_base(layers, base, "index")).st_size > QUICK_COMMIT_INDEX_BYTES:
            return None
    except OSError:
        return None
    found: UpperListing = []
    size = 0
    stack = [(os.path.join(layers, "upper"), "")]
    while stack:
        where, prefix = stack.pop()
        try:
            listing = os.scandir(where)
        except OSError:
            return None
        with listing:
            for entry in listing:
                if len(found) >= QUICK_COMMIT_ENTRIES:
                    return None
                rel = prefix + entry.name
                # (the kinds from the directory's entries: only a file's size needs a stat)
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                    if is_dir:
                        if overlay.is_opaque(entry.path, overlay.OVERLAY):
                            return None
                        stack.append((entry.path, rel + "/"))
                    elif entry.is_file(follow_symlinks=False):
                        size += entry.stat(follow_symlinks=False).st_size
                        if size > QUICK_COMMIT_BYTES:
                            return None
                    elif not entry.is_symlink():
                        return None  # a whiteout
                except OSError:
                    return None
                found.append((rel, is_dir))
    return found


# per thread, libgit2 handles kept for the quick commits of views, one per base: opening a
# handle and loading its configuration, ignore and attribute rules costs more than the commit
_VIEW_HANDLES = threading.local()
_VIEW_HANDLES_KEPT = 2
# the configuration a libgit2 handle reads once and keeps (the rule files' names, the
# conversions' settings: in its attribute cache and its cached configuration); a change of
# any of them takes a new handle
_READ_ONCE = frozenset(
    {
        "core.attributesfile",
        "core.excludesfile",
        "core.autocrlf",
        "core.eol",
        "core.safecrlf",
        "core.ignorecase",
        "core.symlinks",
    }
)
_OFF = ("false", "no", "off", "0")


class CommitHandle(NamedTuple):
    """What a view's commit goes through (`view_commit_handle`)."""

    pinned: Pinned
    handle: pygit2.Repository
    plain: frozenset[str]
    """The listed paths no attribute applies to (their attributes are not looked up)."""
    config: pygit2.Config | None
    """A snapshot of the handle's configuration, read instead of the live one (None: read
    that)."""


@dataclass
class _KeptHandle:
    handle: pygit2.Repository
    read_once: tuple[tuple[str, str | None], ...]
    # the attribute files libgit2 reads beyond the work tree's (the system's, the user's,
    # `info/attributes`); None: `core.autocrlf` may convert any file
    attribute_files: tuple[str, ...] | None
    used: float


def view_commit_handle(ws: Workspace, layers: Path, listing: UpperListing) -> CommitHandle | None:
    """A handle kept by this thread for the quick commit (`quick_upper` gave `listing`) of the
    view `ws`, not registered: opened on `commit_git_dir`, its work tree the checkout of the
    view's base, so that its rules are loaded once for every view on that base. None when a
    rule libgit2 would read there may not be the view's (`_base_rules_hold`): the caller opens
    a handle on the view itself. The handle is shared: never freed by its user; dropped by
    `drop_idle_branch_handle`, or when this thread keeps others. With it, the pinned git, the
    listed paths no attribute applies to, and the snapshot of the configuration these were
    judged by (None if it could not be taken), for the commit to read."""
    if lists_secured(listing):
        return None  # (what `secure_workspace_git` may move: the view is read after that)
    base = _in_base(layers, ws.base_commit, "tree")
    git_dir = view_git_dir(ws.path)
    kept: dict[tuple[str, str], _KeptHandle] = getattr(_VIEW_HANDLES, "kept", None) or {}
    _VIEW_HANDLES.kept = kept
    key = (str(git_dir), base)
    held = kept.pop(key, None)
    names: list[str] = []
    read_once: tuple[tuple[str, str | None], ...] = ()
    config: pygit2.Config | None = None
    if held is not None:
        config = _snapshot(held.handle)
        names, read_once = _config_of(held.handle, config)
    if held is None or read_once != held.read_once:
        handle = pygit2.Repository(
            str(commit_git_dir(git_dir)), pygit2.enums.RepositoryOpenFlag.NO_SEARCH
        )
        handle.workdir = base
        config = _snapshot(handle)
        names, read_once = _config_of(handle, config)
        held = _KeptHandle(handle, read_once, _attribute_files(handle, read_once), 0.0)
        while len(kept) >= _VIEW_HANDLES_KEPT:
            kept.pop(next(iter(kept)))  # (freed with the last object of it in use)
    held.used = time.monotonic()
    kept[key] = held
    converting = _may_convert(held.attribute_files)
    plain: set[str] = set()
    if not _base_rules_hold(held.handle, layers, base, listing, converting=converting, plain=plain):
        return None
    pinned = pin_listed(git_dir, Path(ws.path), names)
    return CommitHandle(pinned, held.handle, frozenset(plain), config)


def _snapshot(pyrepo: pygit2.Repository) -> pygit2.Config | None:
    """The configuration as it stands, read once: every later read of the live one checks
    each of its files for a change again."""
    try:
        return pyrepo.config.snapshot()
    except pygit2.GitError:
        return None


def _config_of(
    pyrepo: pygit2.Repository, config: pygit2.Config | None = None
) -> tuple[list[str], tuple[tuple[str, str | None], ...]]:
    """The configuration's keys, and its entries that a handle reads once (`_READ_ONCE`);
    `config`: a snapshot of it to read instead."""
    names: list[str] = []
    once: list[tuple[str, str | None]] = []
    try:
        for entry in config if config is not None else pyrepo.config:
            name = entry.name
            names.append(name)
            if name.lower() in _READ_ONCE:
                once.append((name.lower(), entry.value))
    except pygit2.GitError:
        return [], (("unreadable", None),)
    return names, tuple(once)


def _attribute_files(
    pyrepo: pygit2.Repository, read_once: tuple[tuple[str, str | None], ...]
) -> tuple[str, ...] | None:
    """The attribute files libgit2 reads beyond the work tree's, None where `core.autocrlf`
    may convert any file (see `_KeptHandle`)."""
    if any(k == "core.autocrlf" and (v or "").lower() not in _OFF for k, v in read_once):
        return None
    search = pygit2.settings.search_path
    configured = [v for k, v in read_once if k == "core.attributesfile" and v]
    user = [os.path.expanduser(v) for v in configured] or [
        os.path.join(search[pygit2.enums.ConfigLevel.XDG], "attributes")
    ]
    system = os.path.join(search[pygit2.enums.ConfigLevel.SYSTEM], "gitattributes")
    info = os.path.join(common_dir(pyrepo), "info", "attributes")
    return (*user, system, info)


def _may_convert(attribute_files: tuple[str, ...] | None) -> bool:
    """Whether a conversion may apply to a file without an attribute file of its own above it:
    `core.autocrlf` is on (None, see `_attribute_files`), or one of the attribute files
    libgit2 reads beyond the work tree's exists."""
    return attribute_files is None or any(os.path.exists(f) for f in attribute_files)


def drop_idle_view_handles(idle_s: float) -> None:
    """Forget this thread's kept view handles not used for `idle_s` (see
    `drop_idle_branch_handle`)."""
    kept: dict[tuple[str, str], _KeptHandle] | None = getattr(_VIEW_HANDLES, "kept", None)
    if kept:
        now = time.monotonic()
        for key in [k for k, held in kept.items() if now - held.used >= idle_s]:
            del kept[key]


def _base_rules_hold(
    pyrepo: pygit2.Repository,
    layers: Path,
    base: str,
    listing: UpperListing,
    *,
    converting: bool,
    plain: set[str] | None = None,
) -> bool:
    """Whether libgit2, working in the base's checkout `base` through `pyrepo`, tells what
    each file of the view's upper layer (`listing`, which holds no rule file) is exactly as in
    the view, and stores its bytes as they are. The view's rule files are then its base's,
    but where a directory above a file is a link in the base (libgit2 would read through it;
    the view's directory is the upper layer's alone) or one of the user's ignored
    environment laid under the view (`layers/incl`); the base must hold no directory at the
    file's path (libgit2 would match it as one); and no conversion may apply to the file:
    none where no attribute file exists for it (`converting`: one beyond the work tree's
    does, or `core.autocrlf` is on), else as libgit2 tells. `plain` gets the listed paths no
    attribute applies to: no attribute file exists for them, in the base's directories above
    them nor beyond the work tree (the handle's index, `commit_git_dir`'s, holds none)."""
    try:
        laid = _laid_under(layers)
        looked: dict[str, bool] = {}  # a directory above a file -> it has a `.gitattributes`
        for rel, is_dir in listing:
            if is_dir:
                continue
            if laid and any(is_within(rel, place) for place in laid):
                return False
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                if stat.S_ISDIR(os.lstat(os.path.join(base, rel)).st_mode):
                    return False
            attributed = converting
            above = rel
            while True:
                above = above.rpartition("/")[0]
                found = looked.get(above)
                if found is None:
                    at = os.path.join(base, above) if above else base
                    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                        if above and stat.S_ISLNK(os.lstat(at).st_mode):
                            return False
                    found = looked[above] = os.path.lexists(os.path.join(at, ".gitattributes"))
                attributed = attributed or found
                if not above:
                    break
            if attributed and pyrepo.load_filter_list(rel) is not None:
                return False
            if not attributed and plain is not None:
                plain.add(rel)
    except (OSError, pygit2.GitError, ValueError):
        return False
    return True


def _laid_under(layers: Path) -> list[str]:
    """The repository paths of the user's ignored directories laid under the view."""
    try:
        entries = list(os.scandir(layers / "incl"))
    except FileNotFoundError:
        return []
    out: list[str] = []
    for entry in entries:
        rel = read_record(os.path.join(entry.path, "path"))
        if rel is None:
            raise ValueError(f"{entry.path} names no path")
        out.append(rel)
    return out


def _candidates(
    upper: Path, base_tree: pygit2.Tree, driver: str, listing: UpperListing | None = None
) -> set[str]:
    """The repository paths the upper layer of `driver` may change: its files, its
    whiteouts, and every base file under a whited-out, opaque or replaced directory.
    `listing`: the upper layer's entries as `quick_upper` read them (it has neither
    whiteouts nor opaque directories), used instead of reading it again."""
    fuse = driver == overlay.FUSE
    found: set[str] = set()

    def base_files_under(prefix: str) -> Iterable[str]:
        try:
            entry = base_tree[prefix]
        except KeyError:
            return ()
        if entry.filemode != _TREE:
            return (prefix,)
        out: list[str] = []
        stack = [(prefix, entry.peel(pygit2.Tree))]
        while stack:
            at, tree = stack.pop()
            for child in tree:
                name = f"{at}/{child.name}"
                if child.filemode == _TREE:
                    stack.append((name, child.peel(pygit2.Tree)))
                else:
                    out.append(name)
        return out

    def add(rel: str, is_dir: bool) -> None:
        """The upper layer's entry at `rel`: a directory changes its path where the base has a
        file there; a file, a link (to a directory too) or a whiteout hides whatever the base
        holds at its path."""
        if is_dir:
            with contextlib.suppress(KeyError):
                if base_tree[rel].filemode != _TREE:
                    found.add(rel)
            return
        found.add(rel)
        found.update(base_files_under(rel))

    if listing is not None:
        for rel_dir, name, is_dir in listed_below(listing):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if rel != ".git":  # the server's gitfile
                add(rel, is_dir)
        return found

    for dirpath, dirnames, filenames in walk(upper):
        rel_dir = os.path.relpath(dirpath, upper).replace(os.sep, "/")
        prefix = "" if rel_dir == "." else rel_dir + "/"
        if prefix and overlay.is_opaque(Path(dirpath), driver):
            found.update(base_files_under(rel_dir))
        real_dirs: list[str] = []
        for name in (*dirnames, *filenames):
            rel = prefix + name
            if rel == ".git":
                continue  # the server's gitfile
            if fuse and name.startswith(overlay.WHITEOUT_PREFIX):
                # fuse-overlayfs's marks: an opaque directory's, or a whiteout as a file
                hidden = name[len(overlay.WHITEOUT_PREFIX) :]
                if hidden and not hidden.startswith(".wh.") and hidden != ".opq":
                    found.add(prefix + hidden)
                    found.update(base_files_under(prefix + hidden))
                continue
            try:
                is_dir = stat.S_ISDIR(os.lstat(os.path.join(dirpath, name)).st_mode)
            except OSError:
                is_dir = False  # (gone, or too long a path: `_view_changes` says which)
            if is_dir:
                real_dirs.append(name)
            add(rel, is_dir)
        dirnames[:] = [d for d in real_dirs if d.casefold() != ".git"]
    return found


def _view_changes(
    pyrepo: pygit2.Repository,
    pinned: Pinned,
    base_tree: pygit2.Tree,
    candidates: set[str],
    scope: WriteScope,
    *,
    shared: bool = False,
    config: pygit2.Config | None = None,
) -> tuple[dict[str, tuple[str, int] | None], list[str]]:
    """What each candidate path is in the view (a blob and mode, or None: absent), for those
    that differ from the base and lie in scope; and the out-of-scope ones that differ.
    `shared`: `pyrepo` is a kept handle on the view's base (`view_commit_handle`); `config`: a
    snapshot of its configuration, read instead of the live one."""
    root = pinned.work_tree
    gitlinks = _gitlinks_of(base_tree, candidates)
    wanted: dict[str, int] = {}
    deleted: list[str] = []
    file_mode = _file_mode_trusted(pyrepo, config)
    unnamed: list[str] = []
    dirs: dict[str, bool] = {}
    for rel in sorted(candidates):
        if any(is_within(rel, g) for g in gitlinks):
            continue  # inside a submodule: git records only the gitlink
        shown = shown_path(rel)
        if len(os.fsencode(root)) + 1 + len(os.fsencode(rel)) >= PATH_MAX:
            # no system call takes the path: git could not add it either
            unnamed.append(f"{shown} (its path is too long for this system: shorten it)")
            continue
        try:
            base_entry: pygit2.Object | None = base_tree[rel]
        except KeyError:
            base_entry = None
        if base_entry is not None and base_entry.filemode == _TREE:
            base_entry = None
        try:
            # beyond a link (an agent's `src -> /elsewhere`) git sees nothing: never read there
            st = None if _beyond_link(root, rel, dirs) else os.lstat(root / rel)
        except (FileNotFoundError, NotADirectoryError):
            st = None
        if st is None or not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            if base_entry is not None:
                deleted.append(rel)
            continue
        if base_entry is None and _ignored(pyrepo, pinned, rel):
            continue  # untracked and ignored: `git add -A` would leave it out too
        if stat.S_ISLNK(st.st_mode):
            if rel.rpartition("/")[2].casefold() == ".gitmodules":
                # git refuses it (`verify_path`): a link where it reads submodules from
                unnamed.append(f"{shown} (a symbolic link named .gitmodules, which git refuses)")
                continue
            mode = int(_LINK)
        elif file_mode:
            mode = int(_EXEC if st.st_mode & stat.S_IXUSR else _BLOB)
        else:
            mode = int(base_entry.filemode) if base_entry is not None else int(_BLOB)
        wanted[rel] = mode
    blobs = _hash(pyrepo, pinned, base_tree, sorted(wanted), shared=shared, config=config)
    changes: dict[str, tuple[str, int] | None] = {}
    dropped: list[str] = []
    for rel, mode in wanted.items():
        try:
            entry = base_tree[rel]
            same = str(entry.id) == blobs[rel] and int(entry.filemode) == mode
        except KeyError:
            same = False
        if same:
            continue
        if scope.allows(rel):
            changes[rel] = (blobs[rel], mode)
        else:
            dropped.append(rel)
    for rel in deleted:
        if scope.allows(rel):
            changes[rel] = None
        else:
            dropped.append(rel)
    return changes, sorted(dropped) + unnamed


def _beyond_link(root: Path, rel: str, dirs: dict[str, bool]) -> bool:
    """Whether a directory above `rel` in the view is not a directory there (a link, a file,
    nothing, a path too long to reach), as git's `has_symlink_leading_path` asks; `dirs` keeps
    each directory's answer (whether it and all above it are directories). Without recursion:
    an agent's directories may nest thousands deep."""
    parent = rel.rpartition("/")[0]
    if not parent:
        return False
    unknown: list[str] = []  # the directories above `rel` not looked at yet, nearest first
    here = parent
    while here and here not in dirs:
        unknown.append(here)
        here = here.rpartition("/")[0]
    whole = dirs[here] if here else True
    for above in reversed(unknown):
        if whole:
            try:
                whole = stat.S_ISDIR(os.lstat(root / above).st_mode)
            except OSError:
                whole = False
        dirs[above] = whole
    return not dirs[parent]


def _gitlinks_of(base_tree: pygit2.Tree, candidates: Iterable[str]) -> set[str]:
    out: set[str] = set()
    for rel in candidates:
        parts = rel.split("/")
        for i in range(1, len(parts) + 1):
            with contextlib.suppress(KeyError):
                if base_tree["/".join(parts[:i])].filemode == _GITLINK:
                    out.add("/".join(parts[:i]))
                    break
    return out


def _file_mode_trusted(pyrepo: pygit2.Repository, config: pygit2.Config | None = None) -> bool:
    try:
        return (config if config is not None else pyrepo.config).get_bool("core.fileMode")
    except (KeyError, pygit2.GitError):
        return True


def _ignored(pyrepo: pygit2.Repository, pinned: Pinned, rel: str) -> bool:
    """Whether git ignores the view's path `rel`. Git reads no `.gitignore` through a link,
    and libgit2 follows one: under such a link, pinned git decides; also for a link to a
    directory, which libgit2 takes for a directory (`build/` would match it) and git does not."""
    root = str(pinned.work_tree)
    full = os.path.join(root, rel)
    if (
        not is_utf8(rel)  # (libgit2 takes UTF-8 paths only)
        or (os.path.islink(full) and os.path.isdir(full))
        or any(os.path.islink(os.path.join(root, p)) for p in _rule_files_above(rel, ".gitignore"))
    ):
        done = gitcmd.run(
            pinned.work_tree, ["check-ignore", "-q", "--no-index", "--", rel], pinned=pinned
        )
        if done.returncode in (0, 1):
            return done.returncode == 0
        raise RepositoryError(
            f"git could not tell whether {rel} is ignored in {pinned.work_tree}: "
            f"{done.stderr.strip()}"
        )
    try:
        return bool(pyrepo.path_is_ignored(rel))
    except pygit2.GitError:
        return False


def _hash(
    pyrepo: pygit2.Repository,
    pinned: Pinned,
    base_tree: pygit2.Tree,
    paths: list[str],
    *,
    shared: bool = False,
    config: pygit2.Config | None = None,
) -> dict[str, str]:
    """Blob ids of the view's files as git's `hash-object` stores them, under the attributes
    of the view's own files (their conversions applied): in-process where libgit2 converts as
    git does and reads the same rules (`_same_rules`), else by pinned git. A symbolic link's
    blob is its target. `shared`: `pyrepo` is a kept handle on the view's base, for whose
    files no conversion applies (`view_commit_handle`): their bytes are stored as they are.
    `config`: a snapshot of its configuration, read instead of the live one."""
    with _Beneath(str(pinned.work_tree)) as beneath:
        return _hash_beneath(
            pyrepo, pinned, base_tree, paths, beneath, shared=shared, config=config
        )


def _hash_beneath(
    pyrepo: pygit2.Repository,
    pinned: Pinned,
    base_tree: pygit2.Tree,
    paths: list[str],
    beneath: _Beneath,
    *,
    shared: bool,
    config: pygit2.Config | None,
) -> dict[str, str]:
    out: dict[str, str] = {}
    files: list[str] = []
    for rel in paths:
        try:
            target = beneath.link_target(rel)
        except OSError:  # (gone, or a link above it since it was listed: hashed below, or not)
            target = None
        if target is not None:
            out[rel] = str(pyrepo.create_blob(target))
        else:
            files.append(rel)
    # libgit2 takes UTF-8 paths only: git hashes the others, as `git add` stores them
    odd = [rel for rel in files if not is_utf8(rel)]
    files = [rel for rel in files if is_utf8(rel)]
    if not files and not odd:
        return out
    # (the pinned configuration turns off each filter driver the repository's configuration
    # names: none there, none to read again)
    drivers = bool(pinned.config)
    if (
        files
        and _LIBGIT2.accepts(
            pyrepo, base_tree, filter_drivers=drivers, work_tree=pinned.work_tree, config=config
        )
        and _same_rules(pyrepo, pinned.work_tree, files)
    ):
        try:
            if shared:
                # (stored as they are: libgit2 would look for attributes and filters again)
                out |= {rel: str(pyrepo.create_blob(beneath.plain_file(rel))) for rel in files}
            else:
                for rel in files:  # (libgit2 opens by name: no link above, no pipe, when looked)
                    beneath.plain_file(rel, cap=None)
                out |= {rel: str(pyrepo.create_blob_fromworkdir(rel)) for rel in files}
            files = []
        except (pygit2.GitError, OSError, ValueError) as exc:
            log.info("in-process hashing in %s failed (%s); git hashes it", pinned.work_tree, exc)
    files += odd
    if not files:
        return out
    # one process for every name git can read a line at a time, one each for the others
    batch = [rel for rel in files if "\n" not in rel]
    batches: list[tuple[list[str], list[str], str | None]] = [
        (batch, ["hash-object", "-w", "--stdin-paths"], "".join(p + "\n" for p in batch))
    ]
    batches += [([rel], ["hash-object", "-w", "--", rel], None) for rel in files if "\n" in rel]
    for names, args, text in batches:
        if not names:
            continue
        done = gitcmd.run(pinned.work_tree, args, pinned=pinned, input=text)
        ids = done.stdout.split()
        if done.returncode != 0 or len(ids) != len(names):
            raise RepositoryError(
                f"git could not hash the work of {pinned.work_tree}: {done.stderr.strip()}"
            )
        out.update(zip(names, ids, strict=True))
    return out


# how many directories deep `_Beneath` opens a view's directories (each kept open)
_DEEPEST_OPENED = 128


class _Beneath:
    """A view's files as a commit reads them: through directories opened without following a
    link (each kept open for the files beside it), never waiting on a pipe."""

    def __init__(self, root: str) -> None:
        self._root = root
        self._dirs: dict[str, int] = {}

    def __enter__(self) -> _Beneath:
        return self

    def __exit__(self, *_exc: object) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    def _dir(self, rel_dir: str) -> int:
        """A descriptor of the directory `rel_dir`, opened step by step without following a
        link (OSError at a link or a file, and below `_DEEPEST_OPENED` levels: each is kept
        open, so git reads what lies deeper)."""
        fd = self._dirs.get(rel_dir)
        if fd is not None:
            return fd
        if rel_dir.count("/") >= _DEEPEST_OPENED:
            raise OSError(errno.ENAMETOOLONG, f"{rel_dir} is too deep to open step by step")
        unopened: list[str] = []  # nearest first
        here = rel_dir
        while here and here not in self._dirs:
            unopened.append(here)
            here = here.rpartition("/")[0]
        if here not in self._dirs:
            self._dirs[""] = os.open(self._root, DIR_FLAGS)
        for below in reversed(unopened):
            above, _, name = below.rpartition("/")
            self._dirs[below] = os.open(name, DIR_FLAGS, dir_fd=self._dirs[above])
        return self._dirs[rel_dir]

    def plain_file(self, rel: str, *, cap: int | None = QUICK_COMMIT_BYTES) -> bytes:
        """The bytes of the regular file `rel` for a quick commit (`cap` bytes at most; None:
        only looked at, nothing read); OSError for anything else (a link, a pipe, a file that
        grew since it was listed, a link above it): git then hashes it (`_hash`)."""
        parent, _, name = rel.rpartition("/")
        dfd = self._dir(parent)
        if cap is not None:
            data = read_regular_file(name, cap, dfd)
        else:
            info = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            data = b"" if stat.S_ISREG(info.st_mode) else None
        if data is None:
            raise OSError(f"{rel} is not a file of a quick commit")
        return data

    def link_target(self, rel: str) -> bytes | None:
        """The target of the link `rel`, None when it is not a link."""
        parent, _, name = rel.rpartition("/")
        try:
            return os.readlink(os.fsencode(name), dir_fd=self._dir(parent))
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # not a link
                return None
            raise


def _same_rules(pyrepo: pygit2.Repository, root: Path, files: Sequence[str]) -> bool:
    """Whether libgit2 hashes `files` under the same attributes as git's `hash-object` in the
    view at `root`. Git reads the `.gitattributes` of each directory above a file from the work
    tree alone, and never through a link; libgit2 also reads the one the handle's index holds
    (the view's index, or for a view not registered, the user's, which they may change while
    the agent works), and follows links. They agree where, for each of those `.gitattributes`,
    the index holds none, or the view holds the same content as a plain file; and neither
    applies where one of them (the agent's own, say) names an attribute libgit2 does not
    apply (`NOT_IN_PROCESS_ATTRIBUTE`)."""
    try:
        index = pyrepo.index
    except pygit2.GitError:
        return False
    rule_files = {p for rel in files for p in _rule_files_above(rel, ".gitattributes")}
    top = str(root)
    for name in sorted(rule_files):
        try:
            st: os.stat_result | None = os.lstat(os.path.join(top, name))
        except OSError:
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            return False  # a link (git does not follow it), or what git cannot read
        if st is not None:
            data = read_regular_file(os.path.join(top, name), QUICK_COMMIT_BYTES)
            if data is None or NOT_IN_PROCESS_ATTRIBUTE.encode() in data:
                return False
        try:
            staged = index[name].id
        except KeyError:
            continue
        try:
            if st is None or pygit2.hashfile(str(root / name)) != staged:
                return False
        except (pygit2.GitError, OSError):
            return False
    return True


def _rule_files_above(rel: str, name: str) -> Iterator[str]:
    """The paths of the rule file `name` in each directory above the path `rel`, the root's
    first: where git looks for the rules that apply to `rel`."""
    parts = rel.split("/")[:-1]
    for depth in range(len(parts) + 1):
        yield "/".join((*parts[:depth], name))


def _apply(
    pyrepo: pygit2.Repository,
    tree: pygit2.Tree | None,
    changes: dict[str, tuple[str, int] | None],
) -> pygit2.Oid | None:
    """`tree` with `changes` applied (a blob and mode, or None to delete), rebuilding only the
    subtrees they touch; None for an empty tree."""
    edits: dict[str, TreeEdit] = {
        rel: None if change is None else (pygit2.Oid(hex=change[0]), change[1])
        for rel, change in changes.items()
    }
    return edit_tree(pyrepo, tree, edits)


def view_support(repo: GitRepo, chosen: str = "auto") -> overlay.ViewSupport:
    """Which kind of workspace this process makes in `repo`, and why: `chosen` (the setting
    `workspaces`), or for "auto" what `FANOUT_WORKSPACES` says, else the first that works."""
    preference = chosen.strip().lower()
    if preference == "auto":
        preference = os.environ.get("FANOUT_WORKSPACES", "").strip().lower()
    if preference == overlay.WORKTREE:
        return overlay.ViewSupport(overlay.WORKTREE, "git worktrees (FANOUT_WORKSPACES=worktree)")
    if not plain_worktrees(repo):
        return overlay.ViewSupport(
            overlay.WORKTREE,
            "git worktrees: the repository has a post-checkout hook, a sparse checkout or "
            "per-worktree configuration, which each agent's checkout must run or copy",
        )
    parent = repo.state_dir / "layers"
    parent.mkdir(parents=True, exist_ok=True)
    return overlay.probe_overlay(parent, overlay.FUSE if preference == overlay.FUSE else None)


WORKSPACES: Workspaces = ChosenWorkspaces()
"""The server's workspaces; the one place their kind is chosen."""
create_workspace = WORKSPACES.create
list_workspaces = WORKSPACES.existing
remove_workspace = WORKSPACES.remove
discard_unstarted_workspace = WORKSPACES.discard_unstarted
