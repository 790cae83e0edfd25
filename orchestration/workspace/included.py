"""The ignored files a build needs (`.env`, local config), copied into a new workspace."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from orchestration.workspace.git import run_git
from toolbus.errors import PathEscape
from toolbus.resources import is_within, normalize_path


def copy_included(root: Path, dest_root: Path, patterns: Sequence[str]) -> list[str]:
    """Copy (never link) the files under `root` matched by `patterns` (globs relative to the
    repository) that git ignores into `dest_root`; return their repository paths."""
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
