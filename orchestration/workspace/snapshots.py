"""The pinned base of a run: the user's HEAD, plus a snapshot commit of their uncommitted work."""

from __future__ import annotations

from pathlib import Path

import pygit2
from pydantic import BaseModel, ConfigDict, Field

from orchestration.workspace.git import (
    FANOUT_IDENTITY,
    FULL_OID,
    SNAPSHOT_REF_PREFIX,
    GitRepo,
    check_component,
    has_hook,
    run_git,
    seed_index,
)
from orchestration.workspace.libgit2_git import common_dir
from orchestration.workspace.porcelain import parse


class Snapshot(BaseModel):
    """The pinned base of a run: the user's HEAD plus, when dirty, their uncommitted work."""

    model_config = ConfigDict(frozen=True)

    base_commit: str
    head_commit: str
    branch_ref: str | None
    dirty: bool
    untracked_included: list[str] = Field(default_factory=list[str])
    # files with unresolved conflicts in the user's checkout (a merge, rebase or cherry-pick
    # under way): the base holds them as the working tree does, conflict markers and all
    unmerged: list[str] = Field(default_factory=list[str])


def snapshot(repo: GitRepo, run_id: str, *, pin: bool = True) -> Snapshot:
    """Pin the run's base; uncommitted work goes into a snapshot commit, the user's state untouched.

    The snapshot commit is built with a temporary index under the state dir, so the user's
    branch, index and working tree are only read. `refs/fanout/snapshots/<run_id>` keeps the
    base alive through gc; without `pin`, the caller makes it (`pin_snapshot`) before the base
    is used by anything that lasts.
    """
    check_component(run_id, "run id")
    head, branch, dirty, untracked, unmerged = _head_and_status(repo)
    base = head
    if dirty:
        untracked = sorted(untracked)
        index = repo.temp_path("snapshot-index-")
        try:
            env = {"GIT_INDEX_FILE": str(index)}
            seed_index(repo.root, repo.git_dir / "index", index, "HEAD", env)
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
    if pin:
        pin_snapshot(repo, run_id, base)
    return Snapshot(
        base_commit=base,
        head_commit=head,
        branch_ref=branch,
        dirty=base != head,
        untracked_included=untracked if base != head else [],
        unmerged=unmerged if base != head else [],
    )


def pin_snapshot(repo: GitRepo, run_id: str, base: str) -> None:
    """Make `refs/fanout/snapshots/<run_id>` name the run's base."""
    check_component(run_id, "run id")
    ref = SNAPSHOT_REF_PREFIX + run_id
    message = f"fanout: snapshot for run {run_id}"
    if not _pinned_in_process(repo, ref, base, message):
        repo.git("update-ref", "-m", message, ref, base)


def unpin_snapshot(repo: GitRepo, run_id: str) -> None:
    """Delete `refs/fanout/snapshots/<run_id>` (a spawn that failed after `pin_snapshot`)."""
    check_component(run_id, "run id")
    repo.git("update-ref", "-d", SNAPSHOT_REF_PREFIX + run_id)


def _pinned_in_process(repo: GitRepo, ref: str, base: str, message: str) -> bool:
    """Make `ref` name `base` through libgit2, as `git update-ref` would (its reflog too, by the
    same `core.logAllRefUpdates` rule), without starting a git process: only where git would
    run no hook for it (a `reference-transaction` hook). False, nothing made: git makes it."""
    try:
        pyrepo = repo.open()
    except pygit2.GitError:
        return False
    try:
        work_tree = Path(pyrepo.workdir or repo.root)
        if has_hook(pyrepo.config, work_tree, common_dir(pyrepo), "reference-transaction"):
            return False
        pyrepo.create_reference(ref, pygit2.Oid(hex=base), force=True, message=message)
        return True
    except (pygit2.GitError, KeyError, ValueError, OSError):
        return False
    finally:
        pyrepo.free()


# `git status`'s codes of an unmerged path (both sides' states)
_UNMERGED = frozenset({"DD", "AU", "UD", "UA", "DU", "AA", "UU"})


def _head_and_status(repo: GitRepo) -> tuple[str, str | None, bool, list[str], list[str]]:
    """(HEAD's commit, its branch ref or None, whether anything is uncommitted, the untracked
    paths, the unmerged paths) from one `git status` (what `head_commit`, `head_branch` and
    `status_entries` say)."""
    args = ("status", "--porcelain=v2", "-z", "--branch", "--untracked-files=all", "--no-renames")
    status = parse(run_git(repo.root, *args, env={"GIT_OPTIONAL_LOCKS": "0"}).stdout, v2=True)
    oid = status.headers.get("branch.oid", "")
    name = status.headers.get("branch.head")
    untracked = [e.path for e in status.entries if e.code == "??"]
    unmerged = sorted(e.path for e in status.entries if e.code in _UNMERGED)
    dirty = bool(status.entries)
    if not FULL_OID.fullmatch(oid):  # (says what is wrong)
        return repo.head_commit(), repo.head_branch(), dirty, untracked, unmerged
    branch = None if name in (None, "(detached)") else f"refs/heads/{name}"
    return oid, branch, dirty, untracked, unmerged
