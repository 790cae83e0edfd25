"""The ignored files a build needs (`.env`, `.venv`, local config), found in the user's
working tree: copied into a new worktree, or layered under a copy-on-write view."""

from __future__ import annotations

import logging
import os
import shutil
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from orchestration.workspace.git import run_git
from toolbus.errors import FileNotFound, NotAFile, PathEscape
from toolbus.jail import Jail, split_parent
from toolbus.resources import is_within, normalize_path

log = logging.getLogger(__name__)

# a new file only: never through a symlink, never over what stands there
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


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
    files one by one); return their repository paths.

    `dest_root` holds a checkout whose content an agent may have written: a symlink there (at a
    file's place or at one of its parents) is never written through, and the file is left out,
    so that no user file lands outside `dest_root` (nor in the repository's `.git`)."""
    files: dict[str, Path] = {}
    for rel, real in included_paths(root, patterns):
        if not real.is_dir():
            files[rel] = real
            continue
        for item in sorted(real.rglob("*")):
            if item.is_file():
                files[f"{rel}/{item.relative_to(real).as_posix()}"] = item.resolve()
    jail = Jail(dest_root)
    copied: list[str] = []
    for rel in sorted(files):
        if not is_within(str(files[rel]), str(root.resolve())):
            continue
        if copy_beneath(jail, rel, files[rel]):
            copied.append(rel)
    return copied


def copy_beneath(jail: Jail, rel: str, source: Path) -> bool:
    """Copy `source` to `rel` under `jail`'s root, its directories made as needed, its mode and
    times kept; False (nothing written) where `rel` or a parent exists as anything but a
    directory, a symlink included."""
    parent, name = split_parent(rel)
    try:
        dfd = jail.open_dir(parent, create=True)
    except (PathEscape, NotAFile, FileNotFound):
        log.warning("included file %s not copied: a parent is not a directory here", rel)
        return False
    try:
        info = os.stat(source)
        try:
            fd = os.open(name, _NEW_FILE, stat.S_IMODE(info.st_mode), dir_fd=dfd)
        except FileExistsError:  # (whatever stands there, a symlink included, is kept)
            return False
        try:
            with open(source, "rb") as src, open(fd, "wb", closefd=False) as dst:
                shutil.copyfileobj(src, dst)
            os.fchmod(fd, stat.S_IMODE(info.st_mode))
            os.utime(fd, ns=(info.st_atime_ns, info.st_mtime_ns))
        finally:
            os.close(fd)
    finally:
        os.close(dfd)
    return True


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
