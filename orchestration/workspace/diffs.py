"""What a commit changed: file changes with line counts, diffstats and unified diffs."""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence

import pygit2

from orchestration.contracts import ChangeStatus, DiffStat, FileChange, is_utf8
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


_LINK = int(pygit2.enums.FileMode.LINK)
_NOT_FILES = (int(pygit2.enums.FileMode.TREE), int(pygit2.enums.FileMode.COMMIT))


def applied_changes(
    pyrepo: pygit2.Repository,
    old: pygit2.Tree,
    changes: Mapping[str, tuple[str, int] | None],
    *,
    plain: Collection[str] = (),
    config: pygit2.Config | None = None,
) -> list[FileChange] | None:
    """What `tree_changes(old, new)` gives, where `new` is `old` with `changes` (path -> its
    blob id and mode, or None: deleted) applied, each differing from `old`, read from those
    paths alone instead of from both whole trees. None, to diff the trees, where renames or
    copies could be found (a deletion, copies asked for by `diff.renames`), where a path
    changes kind (a file for a directory, a link for a file: a deletion and an addition), or
    where its attributes name a diff driver or binary (the trees' diff applies them, a diff of
    two blobs does not). `plain`: paths known to have no attributes, not looked up. `config`:
    a snapshot of `pyrepo`'s configuration, read instead of the live one."""
    if any(change is None for change in changes.values()):
        return None
    if not all(is_utf8(path) for path in changes):
        return None  # (libgit2 looks attributes up by UTF-8 paths only: the trees' diff)
    try:
        renames = str((config if config is not None else pyrepo.config)["diff.renames"])
        renames = renames.strip().lower()
    except KeyError:
        renames = "true"
    except (pygit2.GitError, ValueError):
        return None
    if renames not in ("true", "false", "yes", "no", "on", "off", "1", "0", ""):
        return None  # copies: an added file may be told a copy of a modified one
    found: list[FileChange] = []
    for path in sorted(changes, key=os.fsencode):  # a tree diff's order
        change = changes[path]
        assert change is not None
        blob_id, mode = change
        try:
            before: pygit2.Object | None = old[path]
        except (KeyError, ValueError):
            before = None
        kind = None if before is None else int(before.filemode)
        if (
            mode in _NOT_FILES
            or kind in _NOT_FILES
            or (kind is not None and (kind == _LINK) != (mode == _LINK))
            # a driver, or binary: as the trees'
            or (path not in plain and pyrepo.get_attr(path, "diff") is not None)
        ):
            return None
        after = pyrepo[blob_id].peel(pygit2.Blob)
        patch = pygit2.Patch.create_from(
            before.peel(pygit2.Blob) if before is not None else None,
            after,
            old_as_path=path,
            new_as_path=path,
        )
        _context, added, removed = patch.line_stats
        found.append(
            FileChange(
                path=path,
                status="added" if before is None else "modified",
                lines_added=added,
                lines_removed=removed,
                blob=str(after.id),
            )
        )
    return found


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
