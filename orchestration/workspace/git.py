"""Git access: the one wrapper the package runs git through, and the user's repository."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pygit2

from orchestration.errors import RepositoryError
from toolbus import gitcmd
from toolbus.gitcmd import Pinned

ZERO_OID = "0" * 40
FULL_OID = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
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


IN_PROCESS_LISTING_INDEX_BYTES = 64 << 10
IN_PROCESS_LISTING_MAX = 2048
"""A tree is listed in-process (`GitRepo.paths_at`) when the checkout's index is at most this
size (about 700 files) and the tree holds at most this many paths: below about a thousand,
libgit2's walk costs less than starting git; above, git's is the faster."""


class GitRepo:
    """The user's repository: its top level, its common git dir and fanout's state dir."""

    def __init__(self, root: Path | str) -> None:
        self._root = Path(root).resolve()
        self._git_dir: Path | None = None
        self._state_dir: Path | None = None

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
        """`<git dir>/fanout`, created on demand (looked for once: it holds the state database,
        so it stays while the repository is open), for its owner alone: the agents' homes,
        layers and workspaces below it hold what their commands left, set-ID files included
        (a command may set those bits on its own files), which no other user may run."""
        if self._state_dir is None:
            path = self.git_dir / STATE_DIR_NAME
            try:
                info = os.stat(path)
            except FileNotFoundError:
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
                info = os.stat(path)
            if info.st_mode & 0o077:
                with contextlib.suppress(OSError):  # (not ours to change: git says so later)
                    os.chmod(path, stat.S_IMODE(info.st_mode) & 0o700)
            self._state_dir = path
        return self._state_dir

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

    def paths_at(self, commit: str) -> list[str]:
        """Every path of the tree at `commit`, as `git ls-tree -r --name-only` lists them (in its
        order, names decoded as the rest of git's output is): read in-process where the index
        says the checkout is small (`IN_PROCESS_LISTING_INDEX_BYTES`), which saves a git
        process; by git otherwise, whose walk is the faster one there."""
        listed = self._paths_in_process(commit)
        if listed is not None:
            return listed
        out = self.git("ls-tree", "-r", "--name-only", "-z", commit)
        return [p for p in out.split("\x00") if p]

    def _paths_in_process(self, commit: str) -> list[str] | None:
        try:
            if os.stat(self.git_dir / "index").st_size > IN_PROCESS_LISTING_INDEX_BYTES:
                return None
        except OSError:
            return None
        try:
            pyrepo = self.open()
        except pygit2.GitError:
            return None
        try:
            tree = pyrepo.revparse_single(commit).peel(pygit2.Tree)
            out: list[str] = []
            stack: list[tuple[Iterator[pygit2.Object], str]] = [(iter(tree), "")]
            while stack:  # depth first, each tree's entries in order: git's order
                entries, prefix = stack[-1]
                for entry in entries:
                    name = prefix + (entry.raw_name or b"").decode("utf-8", "surrogateescape")
                    if entry.filemode == pygit2.enums.FileMode.TREE:
                        subtree = pyrepo[entry.id].peel(pygit2.Tree)
                        stack.append((iter(subtree), name + "/"))
                        break
                    out.append(name)
                    if len(out) > IN_PROCESS_LISTING_MAX:
                        return None
                else:
                    stack.pop()
            return out
        except (pygit2.GitError, KeyError, ValueError):
            return None
        finally:
            pyrepo.free()

    def blob_at(self, commit: str, path: str) -> tuple[str, int] | None:
        """The blob id and size of the file at `path` in `commit`; None when there is none."""
        found = self.try_git("rev-parse", "--verify", "--quiet", f"{commit}:{path}")
        if found is None:
            return None
        blob = found.strip()
        return blob, int(self.git("cat-file", "-s", blob).strip())

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


# the characters a run or agent id may not hold (`check_component`)
_NOT_IN_COMPONENT = re.compile(r"[/\\ ~^:?*\[\x00@{]")


def check_component(value: str, what: str) -> None:
    """Refuse a run or agent id that cannot name a branch component or a directory."""
    if (
        not value
        or value in (".", "..")
        or value.startswith("-")
        or value.endswith(".lock")
        or _NOT_IN_COMPONENT.search(value)
    ):
        raise RepositoryError(
            f"{what} {value!r} cannot name a branch or directory; use letters, digits, - _ ."
        )


def copy_index(source: Path, dest: Path) -> None:
    """Copy an index with its modification time. Git trusts an entry's stat data only for a
    file older than the index it was read from: a file changed in the second the index was
    written (same size, same times to the second) is "racy" and hashed again. A copy dated
    later would make git take such a change for no change."""
    shutil.copy2(source, dest)


def seed_index(
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
        copy_index(source_index, index)
        proc = run_git(cwd, "read-tree", "-m", treeish, env=env, check=False, pinned=pinned)
        if proc.returncode == 0:
            return
    except OSError:
        pass
    index.unlink(missing_ok=True)
    run_git(cwd, "read-tree", treeish, env=env, pinned=pinned)


def read_record(path: str, encoding: str = "ascii", limit: int = 4096) -> str | None:
    """The stripped text of the small record file at `path` (at most `limit` bytes read), None
    when it is missing or unreadable. By a descriptor, not a file object: every agent's view
    creation and commit read such records."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, limit).decode(encoding).strip()
    except (OSError, UnicodeDecodeError):
        return None
    finally:
        os.close(fd)


def read_whole(path: str | Path) -> bytes:
    """The whole file at `path`, by a descriptor (no file object: a view's creation and its
    commit look for files most of which do not exist); OSError as `open` raises it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks: list[bytes] = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_whole(path: Path, text: str) -> None:
    """Write `path` so that it never exists with part of `text`: a temporary file beside it
    (named for this process and thread, so that two writers never share it), renamed over it."""
    part = path.with_name(f".{path.name}.fanout-{os.getpid()}-{threading.get_ident()}.tmp")
    part.write_text(text, encoding="utf-8")
    os.replace(part, path)


def has_hook(config: pygit2.Config | None, root: Path, common_dir: Path, name: str) -> bool:
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


def tree_of(pyrepo: pygit2.Repository, rev: str | pygit2.Oid) -> pygit2.Tree:
    """The tree of a revision or object id."""
    obj = pyrepo[rev] if isinstance(rev, pygit2.Oid) else pyrepo.revparse_single(rev)
    return obj.peel(pygit2.Tree)
