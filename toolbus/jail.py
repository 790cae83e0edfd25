"""The jail: repository-relative paths resolved safely inside one root directory.

Resolution is two-step. `Jail.resolve` follows symlinks lexically component by component and
refuses any that lead out of the root or into `.git`; it returns the *real* relative path. Opening
then walks that real path from the root with `O_NOFOLLOW` at every component (`openat`-style via
`dir_fd`), so a symlink swapped in between resolution and use is refused instead of followed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from toolbus.errors import FileNotFound, FileOpError, NotAFile, PathEscape, ToolbusError
from toolbus.resources import normalize_path

MAX_COMPONENT_BYTES = 255
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
"""A directory opened as a step of a walk: never through a link."""


def _hidden(part: str) -> bool:
    return part.casefold() == ".git"


def describe_kind(mode: int) -> str:
    """A human word for a file type (for `NotAFile` messages)."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    if stat.S_ISLNK(mode):
        return "a symlink"
    return "not a regular file"


_NAMED_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC


def _real_dir(path: Path) -> str | None:
    """The real path of the directory `path` (links followed, as `os.path.realpath`), None
    when it is no directory. Where `/proc` is, the kernel names the directory once it is open
    (open, readlink, two stats to check the name, close) instead of a look at each component
    of the path; where that fails, the look."""
    try:
        fd = os.open(path, _NAMED_FLAGS)
    except OSError:
        fd = None
    if fd is not None:
        try:
            named = os.readlink(f"/proc/self/fd/{fd}")
            # (a directory deleted meanwhile is named with a suffix; one out of this process's
            # root, without the leading slash: neither is the directory's path)
            if named.startswith("/") and os.path.samestat(os.stat(named), os.fstat(fd)):
                return named
        except OSError:
            pass
        finally:
            os.close(fd)
    real = os.path.realpath(path)
    return real if os.path.isdir(real) else None


class Jail:
    """Resolves repository-relative paths inside `root`, or raises `PathEscape`."""

    def __init__(self, root: Path) -> None:
        real = _real_dir(root)
        if real is None:
            raise FileNotFound(
                f"workspace {os.path.realpath(root)} does not exist or is not a directory"
            )
        self.root = Path(real)

    def check(self, path: str) -> str:
        """Lexical checks only: the normalised path (no NUL, `..` out, absolute, `.git`)."""
        rel = normalize_path(path)
        for part in rel.split("/") if rel else ():
            if _hidden(part):
                raise PathEscape(
                    f"{path!r} is inside .git; git internals are not accessible through the "
                    "file tools (use run_command with git commands to inspect history)"
                )
            if len(part.encode("utf-8", "surrogateescape")) > MAX_COMPONENT_BYTES:
                raise PathEscape(
                    f"path component {part[:40]!r}... is longer than {MAX_COMPONENT_BYTES} bytes"
                )
        return rel

    def resolve(self, path: str) -> str:
        """The real relative path `path` names, following symlinks only while they stay inside.

        A missing tail is kept as is (a file about to be created).
        """
        rel = self.check(path)
        parts = rel.split("/") if rel else []
        root = str(self.root)
        current = root
        for index, part in enumerate(parts):
            candidate = os.path.join(current, part)
            try:
                st = os.lstat(candidate)
            except FileNotFoundError:
                current = os.path.join(candidate, *parts[index + 1 :])
                break
            except NotADirectoryError:
                prefix = "/".join(parts[:index])
                raise NotAFile(f"{prefix!r} is a file, not a directory (in {path!r})") from None
            except OSError as exc:  # a link loop (ELOOP), a name too long for the file system
                raise os_error(exc, path) from None
            if stat.S_ISLNK(st.st_mode):
                target = os.path.realpath(candidate)
                if not _within(target, root):
                    link = "/".join(parts[: index + 1])
                    raise PathEscape(
                        f"{link!r} is a symlink that leads outside the workspace; only paths "
                        "inside the repository are accessible"
                    )
                inner = _below(target, root)
                if any(_hidden(p) for p in inner.split("/")):
                    raise PathEscape(
                        f"{path!r} resolves (through a symlink) into .git; git internals are "
                        "not accessible through the file tools"
                    )
                current = target
            else:
                current = candidate
        return _below(current, root)

    def open_dir(self, rel_dir: str, *, create: bool = False) -> int:
        """A directory fd for the real relative path `rel_dir`, walked with `O_NOFOLLOW`.

        With `create`, missing directories are made. The caller closes the fd.
        """
        fd = os.open(self.root, DIR_FLAGS)
        walked: list[str] = []
        try:
            for part in rel_dir.split("/") if rel_dir else ():
                walked.append(part)
                try:
                    next_fd = os.open(part, DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise FileNotFound(
                            f"directory {'/'.join(walked)!r} does not exist"
                        ) from None
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o777, dir_fd=fd)
                    next_fd = self._open_existing_dir(part, fd, walked)
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    next_fd = self._open_existing_dir(part, fd, walked)
                os.close(fd)
                fd = next_fd
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _open_existing_dir(part: str, parent_fd: int, walked: list[str]) -> int:
        try:
            return os.open(part, DIR_FLAGS, dir_fd=parent_fd)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            where = "/".join(walked)
            st = os.stat(part, dir_fd=parent_fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise PathEscape(
                    f"{where!r} became a symlink while in use; retry the operation"
                ) from None
            raise NotAFile(f"{where!r} is {describe_kind(st.st_mode)}, not a directory") from None


def _within(target: str, root: str) -> bool:
    return target == root or target.startswith(root.rstrip("/") + "/")


def _below(path: str, root: str) -> str:
    """The relative path of `path`, which is `root` or lies below it ("" for `root` itself):
    both are normalised absolute paths, so it is the text after `root`'s."""
    if path == root:
        return ""
    prefix = root.rstrip("/") + "/"
    if path.startswith(prefix):
        return path[len(prefix) :]
    real = os.path.relpath(path, root)  # (not below: as `relpath` tells it)
    return "" if real == "." else real.replace(os.sep, "/")


def split_parent(rel: str) -> tuple[str, str]:
    """(`parent`, `name`) of a non-empty real relative path."""
    parent, _, name = rel.rpartition("/")
    return parent, name


def os_error(exc: OSError, path: str) -> ToolbusError:
    """Translate an `OSError` met while operating on `path` into a bus error."""
    if exc.errno == errno.ELOOP:
        return PathEscape(f"{path!r} is (or became) a symlink; retry, or name the real path")
    if isinstance(exc, FileNotFoundError):
        return FileNotFound(f"{path!r} does not exist")
    if isinstance(exc, IsADirectoryError):
        return NotAFile(f"{path!r} is a directory")
    if isinstance(exc, NotADirectoryError):
        return NotAFile(f"a parent of {path!r} is not a directory")
    return FileOpError(f"{path!r}: {exc.strerror or exc}")
