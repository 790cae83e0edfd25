"""The seam between the two ways the server checks out a workspace and commits an agent's work.

`GitEngine` has two implementations: `CliGit` (git's own commands, pinned) and `Libgit2Git`
(in-process, which declines whatever it would not do exactly as git does). `InProcessFirst`
tries one and falls back to the other; `engines.py` is the one place the server's choice is made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import pygit2
from pydantic import BaseModel, ConfigDict, Field

from orchestration.contracts import FileChange
from orchestration.errors import RepositoryError
from orchestration.workspace.git import FANOUT_IDENTITY, Identity, tree_of
from toolbus.gitcmd import Pinned
from toolbus.resources import WriteScope


class WouldBlock(Exception):
    """Raised, with nothing changed, by a workspace operation asked not to wait when it could
    wait on a lock or take time that grows with the repository or the change: the caller runs
    it again, allowed to wait, off the event loop."""


class BaseNotReady(WouldBlock):
    """A view's base is not checked out yet, or its lock is taken (it is being made): once it
    is made, views of the same commit are quick again."""


class WorkCommit(BaseModel):
    """What `commit_workspace` did: the new commit (None if none), its changes against
    `parent` (the branch's commit it was made on), what it dropped."""

    model_config = ConfigDict(frozen=True)

    commit: str | None
    changes: list[FileChange]
    dropped: list[str]
    planted: list[str] = Field(default_factory=list[str])
    """`.git` entries the agent made, moved out of the workspace and not committed."""
    parent: str | None = None


@dataclass(frozen=True)
class CommitJob:
    """One commit of an agent's work: its tree is `base` outside `write_scope` and the working
    tree inside it, on top of `head`, moving `ref` by compare-and-swap."""

    pyrepo: pygit2.Repository
    """The workspace's repository, opened at its recorded git dir (`open_workspace_repo`)."""
    pinned: Pinned
    ref: str
    head: pygit2.Commit
    base: str
    write_scope: WriteScope
    message: str
    author: Identity
    shared_handle: bool = False
    """`pyrepo` is a handle kept for the quick commits of views on one base (its work tree the
    base's checkout, `view_commit_handle`): the view's files are read by their paths under
    `pinned.work_tree`, and the handle is never freed by the job's user."""
    plain_paths: frozenset[str] = frozenset()
    """Paths no attribute applies to (`view_commit_handle` found no attribute file for them):
    their attributes are not looked up."""
    config: pygit2.Config | None = None
    """A snapshot of `pyrepo`'s configuration taken for the job (`view_commit_handle`), read
    instead of the live one, whose every read checks each of its files again."""


class GitEngine(Protocol):
    """Checks out a new workspace and commits an agent's work; an engine may decline either,
    having changed nothing, so that another can do it."""

    def checkout(self, pinned: Pinned, base: str) -> bool:
        """Populate the new, empty worktree (files and index) with `base`'s tree; False when
        declined."""
        ...

    def commit(self, job: CommitJob) -> WorkCommit | None:
        """Commit the agent's work as `job` says; None when declined."""
        ...


@dataclass(frozen=True)
class InProcessFirst:
    """`first` where it accepts the work, `fallback` (which must never decline) otherwise."""

    first: GitEngine
    fallback: GitEngine

    def checkout(self, pinned: Pinned, base: str) -> bool:
        return self.first.checkout(pinned, base) or self.fallback.checkout(pinned, base)

    def commit(self, job: CommitJob) -> WorkCommit | None:
        done = self.first.commit(job)
        return done if done is not None else self.fallback.commit(job)


def changed_paths(pyrepo: pygit2.Repository, base: str, tree: str) -> list[str]:
    """The paths whose entry differs between `base`'s tree and `tree` (no rename detection)."""
    old = tree_of(pyrepo, base)
    new = pyrepo[pygit2.Oid(hex=tree)].peel(pygit2.Tree)
    paths: set[str] = set()
    for delta in old.diff_to_tree(new).deltas:
        paths.add(delta.old_file.path)
        paths.add(delta.new_file.path)
    return sorted(paths)


def base_entries(
    pyrepo: pygit2.Repository, base: str, paths: Sequence[str]
) -> list[tuple[str, pygit2.Object | None]]:
    """Each path with its file entry in `base`'s tree, None where it is absent (or a directory)."""
    base_tree = tree_of(pyrepo, base)
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


def reset_index_paths(
    pyrepo: pygit2.Repository, index: pygit2.Index, base: str, paths: Sequence[str]
) -> None:
    """Set `paths` in `index` to their content in `base`, removing absent ones."""
    for p, entry in base_entries(pyrepo, base, paths):
        if entry is None:
            if p in index:
                index.remove(p)
        else:
            index.add(pygit2.IndexEntry(p, entry.id, entry.filemode))


def commit_message(message: str) -> str:
    """The message of an agent's work commit (a default when the agent gave none)."""
    return message.strip() or "fanout: agent work"


def advance_branch(
    pyrepo: pygit2.Repository,
    *,
    ref: str,
    head: pygit2.Commit,
    tree: str,
    message: str,
    author: Identity,
) -> pygit2.Oid:
    """Commit `tree` on top of `head` and move `ref` to it by compare-and-swap under its ref
    lock; raises `RepositoryError` when `ref` moved meanwhile."""
    commit = pyrepo.create_commit(
        None,
        author.signature(),
        FANOUT_IDENTITY.signature(),
        commit_message(message) + "\n",
        pygit2.Oid(hex=tree),
        [head.id],
    )
    try:
        with pyrepo.transaction() as txn:
            txn.lock_ref(ref)
            current = pyrepo.references[ref].target
            if current != head.id:
                raise RepositoryError(
                    f"the branch {ref} of the workspace {pyrepo.workdir} moved from {head.id} "
                    f"to {current} while its work was committed; commit again"
                )
            # (the reflog signature is the repository's identity: pygit2 cannot pass one)
            txn.set_target(ref, commit, message="fanout: commit agent work")
    except pygit2.GitError as exc:
        raise RepositoryError(f"could not move {ref} to the agent's work: {exc}") from exc
    return commit
