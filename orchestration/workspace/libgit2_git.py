"""`GitEngine` in-process with libgit2 (pygit2), saving the git processes of a checkout and a
commit. It declines, having changed nothing, whatever libgit2 would not do as git does: a
configured filter driver (libgit2 cannot run `clean`/`smudge`/`process` programs such as
git-lfs), a `working-tree-encoding` attribute (libgit2 does not re-encode), a
`reference-transaction` hook (git runs it, libgit2 does not), and a checkout of a large tree,
which git writes faster."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from pathlib import Path

import pygit2

from orchestration.workspace.diffs import file_changes
from orchestration.workspace.engine import (
    CommitJob,
    WorkCommit,
    advance_branch,
    changed_paths,
    reset_index_paths,
)
from orchestration.workspace.git import has_hook, read_record, read_whole, tree_of
from orchestration.workspace.pinning import is_rule_file, open_workspace_repo
from toolbus.gitcmd import Pinned
from toolbus.trees import PATH_MAX, walk

log = logging.getLogger(__name__)

_FILTER_DRIVER = re.compile(r"filter\..+\.(clean|smudge|process)", re.IGNORECASE)
NOT_IN_PROCESS_ATTRIBUTE = "working-tree-encoding"
"""An attribute libgit2 does not apply: where it may apply, git stages the files."""
# Above this many files git's own checkout is the faster one; below it, the git process that
# libgit2 saves is worth more than git's faster writing of files.
CHECKOUT_MAX_FILES = 256


class _TreeFacts:
    """Per (object store, tree): whether its `.gitattributes` suit libgit2 and how many files it
    holds; computed once per tree, shared by the threads of this process and by every worktree
    of the repository (a tree's content is its id's)."""

    def __init__(self) -> None:
        self._known: dict[tuple[int, int, str], tuple[bool, int]] = {}
        self._lock = threading.Lock()

    def of(self, pyrepo: pygit2.Repository, tree: pygit2.Tree) -> tuple[bool, int]:
        """Whether no `.gitattributes` in `tree` (nor info/attributes) names an attribute
        libgit2 lacks, and how many files the tree holds."""
        key = (*_object_store(pyrepo), str(tree.id))
        with self._lock:
            known = self._known.get(key)
        if known is None:
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
                        ok = NOT_IN_PROCESS_ATTRIBUTE.encode() not in data
            known = (ok, files)
            with self._lock:
                self._known[key] = known
        ok, files = known
        # (a worktree's is the repository's)
        info = os.path.join(common_dir(pyrepo), "info", "attributes")
        with contextlib.suppress(OSError):
            if ok and NOT_IN_PROCESS_ATTRIBUTE.encode() in read_whole(info):
                ok = False
        return ok, files


# a git dir -> its repository's own: a worktree's `commondir` names it once, made whole
_COMMON_DIRS: dict[str, Path] = {}


def _unreadable_below(pyrepo: pygit2.Repository, tree: pygit2.Tree) -> bool:
    """Whether the work tree holds a directory `add_all` would pass over without a word: one
    that cannot be read, or a path too long for a system call (libgit2 reaches each by its
    whole path). Walked as git's `add -A` walks: not into `.git`, another repository, or a
    directory the repository does not track and ignores. A directory whose name is not UTF-8
    counts too: pygit2 cannot ask libgit2 about it, and git stages it byte for byte."""
    root = pyrepo.workdir.rstrip("/")
    unread: list[OSError] = []

    def note(exc: OSError) -> None:
        if not isinstance(exc, (FileNotFoundError, NotADirectoryError)):  # (gone since listed)
            unread.append(exc)

    for here, dirs, files in walk(root, onerror=note):
        if unread:
            return True
        rel = here[len(root) + 1 :]
        if rel and (".git" in dirs or ".git" in files):
            dirs[:] = []  # another repository: git adds it as a whole or not at all
            continue
        length = len(os.fsencode(here)) + 1
        if any(length + len(os.fsencode(name)) >= PATH_MAX for name in (*dirs, *files)):
            return True
        walked: list[str] = []
        for name in dirs:
            if not rel and name == ".git":
                continue
            below = f"{rel}/{name}" if rel else name
            try:
                below.encode("utf-8")
            except UnicodeEncodeError:
                if os.path.islink(os.path.join(here, name)):
                    continue  # (a link: not walked into)
                return True
            if not _untracked_and_ignored(pyrepo, tree, below):
                walked.append(name)
        dirs[:] = walked
    return bool(unread)


def _untracked_and_ignored(pyrepo: pygit2.Repository, tree: pygit2.Tree, rel: str) -> bool:
    try:
        tree[rel]
        return False
    except KeyError:
        pass
    try:
        return bool(pyrepo.path_is_ignored(rel + "/"))
    except pygit2.GitError:
        return False


def common_dir(pyrepo: pygit2.Repository) -> Path:
    """The repository's own git dir: a worktree's git dir names it in `commondir`."""
    git_dir = pyrepo.path
    known = _COMMON_DIRS.get(git_dir)
    if known is None:
        common = read_record(os.path.join(git_dir, "commondir"), "utf-8", 65536)
        known = Path(git_dir) / (common or ".")
        if common is not None:  # (a git dir with none may become a worktree's: looked at again)
            if len(_COMMON_DIRS) >= 4096:
                _COMMON_DIRS.clear()
            _COMMON_DIRS[git_dir] = known
    return known


def _object_store(pyrepo: pygit2.Repository) -> tuple[int, int]:
    """The identity (device, inode) of the repository's object directory: a worktree's git dir
    shares its repository's."""
    st = os.stat(common_dir(pyrepo) / "objects")
    return st.st_dev, st.st_ino


class Libgit2Git:
    """Checkout and commit in-process; declines what libgit2 would do differently from git."""

    def __init__(self, *, checkout_max_files: int = CHECKOUT_MAX_FILES) -> None:
        self._checkout_max_files = checkout_max_files
        self._facts = _TreeFacts()

    def accepts(
        self,
        pyrepo: pygit2.Repository,
        tree: pygit2.Tree,
        *,
        filter_drivers: bool | None = None,
        work_tree: Path | None = None,
        config: pygit2.Config | None = None,
    ) -> bool:
        """Whether libgit2 checks out and stages `tree`'s files exactly as git would. The
        configuration and hooks are read every time; the tree's attributes once per tree.
        `filter_drivers`: whether the configuration names a filter driver, when the caller
        has just read its keys (None: they are read here). `work_tree`: where git would work,
        when not the handle's work tree. `config`: a snapshot of the handle's configuration to
        read instead of the live one."""
        try:
            if config is None:
                config = pyrepo.config
            if filter_drivers is None:
                filter_drivers = any(_FILTER_DRIVER.fullmatch(entry.name) for entry in config)
            if filter_drivers:
                return False
            attributes_file = None
            with contextlib.suppress(KeyError):
                attributes_file = str(config["core.attributesFile"])
            if attributes_file:
                with contextlib.suppress(OSError):
                    text = Path(os.path.expanduser(attributes_file)).read_bytes()
                    if NOT_IN_PROCESS_ATTRIBUTE.encode() in text:
                        return False
            root = work_tree or (Path(pyrepo.workdir) if pyrepo.workdir else None)
            if root is not None and has_hook(
                config, root, common_dir(pyrepo), "reference-transaction"
            ):
                return False
            return self._facts.of(pyrepo, tree)[0]
        except (pygit2.GitError, KeyError, ValueError, OSError):
            return False

    def checkout(self, pinned: Pinned, base: str) -> bool:
        path = pinned.work_tree
        try:
            wt = open_workspace_repo(pinned)
        except pygit2.GitError:
            return False
        try:
            tree = wt[pygit2.Oid(hex=base)].peel(pygit2.Tree)
            if not self.accepts(wt, tree):
                return False
            if self._facts.of(wt, tree)[1] > self._checkout_max_files:
                return False  # a large tree: git writes it faster
            # FORCE: write every file of the tree (the directory is empty, as after
            # --no-checkout); the index gets the files' stat data, so `git status` re-hashes
            # nothing.
            wt.checkout_tree(  # pyright: ignore[reportUnknownMemberType]
                tree, strategy=pygit2.enums.CheckoutStrategy.FORCE
            )
            return True
        except (pygit2.GitError, KeyError, ValueError, OSError) as exc:
            log.info("in-process checkout of %s failed (%s); git checks it out", path, exc)
            return False
        finally:
            wt.free()

    def commit(self, job: CommitJob) -> WorkCommit | None:
        """The worktree's index becomes the working tree (`git add -A`), out-of-scope paths are
        set back to the base, and the branch moves by compare-and-swap under its ref lock;
        declined unless the worktree's HEAD is on the job's ref."""
        pyrepo, ref, base = job.pyrepo, job.ref, job.base
        if pyrepo.head_is_detached:
            return None
        try:
            if pyrepo.references["HEAD"].target != ref:
                return None  # the agent switched branches itself: git handles it
            if not self.accepts(pyrepo, job.head.tree):
                return None
            index = pyrepo.index
            index.read(force=True)
            if index.conflicts is not None:
                return None
            if _unreadable_below(pyrepo, job.head.tree):
                return None  # git names what it cannot read (`cli_git.unread_directories`)
            index.add_all()
            tree = str(index.write_tree())
            dropped: list[str] = []
            if tree != str(tree_of(pyrepo, base).id):
                changed = changed_paths(pyrepo, base, tree)
                if any(is_rule_file(p) for p in changed):
                    # new attributes or ignore rules: let git read them as it does (libgit2
                    # also reads the index's, and follows links)
                    return None
                dropped = sorted(p for p in changed if not job.write_scope.allows(p))
                if dropped:
                    reset_index_paths(pyrepo, index, base, dropped)
                    tree = str(index.write_tree())
        except (pygit2.GitError, KeyError, ValueError, OSError) as exc:
            log.info("in-process staging in %s failed (%s); git stages it", pyrepo.workdir, exc)
            return None
        if tree == str(job.head.tree_id):
            return WorkCommit(commit=None, changes=[], dropped=dropped)
        head = job.head.id
        commit = advance_branch(
            pyrepo, ref=ref, head=job.head, tree=tree, message=job.message, author=job.author
        )
        try:
            index.write()  # the worktree's index now holds the new commit's tree
        except (pygit2.GitError, OSError) as exc:
            # The work is committed and the branch moved; only `git status` inside the
            # workspace would show it staged (the next commit re-stages the working tree).
            log.warning("the index of %s was not updated after its commit: %s", pyrepo.workdir, exc)
        changes = file_changes(pyrepo, str(head), str(commit))
        return WorkCommit(commit=str(commit), changes=changes, dropped=dropped)
