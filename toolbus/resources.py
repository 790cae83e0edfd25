"""Lease resources: normalised repository-relative paths, write scopes, and the conflict rule."""

from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass

from toolbus.errors import PathEscape

MAX_PATH_LENGTH = 4096


def normalize_path(path: str) -> str:
    """A repository-relative posix path with no `.`, `..` or trailing slash; `""` is the root.

    Raises `PathEscape` for absolute paths, NUL bytes, over-long paths and paths that climb out.
    """
    if "\x00" in path:
        raise PathEscape("path contains a NUL byte; give a plain repository-relative path")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise PathEscape(
            "path is not valid Unicode text (a lone surrogate); give a plain UTF-8 path"
        ) from None
    if len(path) > MAX_PATH_LENGTH:
        raise PathEscape(f"path is longer than {MAX_PATH_LENGTH} characters")
    text = path.replace("\\", "/").strip()
    if text.startswith("/"):
        raise PathEscape(
            f"absolute path {path!r} refused; paths are relative to the repository root"
        )
    parts: list[str] = []
    for part in text.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise PathEscape(f"path {path!r} climbs out of the repository root")
            parts.pop()
            continue
        parts.append(part)
    return posixpath.join(*parts) if parts else ""


def is_within(path: str, prefix: str) -> bool:
    """True when normalised `path` equals `prefix` or lies below it (component-wise)."""
    return prefix == "" or path == prefix or path.startswith(prefix + "/")


def overlaps(a: str, b: str) -> bool:
    """True when one normalised path is equal to or an ancestor of the other."""
    return is_within(a, b) or is_within(b, a)


@dataclass(frozen=True)
class WriteScope:
    """Where an agent may write: path prefixes, `None` for the whole repository, `()` for none;
    less `kept_out` (paths no commit of the agent's takes, such as the user's files copied in)."""

    prefixes: tuple[str, ...] | None
    kept_out: tuple[str, ...] = ()

    @classmethod
    def of(cls, prefixes: Iterable[str] | None) -> WriteScope:
        """Normalise the prefixes, dropping any covered by another one."""
        if prefixes is None:
            return cls(None)
        normal = sorted({normalize_path(p) for p in prefixes})
        if "" in normal:
            return cls(None)
        kept: list[str] = []
        for p in normal:
            if not any(is_within(p, k) for k in kept):
                kept.append(p)
        return cls(tuple(kept))

    @property
    def whole_repository(self) -> bool:
        return self.prefixes is None

    @property
    def read_only(self) -> bool:
        return self.prefixes == ()

    def allows(self, path: str) -> bool:
        """True when the normalised path may be written under this scope."""
        if self.kept_out and any(is_within(path, k) for k in self.kept_out):
            return False
        if self.prefixes is None:
            return True
        return any(is_within(path, p) for p in self.prefixes)

    def without(self, paths: Iterable[str]) -> WriteScope:
        """This scope (of its own kind, a guard's policy kept), `paths` (and what lies below
        them) kept out of it."""
        return dataclasses.replace(self, kept_out=tuple(sorted({*self.kept_out, *paths})))

    def lease_paths(self) -> tuple[str, ...]:
        """The path resources to write-lease for this scope (`""` is the whole repository)."""
        return ("",) if self.prefixes is None else self.prefixes

    def describe(self) -> str:
        if self.prefixes is None:
            return "the whole repository"
        if not self.prefixes:
            return "nothing (read-only)"
        return ", ".join(f"{p}/" if p else "/" for p in self.prefixes)
