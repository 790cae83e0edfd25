"""The user's git repository and the agents' workspaces: snapshots, worktrees, work commits.

Everything written here lives under `<git dir>/fanout/` (the state dir) or in refs the user's
`git status` never shows (`refs/fanout/…`, branches `fanout/<run>/<agent>`). The user's branch,
index and working tree are only ever read by this module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import filelock
import pygit2
from pydantic import BaseModel, ConfigDict, Field

from orchestration.contracts import ChangeStatus, DiffStat, FileChange
from orchestration.errors import RepositoryError
from toolbus import gitcmd
from toolbus.errors import PathEscape
from toolbus.gitcmd import Pinned
from toolbus.resources import WriteScope, is_within, normalize_path

log = logging.getLogger(__name__)

ZERO_OID = "0" * 40
_FULL_OID = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
FROZEN = ConfigDict(frozen=True)
STATE_DIR_NAME = "fanout"
SNAPSHOT_REF_PREFIX = "refs/fanout/snapshots/"
BRANCH_PREFIX = "fanout/"
WORKSPACE_META = "fanout-workspace.json"


@dataclass(frozen=True)
class Identity:
    """A git author or committer."""

    name: str
    email: str

    def env(self, *, author: bool = True, committer: bool = True) -> dict[str, str]:
        """The environment variables that make git use this identity."""
        out: dict[str, str] = {}
        if author:
            out |= {"GIT_AUTHOR_NAME": self.name, "GIT_AUTHOR_EMAIL": self.email}
        if committer:
            out |= {"GIT_COMMITTER_NAME": self.name, "GIT_COMMITTER_EMAIL": self.email}
        return out

    def signature(self) -> pygit2.Signature:
        """This identity as a pygit2 signature stamped now."""
        return pygit2.Signature(self.name, self.email)


FANOUT_IDENTITY = Identity("fanout", "fanout@localhost")


def run_git(
    cwd: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    check: bool = True,
    pinned: Pinned | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run one git command in `cwd` (pinned to a workspace's recorded git dir when `pinned`);
    raise `RepositoryError` with git's stderr on failure."""
    try:
        proc = gitcmd.run(cwd, args, pinned=pinned, env=env, input=input)
    except gitcmd.GitNotFound as exc:
        raise RepositoryError(str(exc)) from exc
    except gitcmd.UnpinnedWorkspaceGit as exc:
        raise RepositoryError(str(exc)) from exc
    if check and proc.returncode != 0:
        detail = proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}"
        raise RepositoryError(f"git {' '.join(args[:3])} failed in {cwd}: {detail}")
    return proc


class GitRepo:
    """The user's repository: its top level, its common git dir and fanout's state dir."""

    def __init__(self, root: Path | str) -> None:
        self._root = Path(root).resolve()
        self._git_dir: Path | None = None

    @classmethod
    def discover(cls, path: Path | str) -> GitRepo:
        """The repository containing `path`, or `RepositoryError` saying how to make one."""
        where = Path(path).resolve()
        if not where.is_dir():
            raise RepositoryError(f"{where} is not a directory: pass --repo <repository path>")
        if gitcmd.in_workspace_area(where):
            raise RepositoryError(
                f"{where} is inside an agent's workspace, not a repository of yours: pass the "
                "repository the agents work on"
            )
        proc = run_git(where, "rev-parse", "--show-toplevel", check=False)
        top = proc.stdout.strip()
        if proc.returncode != 0 or not top:
            raise RepositoryError(
                f"{where} is not a git repository: run `git init` or pass --repo <repository path>"
            )
        return cls(top)

    @property
    def root(self) -> Path:
        """The top level of the user's working tree."""
        return self._root

    @property
    def git_dir(self) -> Path:
        """The common git directory (shared by all worktrees), absolute."""
        if self._git_dir is None:
            out = self.git("rev-parse", "--path-format=absolute", "--git-common-dir").strip()
            self._git_dir = Path(out).resolve()
        return self._git_dir

    @property
    def state_dir(self) -> Path:
        """`<git dir>/fanout`, created on demand."""
        path = self.git_dir / STATE_DIR_NAME
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def worktrees_dir(self) -> Path:
        """Where the agents' worktrees live."""
        return self.state_dir / "worktrees"

    def git(
        self,
        *args: str,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
        cwd: Path | None = None,
    ) -> str:
        """Run git in the repository (or `cwd`); its stdout, or `RepositoryError` on failure."""
        return run_git(cwd or self._root, *args, env=env, input=input).stdout

    def try_git(self, *args: str, env: Mapping[str, str] | None = None) -> str | None:
        """Run git; its stdout, or None when it exits non-zero."""
        proc = run_git(self._root, *args, env=env, check=False)
        return proc.stdout if proc.returncode == 0 else None

    def head_commit(self) -> str:
        """The commit HEAD points to; `RepositoryError` when the repository has no commit yet."""
        out = self.try_git("rev-parse", "--verify", "-q", "HEAD^{commit}")
        if out is None:
            raise RepositoryError(
                f"the repository at {self._root} has no commit yet: make a first commit "
                "(for example `git commit --allow-empty -m init`) so runs have a base"
            )
        return out.strip()

    def head_branch(self) -> str | None:
        """The branch HEAD points to (`refs/heads/<name>`), or None for a detached HEAD."""
        out = self.try_git("symbolic-ref", "-q", "HEAD")
        return out.strip() if out else None

    def canonical_ref(self) -> str:
        """The ref merges land on: HEAD's branch, or `HEAD` itself when detached."""
        return self.head_branch() or "HEAD"

    def resolve(self, rev: str) -> str:
        """The full commit id of `rev`, or `RepositoryError`."""
        out = self.try_git("rev-parse", "--verify", "-q", f"{rev}^{{commit}}")
        if out is None:
            raise RepositoryError(f"{rev!r} does not name a commit in {self._root}")
        return out.strip()

    def identity(self) -> Identity:
        """The user's configured identity, or fanout's own when none is configured."""
        try:
            config = pygit2.Repository(str(self._root)).config
            name = str(config["user.name"])
            email = str(config["user.email"])
        except (KeyError, pygit2.GitError):
            return FANOUT_IDENTITY
        return Identity(name, email) if name and email else FANOUT_IDENTITY

    def open(self) -> pygit2.Repository:
        """A fresh pygit2 handle (pygit2 objects must not be shared across threads)."""
        return pygit2.Repository(str(self._root))

    def temp_path(self, prefix: str) -> Path:
        """A fresh, not yet existing file name under `<state dir>/tmp`."""
        tmp = self.state_dir / "tmp"
        tmp.mkdir(exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=prefix, dir=tmp)
        os.close(fd)
        os.unlink(name)
        return Path(name)


# --------------------------------------------------------------------------- status


@dataclass(frozen=True)
class StatusEntry:
    """One line of `git status`: the path and the two-letter code (`??` for untracked)."""

    path: str
    code: str
    orig_path: str | None = None


def status_entries(
    cwd: Path, pathspecs: Sequence[str] = (), *, ignored: bool = False, refresh: bool = False
) -> list[StatusEntry]:
    """Staged, unstaged and untracked (not ignored, unless asked) changes, one per path.

    `refresh=False` runs without optional locks, so the index is never rewritten under the user.
    """
    args = ["status", "--porcelain=v1", "-z", "--untracked-files=all", "--no-renames"]
    if ignored:
        args.append("--ignored=matching")
    env = None if refresh else {"GIT_OPTIONAL_LOCKS": "0"}
    if pathspecs:
        args += ["--", *(f":(top,literal){p}" for p in pathspecs)]
    out = run_git(cwd, *args, env=env).stdout
    entries: list[StatusEntry] = []
    fields = out.split("\0")
    i = 0
    while i < len(fields):
        item = fields[i]
        i += 1
        if len(item) < 4:
            continue
        code, path = item[:2], item[3:]
        orig: str | None = None
        if code[0] in "RC":
            orig = fields[i]
            i += 1
        entries.append(StatusEntry(path, code, orig))
    return entries


# --------------------------------------------------------------------------- snapshot


class Snapshot(BaseModel):
    """The pinned base of a run: the user's HEAD plus, when dirty, their uncommitted work."""

    base_commit: str
    head_commit: str
    branch_ref: str | None
    dirty: bool
    untracked_included: list[str] = Field(default_factory=list[str])


def snapshot(repo: GitRepo, run_id: str) -> Snapshot:
    """Pin the run's base; uncommitted work goes into a snapshot commit, the user's state untouched.

    The snapshot commit is built with a temporary index under the state dir, so the user's
    branch, index and working tree are only read. `refs/fanout/snapshots/<run_id>` keeps the
    base alive through gc.
    """
    _check_component(run_id, "run id")
    head, branch, dirty, untracked = _head_and_status(repo)
    base = head
    if dirty:
        untracked = sorted(untracked)
        index = repo.temp_path("snapshot-index-")
        try:
            env = {"GIT_INDEX_FILE": str(index)}
            _seed_index(repo.root, repo.git_dir / "index", index, "HEAD", env)
            repo.git("add", "-A", "--", ":/", env=env)
            tree = repo.git("write-tree", env=env).strip()
        finally:
            index.unlink(missing_ok=True)
        if tree != repo.git("rev-parse", "HEAD^{tree}").strip():
            base = repo.git(
                "commit-tree",
                tree,
                "-p",
                head,
                "-m",
                f"fanout snapshot for run {run_id}\n\nUncommitted work in {repo.root} "
                f"on top of {head}.",
                env=FANOUT_IDENTITY.env(),
            ).strip()
    repo.git("update-ref", "-m", f"fanout: snapshot for run {run_id}", _snapshot_ref(run_id), base)
    return Snapshot(
        base_commit=base,
        head_commit=head,
        branch_ref=branch,
        dirty=base != head,
        untracked_included=untracked if base != head else [],
    )


def _head_and_status(repo: GitRepo) -> tuple[str, str | None, bool, list[str]]:
    """(HEAD's commit, its branch ref or None, whether anything is uncommitted, the untracked
    paths) from one `git status` (what `head_commit`, `head_branch` and `status_entries` say)."""
    args = ("status", "--porcelain=v2", "-z", "--branch", "--untracked-files=all", "--no-renames")
    out = run_git(repo.root, *args, env={"GIT_OPTIONAL_LOCKS": "0"}).stdout
    head: str | None = None
    branch: str | None = None
    dirty = False
    untracked: list[str] = []
    fields = out.split("\0")
    i = 0
    while i < len(fields):
        item = fields[i]
        i += 1
        if item.startswith("# branch.oid "):
            oid = item[len("# branch.oid ") :]
            head = oid if _FULL_OID.fullmatch(oid) else None
        elif item.startswith("# branch.head "):
            name = item[len("# branch.head ") :]
            branch = None if name == "(detached)" else f"refs/heads/{name}"
        elif item.startswith("? "):
            dirty = True
            untracked.append(item[2:])
        elif item.startswith(("1 ", "u ")):
            dirty = True
        elif item.startswith("2 "):
            dirty = True
            i += 1  # a rename's original path follows
    if head is None:
        return repo.head_commit(), repo.head_branch(), dirty, untracked  # says what is wrong
    return head, branch, dirty, untracked


def _snapshot_ref(run_id: str) -> str:
    return SNAPSHOT_REF_PREFIX + run_id


def _seed_index(
    cwd: Path,
    source_index: Path,
    index: Path,
    treeish: str,
    env: Mapping[str, str],
    *,
    pinned: Pinned | None = None,
) -> None:
    """Fill a temporary index with `treeish`, reusing stat data of `source_index` when possible."""
    try:
        shutil.copyfile(source_index, index)
        proc = run_git(cwd, "read-tree", "-m", treeish, env=env, check=False, pinned=pinned)
        if proc.returncode == 0:
            return
    except OSError:
        pass
    index.unlink(missing_ok=True)
    run_git(cwd, "read-tree", treeish, env=env, pinned=pinned)


# --------------------------------------------------------------------------- workspaces


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
    first = admin_root / real.name
    try:
        others = sorted(p for p in admin_root.iterdir() if p != first)
    except OSError:
        return None
    for admin in (first, *others):
        try:
            target = (admin / "gitdir").read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            continue
        if os.path.normpath(target) == want and (admin / "HEAD").is_file():
            return admin
    return None


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


def secure_workspace_git(pinned: Pinned) -> list[str]:
    """Make the workspace's git what the server created before the server's git reads it: a
    root `.git` that is not the server's gitfile, and any `.git` below the root (a planted
    repository, which git would commit as an embedded repository), are the agent's content:
    each is moved out of the workspace, under `<state dir>/quarantine/<workspace>/`, and the
    server's gitfile is put back. Returns what was moved or restored, for the agent's result."""
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
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
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
        _write_whole(dot_git, expected + "\n")
    if found:
        log.warning("workspace %s: %s", root, "; ".join(found))
    return found


def _check_component(value: str, what: str) -> None:
    if (
        not value
        or value in (".", "..")
        or value.startswith("-")
        or value.endswith(".lock")
        or any(c in value for c in "/\\ ~^:?*[\0@{")
    ):
        raise RepositoryError(
            f"{what} {value!r} cannot name a branch or directory; use letters, digits, - _ ."
        )


def create_workspace(
    repo: GitRepo,
    *,
    base_commit: str,
    run_id: str,
    agent_id: str,
    include: Sequence[str] = (),
) -> Workspace:
    """Check out `base_commit` in a new worktree for the agent; the user's checkout is untouched.

    `include` names ignored files (glob patterns, relative to the repository) a build needs;
    they are copied (never linked) from the user's working tree. Calling it again for an
    existing workspace returns that workspace.
    """
    _check_component(run_id, "run id")
    _check_component(agent_id, "agent id")
    # A full commit id (what runs record) needs no lookup: `worktree add` refuses a missing one.
    base = base_commit if _FULL_OID.fullmatch(base_commit) else repo.resolve(base_commit)
    path = repo.worktrees_dir / run_id / agent_id
    branch = f"{BRANCH_PREFIX}{run_id}/{agent_id}"
    existing = _read_meta(path)
    if existing is not None:
        return existing
    path.parent.mkdir(parents=True, exist_ok=True)
    # With a post-checkout hook, `worktree add` checks out itself so that the hook runs as git
    # runs it; otherwise the worktree is registered without a checkout and populated after.
    plain = _plain_worktrees(repo)
    deferred = plain or not _has_post_checkout_hook(repo)
    checkout = ("--no-checkout",) if deferred else ()
    # git's worktree registration is not safe against concurrent `worktree add` in one
    # repository (seen: "failed to read .git/worktrees/<id>/commondir"): one at a time, also
    # across server processes. Only the registration is serialized; the checkout is not.
    # The thread lock first: waiters of this process queue on it and are handed over at once,
    # instead of each polling the file lock (which leaves it idle between holders).
    with _worktree_admin(repo):
        if not (plain and _register_worktree(repo, path, branch, base)):
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
        # What `worktree add` runs to check out; simultaneous checkouts of a large tree are
        # slower than one after the other on few cores, so at most one per core at a time.
        with _CHECKOUT_SLOTS:
            pinned = pin(path, first_checkout=True)
            if not _checkout_in_process(pinned, base):
                run_git(
                    path, "reset", "--hard", "--no-recurse-submodules", "--quiet", pinned=pinned
                )
    included = _copy_included(repo.root, path, include)
    ws = Workspace(
        path=path,
        branch=branch,
        base_commit=base,
        run_id=run_id,
        agent_id=agent_id,
        included=included,
    )
    _write_meta(ws)
    return ws


_CHECKOUT_SLOTS = threading.BoundedSemaphore(max(os.cpu_count() or 1, 1))
_REGISTRATION = threading.Lock()


@contextlib.contextmanager
def _worktree_admin(repo: GitRepo) -> Generator[None]:
    """Exclusive use of .git/worktrees (this process's threads, then other processes): every
    registration, removal and prune runs under it, so a prune never sees, and deletes, another
    process's half-written registration."""
    with _REGISTRATION, filelock.FileLock(str(repo.state_dir / "worktree.lock"), timeout=120):
        yield


def _plain_worktrees(repo: GitRepo) -> bool:
    """Whether a new worktree is only its registration files (`_register_worktree` can add it):
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


def _register_worktree(repo: GitRepo, path: Path, branch: str, base: str) -> bool:
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
    _write_whole(admin / "HEAD", f"ref: refs/heads/{branch}\n")
    _write_whole(admin / "commondir", "../..\n")
    path.mkdir(parents=True)
    _write_whole(path / ".git", f"gitdir: {admin.resolve()}\n")
    _write_whole(admin / "gitdir", f"{path.resolve()}/.git\n")
    locked.unlink()
    return True


def _write_whole(path: Path, text: str) -> None:
    """Write `path` so that it never exists with part of `text`: a temporary file beside it,
    renamed over it."""
    part = path.with_name(f".{path.name}.fanout-{os.getpid()}.tmp")
    part.write_text(text, encoding="utf-8")
    os.replace(part, path)


def _has_post_checkout_hook(repo: GitRepo, config: pygit2.Config | None = None) -> bool:
    """Whether git would run a post-checkout hook in this repository (conservative);
    `config` is the repository's, when the caller has it open already."""
    if config is None:
        with contextlib.suppress(pygit2.GitError):
            config = pygit2.Repository(str(repo.root)).config
    return _has_hook(config, repo.root, repo.git_dir, "post-checkout")


def _has_hook(config: pygit2.Config | None, root: Path, common_dir: Path, name: str) -> bool:
    """Whether git would run hook `name` in the repository at `root`, whose configuration is
    `config` (conservative)."""
    hooks_path: str | None = None
    with contextlib.suppress(KeyError, pygit2.GitError):
        if config is not None:
            hooks_path = str(config["core.hooksPath"])
    if hooks_path:
        hooks = Path(os.path.expanduser(hooks_path))
        if not hooks.is_absolute():
            hooks = root / hooks
    else:
        hooks = common_dir / "hooks"
    return (hooks / name).exists()


# --------------------------------------------------------------------------- in-process git
#
# Checking out a workspace and committing an agent's work are done in-process with libgit2
# (pygit2) when it does what git would: no filter driver is configured (libgit2 cannot run
# `clean`/`smudge`/`process` programs, such as git-lfs), no `working-tree-encoding` attribute
# (libgit2 does not re-encode) and no `reference-transaction` hook (git runs it, libgit2 does
# not). Otherwise, and on any libgit2 error, git itself runs, as before. This saves five git
# processes per agent, which on a few cores are most of an agent's fixed cost. A checkout of a
# large tree is left to git, which writes many files faster (IN_PROCESS_CHECKOUT_MAX_FILES).

_FILTER_DRIVER = re.compile(r"filter\..+\.(clean|smudge|process)", re.IGNORECASE)
_NOT_IN_PROCESS_ATTRIBUTE = "working-tree-encoding"
# Above this many files git's own checkout is the faster one (measured: 8 worktrees of 3,000
# files took 25 % longer with libgit2, one at a time as two at a time); below it, the git
# process that libgit2 saves is worth more than git's faster writing of files.
IN_PROCESS_CHECKOUT_MAX_FILES = 256
# (git dir, tree id) -> (attributes ok for libgit2, files in the tree)
_tree_facts: dict[tuple[str, str], tuple[bool, int]] = {}
_in_process_lock = threading.Lock()


def _tree_facts_of(pyrepo: pygit2.Repository, tree: pygit2.Tree) -> tuple[bool, int]:
    """Whether no `.gitattributes` in `tree` (nor info/attributes) names an attribute libgit2
    lacks, and how many files the tree holds; computed once per tree."""
    key = (str(Path(pyrepo.path).resolve()), str(tree.id))
    with _in_process_lock:
        known = _tree_facts.get(key)
    if known is not None:
        return known
    ok, files = True, 0
    stack = [tree]
    while stack:
        for entry in stack.pop():
            if entry.type_str == "tree":
                stack.append(pyrepo[entry.id].peel(pygit2.Tree))
                continue
            files += 1
            if ok and entry.name == ".gitattributes" and entry.type_str == "blob":
                data = pyrepo[entry.id].peel(pygit2.Blob).data
                ok = _NOT_IN_PROCESS_ATTRIBUTE.encode() not in data
    info = Path(pyrepo.path) / "info" / "attributes"
    with contextlib.suppress(OSError):
        if _NOT_IN_PROCESS_ATTRIBUTE.encode() in info.read_bytes():
            ok = False
    with _in_process_lock:
        _tree_facts[key] = (ok, files)
    return ok, files


def in_process_git_ok(pyrepo: pygit2.Repository, tree: pygit2.Tree) -> bool:
    """Whether libgit2 checks out and stages `tree`'s files exactly as git would (see above).
    The configuration and hooks are read every time; the tree's attributes once per tree."""
    try:
        config = pyrepo.config
        if any(_FILTER_DRIVER.fullmatch(entry.name) for entry in config):
            return False
        attributes_file = None
        with contextlib.suppress(KeyError):
            attributes_file = str(config["core.attributesFile"])
        if attributes_file:
            with contextlib.suppress(OSError):
                text = Path(os.path.expanduser(attributes_file)).read_bytes()
                if _NOT_IN_PROCESS_ATTRIBUTE.encode() in text:
                    return False
        if pyrepo.workdir:
            common = Path(pyrepo.path)
            with contextlib.suppress(OSError):
                common_text = (common / "commondir").read_text(encoding="utf-8").strip()
                common = (common / common_text).resolve()
            if _has_hook(config, Path(pyrepo.workdir), common, "reference-transaction"):
                return False
        return _tree_facts_of(pyrepo, tree)[0]
    except (pygit2.GitError, KeyError, ValueError, OSError):
        return False


def _checkout_in_process(pinned: Pinned, base: str) -> bool:
    """Populate the new worktree (files and index) with `base`'s tree, in-process; False, with
    git left to do it, when libgit2 would not do what git does."""
    path = pinned.work_tree
    try:
        wt = open_workspace_repo(pinned)
    except pygit2.GitError:
        return False
    try:
        tree = wt[pygit2.Oid(hex=base)].peel(pygit2.Tree)
        if not in_process_git_ok(wt, tree):
            return False
        if _tree_facts_of(wt, tree)[1] > IN_PROCESS_CHECKOUT_MAX_FILES:
            return False  # a large tree: git writes it faster
        # FORCE: write every file of the tree (the directory is empty, as after --no-checkout);
        # the index is written with the files' stat data, so `git status` needs no re-hash.
        wt.checkout_tree(  # pyright: ignore[reportUnknownMemberType]
            tree, strategy=pygit2.enums.CheckoutStrategy.FORCE
        )
        return True
    except (pygit2.GitError, KeyError, ValueError, OSError) as exc:
        log.info("in-process checkout of %s failed (%s); git checks it out", path, exc)
        return False
    finally:
        wt.free()


def _write_meta(ws: Workspace) -> None:
    git_dir = admin_dir_of(ws.path)
    if git_dir is None:
        raise RepositoryError(f"the new worktree {ws.path} has no git dir")
    (git_dir / WORKSPACE_META).write_text(ws.model_dump_json(), encoding="utf-8")


def _read_meta(path: Path) -> Workspace | None:
    git_dir = admin_dir_of(path)
    if git_dir is None:
        return None
    try:
        ws = Workspace.model_validate_json((git_dir / WORKSPACE_META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return ws.model_copy(update={"path": path})


def _iter_matches(root: Path, pattern: str) -> Iterator[Path]:
    text = pattern.replace("\\", "/").strip()
    if not text or text.startswith("/") or ".." in text.split("/"):
        return
    if not any(c in text for c in "*?["):
        candidate = root / text
        if os.path.lexists(candidate):
            yield candidate
        return
    yield from root.glob(text)


def _copy_included(root: Path, dest_root: Path, patterns: Sequence[str]) -> list[str]:
    """Copy files matched by `patterns` that git ignores; return their repository paths."""
    if not patterns:
        return []
    real_root = root.resolve()
    git_dir = real_root / ".git"
    files: dict[str, Path] = {}
    for pattern in patterns:
        for match in _iter_matches(root, pattern):
            walk = [match] if not match.is_dir() else sorted(p for p in match.rglob("*"))
            for item in walk:
                real = item.resolve()
                if not real.is_file() or not is_within(str(real), str(real_root)):
                    continue  # a dangling link or something outside the repository
                if is_within(str(real), str(git_dir)):
                    continue
                try:
                    rel = normalize_path(item.relative_to(root).as_posix())
                except (ValueError, PathEscape):
                    continue
                if rel and not is_within(rel, ".git"):
                    files[rel] = real
    if not files:
        return []
    names = sorted(files)
    proc = run_git(
        root, "check-ignore", "-z", "--stdin", input="\0".join(names) + "\0", check=False
    )
    ignored = {p for p in proc.stdout.split("\0") if p}
    copied: list[str] = []
    for rel in names:
        if rel not in ignored:
            continue  # tracked or plain untracked: the snapshot carries those
        target = dest_root / rel
        if os.path.lexists(target):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(files[rel], target)
        copied.append(rel)
    return copied


def list_workspaces(repo: GitRepo) -> list[Workspace]:
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
        ws = _read_meta(path)
        if ws is not None:
            result.append(ws)
            continue
        branch = next(
            (ln[len("branch refs/heads/") :] for ln in lines if ln.startswith("branch ")), ""
        )
        result.append(Workspace(path=path, branch=branch, base_commit=""))
    return sorted(result, key=lambda w: str(w.path))


def remove_workspace(repo: GitRepo, ws: Workspace, *, delete_branch: bool) -> None:
    """Delete the worktree and its unmerged scratch; call it only for merged or discarded agents."""
    if not is_within(str(ws.path.resolve()), str(repo.worktrees_dir.resolve())):
        raise RepositoryError(f"{ws.path} is not a fanout workspace; refusing to remove it")
    with _worktree_admin(repo):
        if ws.path.exists():
            proc = run_git(
                repo.root, "worktree", "remove", "--force", "--force", str(ws.path), check=False
            )
            if proc.returncode != 0 and ws.path.exists():
                shutil.rmtree(ws.path)
        repo.git("worktree", "prune")
    if delete_branch and ws.branch:
        run_git(repo.root, "update-ref", "-d", ws.branch_ref, check=False)
    with contextlib.suppress(OSError):
        ws.path.parent.rmdir()  # the run's directory, once its last workspace is gone


def discard_unstarted_workspace(repo: GitRepo, run_id: str, agent_id: str) -> list[str]:
    """Remove what a worktree creation cut short (a killed process) left for an agent that never
    started: its registration under .git/worktrees (even a locked, half-written one), its
    directory, and a stale lock on its branch ref. The branch itself is kept. Such an agent has
    run no tool yet, so nothing of its work can be in them. Returns what was removed."""
    _check_component(run_id, "run id")
    _check_component(agent_id, "agent id")
    with _worktree_admin(repo):
        return _discard_unstarted(repo, run_id, agent_id)


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
        shutil.rmtree(path, ignore_errors=True)
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
    """Bytes used by the agents' worktrees (files as stored, links not followed)."""
    total = 0
    root = repo.worktrees_dir
    if not root.exists():
        return 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total


# --------------------------------------------------------------------------- work commits


class WorkCommit(BaseModel):
    """What `commit_workspace` did: the new commit (None if none), its changes, what it dropped."""

    commit: str | None
    changes: list[FileChange]
    dropped: list[str]
    planted: list[str] = Field(default_factory=list[str])
    """`.git` entries the agent made, moved out of the workspace and not committed."""


def commit_workspace(
    ws: Workspace,
    *,
    message: str,
    write_scope: WriteScope,
    author: Identity = FANOUT_IDENTITY,
) -> WorkCommit:
    """Commit the agent's in-scope changes on its branch; out-of-scope ones stay on disk, dropped.

    The commit's tree is the base outside the write scope and the working tree inside it, so
    nothing out of scope reaches the branch, even if the agent ran git itself. Calling it again
    commits later edits on top. Reads run in-process (pygit2); git runs only to stage the
    working tree, write the tree and commit, and to move the branch (compare-and-swap).
    Git works on the workspace only pinned to its recorded git dir, after any `.git` the agent
    planted is moved out (`secure_workspace_git`).
    """
    pinned = pin(ws.path)
    planted = secure_workspace_git(pinned)
    done = _commit_pinned(ws, pinned, message=message, write_scope=write_scope, author=author)
    return done.model_copy(update={"planted": planted}) if planted else done


def _commit_pinned(
    ws: Workspace,
    pinned: Pinned,
    *,
    message: str,
    write_scope: WriteScope,
    author: Identity,
) -> WorkCommit:
    cwd = pinned.work_tree
    git_dir = pinned.git_dir
    ref = ws.branch_ref if ws.branch else "HEAD"  # the agent's branch, even if it moved HEAD
    pyrepo = open_workspace_repo(pinned)
    try:
        try:
            head_commit = pyrepo.revparse_single(ref).peel(pygit2.Commit)
        except (KeyError, ValueError, pygit2.GitError) as exc:
            raise RepositoryError(f"{ref} of the workspace {cwd} names no commit: {exc}") from exc
        head = str(head_commit.id)
        head_tree = str(head_commit.tree_id)
        base = ws.base_commit or head
        done = _commit_in_process(
            pyrepo,
            ref,
            head_commit,
            base=base,
            write_scope=write_scope,
            message=message,
            author=author,
        )
        if done is not None:
            return done
        fd, name = tempfile.mkstemp(prefix="fanout-index-", dir=git_dir)
        os.close(fd)
        index = Path(name)
        index.unlink()
        try:
            env = {"GIT_INDEX_FILE": str(index)}
            if not _index_is_at(pyrepo, git_dir / "index", head_tree, index):
                _seed_index(cwd, git_dir / "index", index, head, env, pinned=pinned)
            run_git(cwd, "add", "-A", "--", ":/", env=env, pinned=pinned)
            tree = run_git(cwd, "write-tree", env=env, pinned=pinned).stdout.strip()
            dropped: list[str] = []
            if tree != str(_tree_of(pyrepo, base).id):
                changed = _changed_paths(pyrepo, base, tree)
                dropped = sorted(p for p in changed if not write_scope.allows(p))
                if dropped:
                    _reset_paths(pyrepo, pinned, base, dropped, env)
                    tree = run_git(cwd, "write-tree", env=env, pinned=pinned).stdout.strip()
            if tree == head_tree:
                return WorkCommit(commit=None, changes=[], dropped=dropped)
            commit = run_git(
                cwd,
                "commit-tree",
                tree,
                "-p",
                head,
                "-m",
                message.strip() or "fanout: agent work",
                env=author.env(author=True, committer=False) | FANOUT_IDENTITY.env(author=False),
                pinned=pinned,
            ).stdout.strip()
            run_git(
                cwd,
                "update-ref",
                "-m",
                "fanout: commit agent work",
                ref,
                commit,
                head,
                pinned=pinned,
            )
            on_branch = None if pyrepo.head_is_detached else pyrepo.references["HEAD"].target
            # bring the worktree's own index to the new commit (files on disk are not touched)
            if ref == "HEAD" or on_branch == ref:
                _install_index(pinned, index, commit)
        finally:
            index.unlink(missing_ok=True)
        changes = file_changes(pyrepo, head, commit)
    finally:
        pyrepo.free()
    return WorkCommit(commit=commit, changes=changes, dropped=dropped)


def _commit_in_process(
    pyrepo: pygit2.Repository,
    ref: str,
    head_commit: pygit2.Commit,
    *,
    base: str,
    write_scope: WriteScope,
    message: str,
    author: Identity,
) -> WorkCommit | None:
    """`commit_workspace` with libgit2 when the worktree's HEAD is on `ref` and libgit2 stages
    files as git would: the worktree's index becomes the working tree (`git add -A`), out-of-scope
    paths are set back to the base, and the branch moves by compare-and-swap under its ref lock.
    None, with nothing changed, when git must do it."""
    if pyrepo.head_is_detached:
        return None
    try:
        if pyrepo.references["HEAD"].target != ref:
            return None  # the agent switched branches itself: the git path handles it
        if not in_process_git_ok(pyrepo, head_commit.tree):
            return None
        index = pyrepo.index
        index.read(force=True)
        if index.conflicts is not None:
            return None
        index.add_all()
        tree = str(index.write_tree())
        dropped: list[str] = []
        if tree != str(_tree_of(pyrepo, base).id):
            changed = _changed_paths(pyrepo, base, tree)
            if any(p == ".gitattributes" or p.endswith("/.gitattributes") for p in changed):
                return None  # new attributes: let git apply them as it does
            dropped = sorted(p for p in changed if not write_scope.allows(p))
            if dropped:
                _reset_index_paths(pyrepo, index, base, dropped)
                tree = str(index.write_tree())
    except (pygit2.GitError, KeyError, ValueError, OSError) as exc:
        log.info("in-process staging in %s failed (%s); git stages it", pyrepo.workdir, exc)
        return None
    if tree == str(head_commit.tree_id):
        return WorkCommit(commit=None, changes=[], dropped=dropped)
    head = head_commit.id
    commit = pyrepo.create_commit(
        None,
        author.signature(),
        FANOUT_IDENTITY.signature(),
        (message.strip() or "fanout: agent work") + "\n",
        pygit2.Oid(hex=tree),
        [head],
    )
    try:
        with pyrepo.transaction() as txn:
            txn.lock_ref(ref)
            current = pyrepo.references[ref].target
            if current != head:
                raise RepositoryError(
                    f"the branch {ref} of the workspace {pyrepo.workdir} moved from {head} to "
                    f"{current} while its work was committed; commit again"
                )
            # (the reflog signature is the repository's identity: pygit2 1.21 cannot pass one)
            txn.set_target(ref, commit, message="fanout: commit agent work")
    except pygit2.GitError as exc:
        raise RepositoryError(f"could not move {ref} to the agent's work: {exc}") from exc
    try:
        index.write()  # the worktree's index now holds the new commit's tree
    except (pygit2.GitError, OSError) as exc:
        # The work is committed and the branch moved; only `git status` inside the workspace
        # would show it staged (the next commit re-stages the working tree anyway).
        log.warning("the index of %s was not updated after its commit: %s", pyrepo.workdir, exc)
    changes = file_changes(pyrepo, str(head), str(commit))
    return WorkCommit(commit=str(commit), changes=changes, dropped=dropped)


def _reset_index_paths(
    pyrepo: pygit2.Repository, index: pygit2.Index, base: str, paths: Sequence[str]
) -> None:
    """Set `paths` in `index` to their content in `base`, removing absent ones."""
    for p, entry in _base_entries(pyrepo, base, paths):
        if entry is None:
            if p in index:
                index.remove(p)
        else:
            index.add(pygit2.IndexEntry(p, entry.id, entry.filemode))


def _base_entries(
    pyrepo: pygit2.Repository, base: str, paths: Sequence[str]
) -> list[tuple[str, pygit2.Object | None]]:
    """Each path with its file entry in `base`'s tree, None where it is absent (or a directory)."""
    base_tree = _tree_of(pyrepo, base)
    found: list[tuple[str, pygit2.Object | None]] = []
    for p in paths:
        try:
            entry: pygit2.Object | None = base_tree[p]
        except KeyError:
            entry = None
        if entry is not None and entry.filemode == pygit2.enums.FileMode.TREE:
            entry = None
        found.append((p, entry))
    return found


def _index_is_at(pyrepo: pygit2.Repository, source: Path, tree: str, index: Path) -> bool:
    """Copy the worktree's index to `index` if it holds exactly `tree` (its stat data kept)."""
    try:
        if str(pygit2.Index(str(source)).write_tree(pyrepo)) != tree:
            return False
        shutil.copyfile(source, index)
    except (OSError, pygit2.GitError, ValueError):
        index.unlink(missing_ok=True)
        return False
    return True


def _changed_paths(pyrepo: pygit2.Repository, base: str, tree: str) -> list[str]:
    """The paths whose entry differs between `base`'s tree and `tree` (no rename detection)."""
    old = _tree_of(pyrepo, base)
    new = pyrepo[pygit2.Oid(hex=tree)].peel(pygit2.Tree)
    paths: set[str] = set()
    for delta in old.diff_to_tree(new).deltas:
        paths.add(delta.old_file.path)
        paths.add(delta.new_file.path)
    return sorted(paths)


def _install_index(pinned: Pinned, index: Path, commit: str) -> None:
    """Make `index` (which holds `commit`'s tree) the worktree's index, under git's index lock."""
    cwd, git_dir = pinned.work_tree, pinned.git_dir
    lock = git_dir / "index.lock"
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError:
        fd = None
    if fd is not None:
        os.close(fd)
        try:
            os.replace(index, git_dir / "index")
            return
        except OSError:
            pass
        finally:
            lock.unlink(missing_ok=True)
    if run_git(cwd, "read-tree", "-m", commit, check=False, pinned=pinned).returncode != 0:
        run_git(cwd, "read-tree", commit, pinned=pinned)


def _reset_paths(
    pyrepo: pygit2.Repository,
    pinned: Pinned,
    base: str,
    paths: Sequence[str],
    env: Mapping[str, str],
) -> None:
    """Set `paths` in the (temporary) index to their content in `base`, removing absent ones."""
    lines: list[str] = []
    for p, entry in _base_entries(pyrepo, base, paths):
        if entry is None:
            lines.append(f"0 {ZERO_OID}\t{p}")  # absent in the base (or a directory there)
        else:
            lines.append(f"{int(entry.filemode):06o} {entry.id}\t{p}")
    run_git(
        pinned.work_tree,
        "update-index",
        "-z",
        "--index-info",
        input="\0".join(lines) + "\0",
        env=env,
        pinned=pinned,
    )


# --------------------------------------------------------------------------- diffs


_STATUS: dict[str, ChangeStatus] = {
    "A": "added",
    "M": "modified",
    "D": "deleted",
    "R": "renamed",
    "T": "modified",
    "C": "added",
}


def _tree_of(pyrepo: pygit2.Repository, rev: str | pygit2.Oid) -> pygit2.Tree:
    obj = pyrepo[rev] if isinstance(rev, pygit2.Oid) else pyrepo.revparse_single(rev)
    return obj.peel(pygit2.Tree)


def tree_changes(
    pyrepo: pygit2.Repository, old: pygit2.Tree, new: pygit2.Tree, *, renames: bool = True
) -> list[FileChange]:
    """The file changes from tree `old` to tree `new`."""
    diff = old.diff_to_tree(new)
    if renames:
        diff.find_similar()
    changes: list[FileChange] = []
    for patch in diff:
        if patch is None:
            continue
        delta = patch.delta
        status = _STATUS.get(delta.status_char(), "modified")
        _context, added, removed = patch.line_stats
        deleted = status == "deleted"
        changes.append(
            FileChange(
                path=delta.old_file.path if deleted else delta.new_file.path,
                status=status,
                lines_added=added,
                lines_removed=removed,
                blob=None if deleted else str(delta.new_file.id),
                old_path=delta.old_file.path if status == "renamed" else None,
            )
        )
    return changes


def file_changes(pyrepo: pygit2.Repository, old: str, new: str) -> list[FileChange]:
    """The file changes between two commits (or any tree-ish revisions)."""
    return tree_changes(pyrepo, _tree_of(pyrepo, old), _tree_of(pyrepo, new))


def diffstat(repo: GitRepo, base: str, commit: str) -> DiffStat:
    """Files, insertions and deletions from `base` to `commit`."""
    pyrepo = repo.open()
    try:
        return DiffStat.of(file_changes(pyrepo, base, commit))
    finally:
        pyrepo.free()


def diff(repo: GitRepo, base: str, commit: str, paths: Sequence[str] = ()) -> str:
    """The unified diff from `base` to `commit` (renames detected, no external diff drivers)."""
    args = ["diff", "--no-color", "--no-ext-diff", "--no-textconv", "-M", base, commit]
    if paths:
        args += ["--", *(f":(top,literal){p}" for p in paths)]
    return repo.git(*args)
