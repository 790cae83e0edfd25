"""The ignored files a build needs (`.env`, `.venv`, local config), found in the user's
working tree: copied into a new worktree, or layered under a copy-on-write view."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from orchestration.workspace.git import run_git
from toolbus.errors import PathEscape
from toolbus.resources import is_within, normalize_path


def included_paths(root: Path, patterns: Sequence[str]) -> list[tuple[str, Path]]:
    """What `patterns` (globs relative to the repository) name that git ignores: a directory
    ignored as a whole is one entry; elsewhere, the ignored files. Each as (repository path,
    real path); only what lies inside the repository and outside `.git`."""
    if not patterns:
        return []
    real_root = root.resolve()
    git_dir = real_root / ".git"

    def inside(item: Path) -> tuple[str, Path] | None:
        real = item.resolve()
        if not real.exists() or not is_within(str(real), str(real_root)):
            return None  # a dangling link or something outside the repository
        if is_within(str(real), str(git_dir)):
            return None
        try:
            rel = normalize_path(item.relative_to(root).as_posix())
        except (ValueError, PathEscape):
            return None
        if not rel or is_within(rel, ".git"):
            return None
        return rel, real

    matches: dict[str, Path] = {}
    for pattern in patterns:
        for match in _iter_matches(root, pattern):
            found = inside(match)
            if found is not None:
                matches[found[0]] = found[1]
    ignored = _ignored(root, sorted(matches))
    out: dict[str, Path] = {}
    expand: list[str] = []
    for rel, real in matches.items():
        if rel in ignored:
            out[rel] = real
        elif real.is_dir():
            expand.append(rel)
    files: dict[str, Path] = {}
    for rel in expand:
        for item in sorted((root / rel).rglob("*")):
            found = inside(item)
            if found is not None and found[1].is_file():
                files[found[0]] = found[1]
    for rel in _ignored(root, sorted(files)):
        out[rel] = files[rel]
    # an entry inside an ignored directory comes with that directory
    dirs = [rel for rel, real in out.items() if real.is_dir()]
    return sorted(
        (rel, real)
        for rel, real in out.items()
        if not any(is_within(rel, d) and rel != d for d in dirs)
    )


def _ignored(root: Path, names: list[str]) -> set[str]:
    if not names:
        return set()
    proc = run_git(
        root, "check-ignore", "-z", "--stdin", input="\0".join(names) + "\0", check=False
    )
    return {p for p in proc.stdout.split("\0") if p}


def copy_included(root: Path, dest_root: Path, patterns: Sequence[str]) -> list[str]:
    """Copy (never link) the ignored files `patterns` name into `dest_root` (a directory's
    files one by one); return their repository paths."""
    files: dict[str, Path] = {}
    for rel, real in included_paths(root, patterns):
        if not real.is_dir():
            files[rel] = real
            continue
        for item in sorted(real.rglob("*")):
            if item.is_file():
                files[f"{rel}/{item.relative_to(real).as_posix()}"] = item.resolve()
    copied: list[str] = []
    for rel in sorted(files):
        if not is_within(str(files[rel]), str(root.resolve())):
            continue
        target = dest_root / rel
        if os.path.lexists(target):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(files[rel], target)
        copied.append(rel)
    return copied


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
