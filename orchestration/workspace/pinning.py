"""An agent's workspace as the server records it, and the server's git pinned to those records.

Everything an agent can write is hostile input to the server's git, so git and libgit2 reach a
workspace only through its recorded admin dir and work tree, never by discovery, and any `.git`
the agent planted is moved out (quarantined) before the server's git reads the workspace.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pygit2
from pydantic import BaseModel, Field

from orchestration.errors import RepositoryError
from orchestration.workspace.git import STATE_DIR_NAME, write_whole
from toolbus import gitcmd
from toolbus.gitcmd import Pinned

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


def admin_dir_of(path: Path) -> Path | None:
    """The admin git dir of the agent workspace at `path`, found from the files in the common
    git dir (`worktrees/<name>/gitdir` names the workspace), which commands cannot write; never
    from the workspace's own `.git`, which the agent can replace. None when there is none."""
    real = Path(os.path.realpath(path))
    if len(real.parents) < 4 or not real.is_dir():
        return None
    if real.parents[1].name != "worktrees" or real.parents[2].name != STATE_DIR_NAME:
        return None
    admin_root = real.parents[3] / "worktrees"
    want = os.path.join(real, ".git")

    def points_here(admin: Path) -> bool:
        try:
            target = (admin / "gitdir").read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return False
        return os.path.normpath(target) == want and (admin / "HEAD").is_file()

    # the admin dir is named after the workspace unless that name was taken
    first = admin_root / real.name
    if points_here(first):
        return first
    try:
        others = sorted(p for p in admin_root.iterdir() if p != first)
    except OSError:
        return None
    return next((admin for admin in others if points_here(admin)), None)


def pin(path: Path, *, first_checkout: bool = False) -> Pinned:
    """How the server's git runs on the workspace at `path`: its recorded git dir and work tree,
    with every command-running configuration and the repository's filter drivers off (see
    `toolbus.gitcmd`), except for the first checkout of the base into a new workspace: the
    user's files, before any agent ran there, get the user's hooks and filters as `git worktree
    add` would run them."""
    admin = admin_dir_of(path)
    if admin is None:
        raise RepositoryError(
            f"the workspace {path} is missing or not registered in the repository; it was "
            "removed or never created"
        )
    work_tree = Path(os.path.realpath(path))
    if first_checkout:
        return Pinned(admin, work_tree, safe=False)
    return Pinned(admin, work_tree, gitcmd.filter_overrides(_config_names(admin)))


def open_workspace_repo(pinned: Pinned) -> pygit2.Repository:
    """A libgit2 handle on a workspace, opened at its recorded git dir (no discovery)."""
    return pygit2.Repository(str(pinned.git_dir), pygit2.enums.RepositoryOpenFlag.NO_SEARCH)


def pin_scratch(git_dir: Path, work_tree: Path) -> Pinned:
    """Pinned git for a scratch checkout of the server's own (a verification's): the
    repository's git dir, that work tree, every command-running key and filter driver off."""
    return Pinned(git_dir, work_tree, gitcmd.filter_overrides(_config_names(git_dir)))


def _config_names(admin: Path) -> list[str]:
    try:
        pyrepo = pygit2.Repository(str(admin), pygit2.enums.RepositoryOpenFlag.NO_SEARCH)
    except pygit2.GitError:
        return []
    try:
        return [entry.name for entry in pyrepo.config]
    except pygit2.GitError:
        return []
    finally:
        pyrepo.free()


def secure_workspace_git(pinned: Pinned, *, upper: Path | None = None) -> list[str]:
    """Make the workspace's git what the server created before the server's git reads it: a
    root `.git` that is not the server's gitfile, and any `.git` below the root (a planted
    repository, which git would commit as an embedded repository), are the agent's content:
    each is moved out of the workspace, under `<state dir>/quarantine/<workspace>/`, and the
    server's gitfile is put back. Returns what was moved or restored, for the agent's result.
    For a copy-on-write view, `upper` is its upper layer: whatever the agent made is there, so
    only it is searched (the base, a git tree, holds no `.git`)."""
    root = pinned.work_tree
    found: list[str] = []
    expected = f"gitdir: {pinned.git_dir}"
    dot_git = root / ".git"
    ours = False
    try:
        st = dot_git.lstat()
        if stat.S_ISREG(st.st_mode) and st.st_size < 4096:
            ours = dot_git.read_text(encoding="utf-8").strip() == expected
    except (OSError, UnicodeDecodeError):
        st = None
    planted: list[str] = []
    if st is not None and not ours:
        planted.append(".git")
    walk_root = upper or root
    for dirpath, dirnames, filenames in os.walk(walk_root):
        rel_dir = os.path.relpath(dirpath, walk_root)
        for name in (*dirnames, *filenames):
            if name.casefold() == ".git" and rel_dir != ".":
                planted.append(os.path.join(rel_dir, name).replace(os.sep, "/"))
        dirnames[:] = [d for d in dirnames if d.casefold() != ".git"]
    if planted:
        quarantine = pinned.git_dir.parent.parent / STATE_DIR_NAME / "quarantine" / root.name
        quarantine.mkdir(parents=True, exist_ok=True)
        batch = Path(tempfile.mkdtemp(prefix="planted-", dir=quarantine))
        for rel in planted:
            target = batch / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(root / rel), str(target))
            found.append(f"{rel} (a .git the agent made; moved out of the workspace)")
    if not ours:
        if st is None:
            found.append(".git (removed by the agent; the server's was put back)")
        write_whole(dot_git, expected + "\n")
    if found:
        log.warning("workspace %s: %s", root, "; ".join(found))
    return found
