"""An agent's workspace as the server records it, and the server's git pinned to those records.

Everything an agent can write is hostile input to the server's git, so git and libgit2 reach a
workspace only through its recorded admin dir and work tree, never by discovery, and any `.git`
the agent planted is moved out (quarantined) before the server's git reads the workspace.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pygit2
from pydantic import BaseModel, Field

from orchestration.errors import RepositoryError
from orchestration.workspace.git import STATE_DIR_NAME, write_whole
from toolbus import gitcmd
from toolbus.gitcmd import Pinned
from toolbus.trees import remove_tree, walk

log = logging.getLogger(__name__)


class Workspace(BaseModel):
    """One agent's scratch checkout: a git worktree on branch `fanout/<run>/<agent>`."""

    path: Path
    branch: str
    base_commit: str
    run_id: str = ""
    agent_id: str = ""
    included: list[str] = Field(default_factory=list[str])

    @property
    def branch_ref(self) -> str:
        """The full ref name of the workspace's branch."""
        return f"refs/heads/{self.branch}"

    @property
    def admin_dir(self) -> Path | None:
        """The worktree's admin git dir (`<git dir>/worktrees/<name>`) from the server's records,
        None when the workspace is not registered."""
        return admin_dir_of(self.path)


# Workspace path (absolute, as asked) -> (its real path, its admin dir), from an earlier
# `admin_dir_of`: the same workspace is asked about several times, and its real path costs a
# lookup per path component. An entry is used only while the real path is still the directory
# the path names and the admin dir's `gitdir` (in the common git dir, which commands cannot
# write) still names it; otherwise the admin dir is looked for again.
_known_admin_dirs: dict[str, tuple[str, Path]] = {}
_KNOWN_ADMIN_DIRS_KEPT = 4096


def admin_dir_of(path: Path) -> Path | None:
    """The admin git dir of the agent workspace at `path`, found from the files in the common
    git dir (`worktrees/<name>/gitdir` names the workspace), which commands cannot write; never
    from the workspace's own `.git`, which the agent can replace. None when there is none."""
    found = _registered(path)
    return None if found is None else found[1]


def _registered(path: Path) -> tuple[str, Path] | None:
    """The real path of the workspace at `path` and its admin dir (`admin_dir_of`)."""
    key = os.path.abspath(path)
    known = _known_admin_dirs.get(key)
    if known is not None:
        real, admin = known
        if _same_dir(key, real) and points_here(admin, os.path.join(real, ".git")):
            return known
    real = os.path.realpath(key)
    admin = _find_admin_dir(Path(real))
    if admin is None:
        return None
    if len(_known_admin_dirs) >= _KNOWN_ADMIN_DIRS_KEPT:
        _known_admin_dirs.clear()
    _known_admin_dirs[key] = (real, admin)
    return real, admin


def _same_dir(path: str, real: str) -> bool:
    """Whether `real` is a directory and the one `path` names."""
    try:
        st = os.stat(real)
        if not stat.S_ISDIR(st.st_mode):
            return False
        if path == real:
            return True
        other = os.stat(path)
    except OSError:
        return False
    return (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)


def points_here(admin: Path, want: str) -> bool:
    """Whether the admin dir `admin` is a worktree's whose `gitdir` names `want`."""
    try:
        target = (admin / "gitdir").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return False
    return os.path.normpath(target) == want and (admin / "HEAD").is_file()


def _find_admin_dir(real: Path) -> Path | None:
    """`admin_dir_of` the workspace whose real path is `real`, looked for in the common git dir."""
    if len(real.parents) < 4 or not real.is_dir():
        return None
    if real.parents[1].name != "worktrees" or real.parents[2].name != STATE_DIR_NAME:
        return None
    admin_root = real.parents[3] / "worktrees"
    want = os.path.join(real, ".git")
    # the admin dir is named after the workspace unless that name was taken
    first = admin_root / real.name
    if points_here(first, want):
        return first
    try:
        others = sorted(p for p in admin_root.iterdir() if p != first)
    except OSError:
        return None
    return next((admin for admin in others if points_here(admin, want)), None)


def pin(path: Path, *, first_checkout: bool = False) -> Pinned:
    """How the server's git runs on the workspace at `path`: its recorded git dir and work tree,
    with every command-running configuration and the repository's filter drivers off (see
    `toolbus.gitcmd`), except for the first checkout of the base into a new workspace: the
    user's files, before any agent ran there, get the user's hooks and filters as `git worktree
    add` would run them."""
    found = _registered(path)
    if found is None:
        raise RepositoryError(
            f"the workspace {path} is missing or not registered in the repository; it was "
            "removed or never created"
        )
    work_tree, admin = Path(found[0]), found[1]
    if first_checkout:
        return Pinned(admin, work_tree, safe=False)
    return pin_at(admin, work_tree)


def pin_and_open(path: Path) -> tuple[Pinned, pygit2.Repository | None]:
    """`pin(path)` and the libgit2 handle its configuration was read from (as
    `open_workspace_repo` opens it; None when libgit2 cannot open it), for a caller that
    needs both: the repository is opened once."""
    found = _registered(path)
    if found is None:
        return pin(path), None  # raises: not registered
    work_tree, admin = Path(found[0]), found[1]
    try:
        pyrepo = pygit2.Repository(str(admin), pygit2.enums.RepositoryOpenFlag.NO_SEARCH)
    except pygit2.GitError:
        return pin_listed(admin, work_tree, []), None
    try:
        names = _names_in(pyrepo)
    except BaseException:
        pyrepo.free()
        raise
    return pin_listed(admin, work_tree, names), pyrepo


COMMIT_GIT_DIR = "commit-gitdir"
"""Under the state dir: a git dir of the repository's objects, references and configuration
(its `commondir`) with no index, that libgit2 opens to commit a view not registered."""


def commit_git_dir(git_dir: Path) -> Path:
    """`<git dir>/fanout/commit-gitdir`, made when missing (its two files never change, each
    written whole): a handle opened there has the repository's objects, references and
    configuration, and an index of its own that does not exist, so libgit2 reads attributes from
    the view's files alone, as git does in it, and never loads the repository's index, whose
    size is the repository's."""
    admin = git_dir / STATE_DIR_NAME / COMMIT_GIT_DIR
    for _ in range(2):
        if (admin / "HEAD").is_file():
            return admin
        # made whole beside it and renamed into place: threads and processes may race here
        admin.parent.mkdir(parents=True, exist_ok=True)
        made = Path(tempfile.mkdtemp(prefix=f".{COMMIT_GIT_DIR}-", dir=admin.parent))
        try:
            (made / "commondir").write_text("../..\n", encoding="utf-8")
            # an unborn branch: the handle is never checked out, and HEAD must name something
            (made / "HEAD").write_text("ref: refs/heads/fanout-commit-handle\n", encoding="utf-8")
            try:
                os.rename(made, admin)
            except OSError:
                if not (admin / "HEAD").is_file():  # a partial one, not another's whole one
                    shutil.rmtree(admin, ignore_errors=True)
        finally:
            shutil.rmtree(made, ignore_errors=True)
    if not (admin / "HEAD").is_file():
        raise RepositoryError(f"{admin} could not be made; check the permissions of {git_dir}")
    return admin


def pin_and_open_view(git_dir: Path, work_tree: Path) -> tuple[Pinned, pygit2.Repository]:
    """As `pin_and_open`, for a copy-on-write view not registered as a git worktree: git is
    pinned to the repository's git dir with the view as its work tree; the libgit2 handle is
    opened on `commit_git_dir` (the same objects, references and configuration, no index),
    the view its work tree (in the handle only: nothing is written)."""
    pyrepo = pygit2.Repository(
        str(commit_git_dir(git_dir)), pygit2.enums.RepositoryOpenFlag.NO_SEARCH
    )
    try:
        pyrepo.workdir = str(work_tree)
        names = _names_in(pyrepo)
    except BaseException:
        pyrepo.free()
        raise
    return pin_listed(git_dir, work_tree, names), pyrepo


def open_workspace_repo(pinned: Pinned) -> pygit2.Repository:
    """A libgit2 handle on a workspace, opened at its recorded git dir (no discovery)."""
    return pygit2.Repository(str(pinned.git_dir), pygit2.enums.RepositoryOpenFlag.NO_SEARCH)


def pin_at(git_dir: Path, work_tree: Path) -> Pinned:
    """Git pinned to `git_dir` and `work_tree` (a workspace, a verification's scratch
    checkout, the base of an agent's own work), every command-running key, filter driver and
    configured hook off: those libgit2 finds in `git_dir`'s configuration and those git itself
    lists for this very git dir and work tree (`pin_listed`)."""
    return pin_listed(git_dir, work_tree, _config_names(git_dir))


def pin_listed(git_dir: Path, work_tree: Path, names: Sequence[str]) -> Pinned:
    """A workspace pinned with every filter driver off that its configuration's keys as
    libgit2 listed them name (`names`), or that the files git reads in place of the global and
    system ones name (`GIT_CONFIG_GLOBAL`, `GIT_CONFIG_SYSTEM`, which git's commands get and
    libgit2 does not read); and those git itself lists before its first command
    (`gitcmd.pin_named`)."""
    return gitcmd.pin_named(git_dir, work_tree, [*names, *_env_config_names()])


def _config_names(admin: Path) -> list[str]:
    try:
        pyrepo = pygit2.Repository(str(admin), pygit2.enums.RepositoryOpenFlag.NO_SEARCH)
    except pygit2.GitError:
        return []
    try:
        return _names_in(pyrepo)
    finally:
        pyrepo.free()


def _names_in(pyrepo: pygit2.Repository) -> list[str]:
    """The keys of the repository's configuration as libgit2 lists them, [] when it cannot
    read them (git lists its own too: `pin_listed`)."""
    try:
        return [entry.name for entry in pyrepo.config]
    except pygit2.GitError:
        return []


def _env_config_names() -> list[str]:
    names: list[str] = []
    for variable in ("GIT_CONFIG_GLOBAL", "GIT_CONFIG_SYSTEM"):
        path = os.environ.get(variable)
        if not path or (variable == "GIT_CONFIG_SYSTEM" and os.environ.get("GIT_CONFIG_NOSYSTEM")):
            continue
        try:
            config = pygit2.Config(path)
        except (pygit2.GitError, OSError):
            continue  # (missing: git reads nothing there either)
        with contextlib.suppress(pygit2.GitError):
            names += [entry.name for entry in config]
    return names


RULE_FILES = frozenset({".gitattributes", ".gitignore", ".gitmodules"})
"""The files of a work tree that git and libgit2 read rules from (matched case-blind)."""
_SECURED_NAMES = RULE_FILES | {".git"}


def lists_secured(listing: Sequence[tuple[str, bool]]) -> bool:
    """Whether a listing of an upper layer (each path and whether it is a directory) holds a
    name `secure_workspace_git` may move or remove: a rule file or a `.git`."""
    return any(os.path.basename(rel).casefold() in _SECURED_NAMES for rel, _ in listing)


def is_rule_file(rel: str) -> bool:
    """Whether the work tree's path `rel` names one of `RULE_FILES`."""
    return rel.rsplit("/", 1)[-1].casefold() in RULE_FILES


_KINDS = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"))


def _remove_if_blocking(root: Path, rel: str) -> str | None:
    """Remove `root/rel` if opening it to read could block or read a device: what it was, or
    None when it is a file, a directory, a link to one of them, a dangling link, or gone (an
    upper layer's whiteout)."""
    path = root / rel
    try:
        st = os.lstat(path)
    except OSError:
        return None
    what = _blocking_kind(st.st_mode)
    if what is None and stat.S_ISLNK(st.st_mode):
        try:
            target = os.stat(path)
        except OSError:
            return None  # dangling, or a loop: opening it fails at once
        kind = _blocking_kind(target.st_mode)
        what = None if kind is None else f"a link to {kind}"
    if what is None:
        return None
    try:
        os.unlink(path)
    except OSError as exc:
        raise RepositoryError(
            f"{rel} in the workspace {root} is {what}, which git would wait on; it could not "
            f"be removed ({exc.strerror}): remove it and commit again"
        ) from exc
    return what


def remove_blocking_rule_files(root: Path, walk_root: Path) -> list[str]:
    """Remove from the work tree `root` the rule files (`RULE_FILES`) that git would wait on
    (`_remove_if_blocking`), looking for them under `walk_root` (`root`, or a view's upper
    layer); what was removed, as the agent's result words it."""
    return [
        removed
        for rel_dir, name in _names_below(walk_root)
        if (removed := _removed_rule_file(root, rel_dir, name))
    ]


def _removed_rule_file(root: Path, rel_dir: str, name: str) -> str | None:
    """`_remove_if_blocking` for the entry `name` of the directory `rel_dir` of `root`, if it is
    a rule file: the agent's result's line for it, or None when it stays."""
    if not is_rule_file(name):
        return None
    rel = name if rel_dir == "." else f"{rel_dir}/{name}"
    removed = _remove_if_blocking(root, rel)
    return f"{rel} ({removed} where git reads rules; removed)" if removed else None


def _names_below(top: Path) -> Iterator[tuple[str, str]]:
    """(directory, name) of every entry below `top` (the directory "." for `top` itself),
    nothing below a directory named `.git` in any case."""
    for dirpath, dirnames, filenames in walk(top):
        rel_dir = os.path.relpath(dirpath, top).replace(os.sep, "/")
        for name in (*dirnames, *filenames):
            yield rel_dir, name
        dirnames[:] = [d for d in dirnames if d.casefold() != ".git"]


def listed_below(listing: Sequence[tuple[str, bool]]) -> Iterator[tuple[str, str, bool]]:
    """(directory, name, whether a directory) of entries already read (each path, relative to
    the top, and whether it is a directory), as `_names_below` walks them: the directory "."
    for the top, nothing below a directory named `.git` in any case."""
    for rel, is_dir in listing:
        parent, _, name = rel.rpartition("/")
        if not any(part.casefold() == ".git" for part in parent.split("/")):
            yield parent or ".", name, is_dir


def _blocking_kind(mode: int) -> str | None:
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
        return None
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return "a device"


def _set_aside(source: Path, target: Path) -> None:
    """Move the agent's `source` (a file, link or directory) out of its workspace to
    `target`: renamed where both are on one filesystem; else (a view's files are on its
    overlay) copied, links as links and named pipes, sockets and devices left out (nothing
    is read from them), then removed. The copy is for inspection and may be partial; the
    removal from the workspace is what matters, and an error of it is raised."""
    try:
        os.rename(source, target)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    st = os.lstat(source)
    if stat.S_ISDIR(st.st_mode):
        _copy_tree(source, target)
        remove_tree(source)
        return
    with contextlib.suppress(OSError):
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(source), target)
        else:
            _copy_regular(source, target)
    os.unlink(source)


def _copy_tree(source: Path, target: Path) -> None:
    """What `_set_aside` keeps of a directory: its directories, links and regular files, as
    far as they can be copied (any depth; what cannot be is left out)."""
    for here, dirs, files in walk(source):
        rel = os.path.relpath(here, source)
        into = os.path.normpath(os.path.join(target, rel))
        try:
            os.mkdir(into, 0o700)
        except FileExistsError:
            pass
        except OSError:
            dirs[:] = []
            continue
        regular = set(files)
        for name in (*dirs, *files):
            src, dst = os.path.join(here, name), os.path.join(into, name)
            with contextlib.suppress(OSError):
                if os.path.islink(src):
                    os.symlink(os.readlink(src), dst)
                elif name in regular:
                    _copy_regular(src, dst)


def _copy_regular(source: str | Path, target: str | Path) -> None:
    """Copy `source` to `target` if it is a regular file when opened (not following a link,
    not waiting on a pipe swapped in after a look); anything else is left out."""
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return
        out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with open(out, "wb") as sink:
            while chunk := os.read(fd, 1 << 20):
                sink.write(chunk)
    finally:
        os.close(fd)


def secure_workspace_git(
    pinned: Pinned,
    *,
    upper: Path | None = None,
    gitfile: bool = True,
    listing: Sequence[tuple[str, bool]] | None = None,
) -> list[str]:
    """Make the workspace's git what the server created before the server's git reads it: a
    root `.git` that is not the server's gitfile, and any `.git` below the root (a planted
    repository, which git would commit as an embedded repository), are the agent's content:
    each is moved out of the workspace, under `<state dir>/quarantine/<workspace>/`, and the
    server's gitfile is put back. Returns what was moved or restored, for the agent's result.
    For a copy-on-write view, `upper` is its upper layer: whatever the agent made is there, so
    only it is searched (the base, a git tree, holds no `.git`). Not `gitfile`: a view not
    registered as a git worktree (`pinned` is the repository's git dir), whose root has no
    `.git` of the server's: one there is the agent's, and none is put back.

    Git and libgit2 open the files they read rules from (`RULE_FILES`) as they find them, and
    opening a named pipe blocks until something writes to it: one of those names that is not
    a file, a directory or a link to either (a pipe, a socket, a device, or a link to one of
    them) is removed from the workspace, as it cannot be committed anyway.

    `listing`: the entries of `upper` (each path and whether it is a directory) as the caller
    just read them, looked at instead of walking it again. What was found is reported in the
    order of its paths."""
    root = pinned.work_tree
    found: list[str] = []
    expected = f"gitdir: {pinned.git_dir}"
    dot_git = root / ".git"
    ours = False
    try:
        st = dot_git.lstat()
        if gitfile and stat.S_ISREG(st.st_mode) and st.st_size < 4096:
            ours = dot_git.read_text(encoding="utf-8").strip() == expected
    except (OSError, UnicodeDecodeError):
        st = None
    planted: list[str] = []
    if st is not None and not ours:
        planted.append(".git")
    names = (
        _names_below(upper or root)
        if listing is None or upper is None
        else ((rel_dir, name) for rel_dir, name, _ in listed_below(listing))
    )
    for rel_dir, name in sorted(names):
        # (the root's own `.git` is looked at above; `.GIT` there is a tree entry no git takes)
        if name.casefold() == ".git" and (rel_dir != "." or name != ".git"):
            planted.append(name if rel_dir == "." else f"{rel_dir}/{name}")
        elif removed := _removed_rule_file(root, rel_dir, name):
            found.append(removed)
    if planted:
        common = pinned.git_dir.parent.parent if gitfile else pinned.git_dir
        quarantine = common / STATE_DIR_NAME / "quarantine" / root.name
        quarantine.mkdir(parents=True, exist_ok=True)
        batch = Path(tempfile.mkdtemp(prefix="planted-", dir=quarantine))
        for rel in planted:
            target = batch / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            _set_aside(root / rel, target)
            found.append(f"{rel} (a .git the agent made; moved out of the workspace)")
    if gitfile and not ours:
        if st is None:
            found.append(".git (removed by the agent; the server's was put back)")
        write_whole(dot_git, expected + "\n")
    if found:
        log.warning("workspace %s: %s", root, "; ".join(found))
    return found
