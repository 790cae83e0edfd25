"""The agents' workspaces as git worktrees: create, list, remove, and clean up after a kill.

`Workspaces` is the seam for another kind of workspace (a copy-on-write view over one read-only
base per run, say): the orchestrator needs only its four operations. `GitWorktrees` is today's
implementation; it owns the locks that serialize worktree administration in this process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Protocol

import filelock
import pygit2

from orchestration.errors import RepositoryError
from orchestration.workspace.engine import GitEngine, WouldBlock
from orchestration.workspace.engines import DEFAULT_ENGINE
from orchestration.workspace.git import (
    BRANCH_PREFIX,
    FULL_OID,
    WORKSPACE_META,
    GitRepo,
    check_component,
    has_hook,
    run_git,
    write_whole,
)
from orchestration.workspace.included import copy_included
from orchestration.workspace.pinning import Workspace, admin_dir_of, pin
from toolbus.resources import is_within
from toolbus.trees import remove_tree, walk

log = logging.getLogger(__name__)

Write = Callable[[Path, str], None]
"""Writes one file of a registration whole (`write_whole`)."""


class Workspaces(Protocol):
    """Where agents work: one private checkout of the run's base per agent, on its branch."""

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
        """Check out `base_commit` for the agent; the same workspace again when it exists. Not
        `wait`: `WouldBlock`, with nothing made, when that could wait or take long. `kind`: the
        kind of workspace its run was given (`view_support(repo).kind`, at spawn), so that a
        run's agents get the same kind without asking again; None: decided here.
        `agents_work`: `base_commit` is an agent's own work (a resumed rerun's start), not the
        user's: its first checkout runs none of the user's hooks and filters, which its files
        (attributes included) would pick."""
        ...

    def existing(self, repo: GitRepo) -> list[Workspace]:
        """The agents' workspaces of the repository."""
        ...

    def remove(self, repo: GitRepo, ws: Workspace, *, delete_branch: bool) -> None:
        """Delete a merged or discarded agent's workspace (its branch too when asked)."""
        ...

    def discard_unstarted(self, repo: GitRepo, run_id: str, agent_id: str) -> list[str]:
        """Remove what a creation cut short left for an agent that never started."""
        ...


class GitWorktrees:
    """Workspaces as git worktrees under `<state dir>/worktrees/<run>/<agent>`."""

    def __init__(self, *, checkout_slots: int | None = None) -> None:
        # Simultaneous checkouts of a large tree are slower than one after the other on few
        # cores: at most one per core at a time.
        slots = checkout_slots or max(os.cpu_count() or 1, 1)
        self._checkout_slots = threading.BoundedSemaphore(slots)
        self._registration = threading.Lock()

    @contextlib.contextmanager
    def admin(self, repo: GitRepo) -> Generator[None]:
        """Exclusive use of .git/worktrees (this process's threads, then other processes): every
        registration, removal and prune runs under it, so a prune never sees, and deletes,
        another process's half-written registration. The thread lock comes first: waiters of
        this process queue on it and are handed over at once, instead of each polling the file
        lock (which leaves it idle between holders)."""
        with (
            self._registration,
            filelock.FileLock(str(repo.state_dir / "worktree.lock"), timeout=120),
        ):
            yield

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
        """Check out `base_commit` in a new worktree for the agent (whatever `kind` says); the
        user's checkout is untouched. `include` names ignored files (glob patterns, relative to
        the repository) a build needs; they are copied (never linked) from the user's working
        tree. Calling it again for an existing workspace returns that workspace."""
        if not wait:
            raise WouldBlock("a worktree's checkout takes time in proportion to the repository")
        check_component(run_id, "run id")
        check_component(agent_id, "agent id")
        # A full commit id (what runs record) needs no lookup: `worktree add` refuses a missing one.
        base = base_commit if FULL_OID.fullmatch(base_commit) else repo.resolve(base_commit)
        path = repo.worktrees_dir / run_id / agent_id
        branch = f"{BRANCH_PREFIX}{run_id}/{agent_id}"
        existing = read_meta(path)
        if existing is not None:
            return existing
        path.parent.mkdir(parents=True, exist_ok=True)
        # With a post-checkout hook, `worktree add` checks out itself so that the hook runs as
        # git runs it; otherwise the worktree is registered without a checkout and populated
        # after.
        plain = plain_worktrees(repo)
        deferred = plain or agents_work or not _has_post_checkout_hook(repo)
        checkout = ("--no-checkout",) if deferred else ()
        # git's worktree registration is not safe against a concurrent `worktree add` in one
        # repository: one at a time, also across server processes. Only the registration is
        # serialized; the checkout is not.
        with self.admin(repo):
            if not (plain and register_worktree(repo, path, branch, base)):
                add = ("worktree", "add", "--quiet", *checkout, "-b", branch, str(path), base)
                if run_git(repo.root, *add, check=False).returncode != 0:
                    repo.git("worktree", "prune")  # a stale registration of a deleted directory
                    existing_branch = repo.try_git(
                        "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}"
                    )
                    if existing_branch is not None and existing_branch.strip() == base:
                        # a failed first attempt already created the branch at the base
                        repo.git("worktree", "add", "--quiet", *checkout, str(path), branch)
                    else:
                        repo.git(*add)
        if deferred:
            # what `worktree add` would run to check out
            with self._checkout_slots:
                engine.checkout(pin(path, first_checkout=not agents_work), base)
        included = copy_included(repo.root, path, include)
        ws = Workspace(
            path=path,
            branch=branch,
            base_commit=base,
            run_id=run_id,
            agent_id=agent_id,
            included=included,
        )
        write_meta(ws)
        return ws

    def existing(self, repo: GitRepo) -> list[Workspace]:
        """The agents' worktrees registered in the repository (those fanout created)."""
        out = repo.git("worktree", "list", "--porcelain", "-z")
        result: list[Workspace] = []
        base_dir = repo.worktrees_dir.resolve()
        for record in out.split("\0\0"):
            lines = [line for line in record.split("\0") if line]
            if not lines or not lines[0].startswith("worktree "):
                continue
            path = Path(lines[0][len("worktree ") :])
            if not is_within(str(path.resolve()), str(base_dir)):
                continue
            ws = read_meta(path)
            if ws is not None:
                result.append(ws)
                continue
            branch = next(
                (ln[len("branch refs/heads/") :] for ln in lines if ln.startswith("branch ")), ""
            )
            result.append(Workspace(path=path, branch=branch, base_commit=""))
        return sorted(result, key=lambda w: str(w.path))

    def remove(self, repo: GitRepo, ws: Workspace, *, delete_branch: bool) -> None:
        """Delete the worktree and its unmerged scratch; only for merged or discarded agents."""
        if not is_within(str(ws.path.resolve()), str(repo.worktrees_dir.resolve())):
            raise RepositoryError(f"{ws.path} is not a fanout workspace; refusing to remove it")
        with self.admin(repo):
            if ws.path.exists():
                proc = run_git(
                    repo.root, "worktree", "remove", "--force", "--force", str(ws.path), check=False
                )
                if proc.returncode != 0 and ws.path.exists():
                    remove_tree(ws.path)
            repo.git("worktree", "prune")
        if delete_branch and ws.branch:
            run_git(repo.root, "update-ref", "-d", ws.branch_ref, check=False)
        with contextlib.suppress(OSError):
            ws.path.parent.rmdir()  # the run's directory, once its last workspace is gone

    def discard_unstarted(self, repo: GitRepo, run_id: str, agent_id: str) -> list[str]:
        """Remove what a worktree creation cut short (a killed process) left for an agent that
        never started: its registration under .git/worktrees (even a locked, half-written one),
        its directory, and a stale lock on its branch ref. The branch itself is kept. Such an
        agent has run no tool yet, so nothing of its work can be in them. Returns what was
        removed."""
        check_component(run_id, "run id")
        check_component(agent_id, "agent id")
        with self.admin(repo):
            return _discard_unstarted(repo, run_id, agent_id)


def register_worktree(
    repo: GitRepo, path: Path, branch: str, base: str, *, write: Write = write_whole
) -> bool:
    """What `git worktree add --no-checkout -b <branch> <path> <base>` writes, without git's
    three processes (it runs `git branch` and `git symbolic-ref` as children); the layout of
    gitrepository-layout(5). False, with nothing written, when git must do it itself (the
    names are taken: a retry after a failure). Call it under the registration lock."""
    admin = repo.git_dir / "worktrees" / path.name
    if admin.exists() or os.path.lexists(path):
        return False
    pyrepo = pygit2.Repository(str(repo.root))
    try:
        try:
            pyrepo.create_branch(branch, pyrepo[pygit2.Oid(hex=base)].peel(pygit2.Commit))
        except (pygit2.AlreadyExistsError, pygit2.GitError, KeyError, ValueError):
            return False
    finally:
        pyrepo.free()
    admin.mkdir(parents=True)
    locked = admin / "locked"  # as git does: prune leaves a half-made registration alone
    locked.write_text("initializing\n", encoding="utf-8")
    # In an order that a kill at any point leaves git consistent: git lists a registration
    # only once its `gitdir` file is there, and a listed one without HEAD fails `git fsck`
    # ("detached HEAD points at nothing"); so HEAD comes first and `gitdir` last, each file
    # written whole (a temporary file renamed over it).
    write(admin / "HEAD", f"ref: refs/heads/{branch}\n")
    write(admin / "commondir", "../..\n")
    path.mkdir(parents=True)
    write(path / ".git", f"gitdir: {admin.resolve()}\n")
    write(admin / "gitdir", f"{path.resolve()}/.git\n")
    locked.unlink()
    return True


def plain_worktrees(repo: GitRepo) -> bool:
    """Whether a new worktree is only its registration files (`register_worktree` can add it):
    no post-checkout hook, no per-worktree config, no sparse checkout to copy."""
    try:
        config = pygit2.Repository(str(repo.root)).config
        for key in ("extensions.worktreeConfig", "core.sparseCheckout"):
            with contextlib.suppress(KeyError):
                if config.get_bool(key):
                    return False
    except pygit2.GitError:
        return False
    if (repo.git_dir / "info" / "sparse-checkout").exists():
        return False
    return not _has_post_checkout_hook(repo, config)


def _has_post_checkout_hook(repo: GitRepo, config: pygit2.Config | None = None) -> bool:
    """Whether git would run a post-checkout hook in this repository (conservative);
    `config` is the repository's, when the caller has it open already."""
    if config is None:
        with contextlib.suppress(pygit2.GitError):
            config = pygit2.Repository(str(repo.root)).config
    return has_hook(config, repo.root, repo.git_dir, "post-checkout")


def write_meta(ws: Workspace) -> None:
    git_dir = admin_dir_of(ws.path)
    if git_dir is None:
        raise RepositoryError(f"the new worktree {ws.path} has no git dir")
    (git_dir / WORKSPACE_META).write_text(ws.model_dump_json(), encoding="utf-8")


def read_meta(path: Path) -> Workspace | None:
    git_dir = admin_dir_of(path)
    if git_dir is None:
        return None
    try:
        ws = Workspace.model_validate_json((git_dir / WORKSPACE_META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return ws.model_copy(update={"path": path})


def _discard_unstarted(repo: GitRepo, run_id: str, agent_id: str) -> list[str]:
    path = repo.worktrees_dir / run_id / agent_id
    removed: list[str] = []
    admin_root = repo.git_dir / "worktrees"
    if admin_root.is_dir():
        for admin in admin_root.iterdir():
            try:
                target = (admin / "gitdir").read_text(encoding="utf-8").strip()
            except OSError:
                target = ""
            points_here = bool(target) and Path(target).parent == path.resolve()
            if points_here or (not target and admin.name == agent_id):
                shutil.rmtree(admin, ignore_errors=True)
                removed.append(f".git/worktrees/{admin.name}")
    if os.path.lexists(path):
        remove_tree(path, ignore_errors=True)
        removed.append(str(path.relative_to(repo.git_dir)))
    ref_lock = repo.git_dir / "refs" / "heads" / f"{BRANCH_PREFIX}{run_id}" / f"{agent_id}.lock"
    if ref_lock.exists():
        ref_lock.unlink(missing_ok=True)
        removed.append(str(ref_lock.relative_to(repo.git_dir)))
    if removed:
        run_git(repo.root, "worktree", "prune", check=False)
    return removed


def clear_dead_locks(repo: GitRepo, path: Path, branch: str | None) -> list[str]:
    """Remove the lock files a killed process left on an agent's branch and worktree (the
    branch's `<ref>.lock`, the worktree's `index.lock` and `HEAD.lock`), which would refuse
    every later commit of its work. Only for an agent whose server is dead: nothing else
    writes its branch or its worktree's git files. Returns what was removed."""
    candidates: list[Path] = []
    if branch:
        candidates.append(repo.git_dir / f"refs/heads/{branch}.lock")
    admin = admin_dir_of(path)
    if admin is not None:
        candidates += [admin / "index.lock", admin / "HEAD.lock"]
    removed: list[str] = []
    for lock in candidates:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
            removed.append(lock.name)
            log.warning("removed %s, left by a killed process", lock)
    return removed


def workspace_disk_usage(repo: GitRepo) -> int:
    """Bytes used by the agents' workspaces: worktrees' files and views' layers (files as
    stored, links not followed, mounted views not entered)."""
    total = 0
    for root in (repo.worktrees_dir, repo.state_dir / "layers"):
        if not root.exists():
            continue
        for dirpath, dirnames, filenames in walk(root):
            dirnames[:] = [d for d in dirnames if not os.path.ismount(os.path.join(dirpath, d))]
            for name in filenames:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_size
                except OSError:
                    continue
    return total
