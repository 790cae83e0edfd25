"""What a commit changed: file changes with line counts, diffstats and unified diffs."""

from __future__ import annotations

from collections.abc import Sequence

import pygit2

from orchestration.contracts import ChangeStatus, DiffStat, FileChange
from orchestration.workspace.git import GitRepo, tree_of

_STATUS: dict[str, ChangeStatus] = {
    "A": "added",
    "M": "modified",
    "D": "deleted",
    "R": "renamed",
    "T": "modified",
    "C": "added",
}


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
    return tree_changes(pyrepo, tree_of(pyrepo, old), tree_of(pyrepo, new))


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
