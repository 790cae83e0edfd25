"""`git status` in its machine formats (`--porcelain=v1 -z` and `=v2 -z`), parsed in one place."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from orchestration.workspace.git import run_git


@dataclass(frozen=True)
class StatusEntry:
    """One line of `git status`: the path and the two-letter code (`??` for untracked)."""

    path: str
    code: str
    orig_path: str | None = None


@dataclass(frozen=True)
class Status:
    """A parsed `git status`: its `# key value` headers (v2 only) and its entries."""

    headers: dict[str, str] = field(default_factory=dict[str, str])
    entries: list[StatusEntry] = field(default_factory=list[StatusEntry])


# v2 entries: the kind, then this many space-separated fields before the path
_V2_FIELDS = {"1": 8, "2": 9, "u": 10}
_V2_SHORT = {"?": "??", "!": "!!"}


def parse(out: str, *, v2: bool) -> Status:
    """Parse `git status --porcelain=v1 -z` (or `=v2`) output; a rename's or copy's original
    path, which follows its entry as a field of its own, becomes the entry's `orig_path`."""
    status = Status()
    fields = out.split("\0")
    i = 0
    while i < len(fields):
        item = fields[i]
        i += 1
        entry = _v2_entry(item) if v2 else _v1_entry(item)
        if entry is None:
            if v2 and item.startswith("# "):
                key, _, value = item[2:].partition(" ")
                status.headers[key] = value
            continue
        if entry.code[0] in "RC" and (not v2 or item.startswith("2 ")) and i < len(fields):
            entry = StatusEntry(entry.path, entry.code, fields[i])
            i += 1
        status.entries.append(entry)
    return status


def _v1_entry(item: str) -> StatusEntry | None:
    if len(item) < 4:
        return None
    return StatusEntry(item[3:], item[:2])


def _v2_entry(item: str) -> StatusEntry | None:
    kind = item[:1]
    if kind in _V2_SHORT and item[1:2] == " ":
        return StatusEntry(item[2:], _V2_SHORT[kind])
    before = _V2_FIELDS.get(kind)
    if before is None or item[1:2] != " ":
        return None
    parts = item.split(" ", before)
    return StatusEntry(parts[-1], parts[1]) if len(parts) > before else None


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
    return parse(run_git(cwd, *args, env=env).stdout, v2=False).entries
