"""Walking and deleting directory trees an agent made, whatever their depth.

An agent's command can nest directories as deep as it likes (`mkdir d; cd d` in a loop), and
`os.walk` and `shutil.rmtree` recurse once per level in this Python: past about a thousand
levels they raise `RecursionError`, which no `ignore_errors` catches. These do the same work
with a stack of their own, never follow a link, and `remove_tree` holds a bounded number of
directories open at any depth."""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat
from collections.abc import Callable, Iterator
from typing import Any

# the longest path, with its terminating NUL, that Linux's system calls take
PATH_MAX = 4096
# directories `remove_tree` holds open at once; a directory deeper than this below the top is
# first moved up into the top (inside the tree being deleted) and deleted from there
_OPEN_DEPTH = 64


def walk(
    top: str | os.PathLike[str], onerror: Callable[[OSError], object] | None = None
) -> Iterator[tuple[str, list[str], list[str]]]:
    """`os.walk(top, onerror=onerror)`, top-down, as it walks (links to directories are listed
    among the directories and not entered; a directory that cannot be read is skipped, its
    error given to `onerror`; the caller may prune the directory names it is given), without
    recursion."""
    stack = [os.fspath(top)]
    while stack:
        here = stack.pop()
        dirs: list[str] = []
        files: list[str] = []
        try:
            with os.scandir(here) as entries:
                for entry in entries:
                    try:
                        is_dir = entry.is_dir()
                    except OSError:
                        is_dir = False
                    (dirs if is_dir else files).append(entry.name)
        except OSError as exc:
            if onerror is not None:
                onerror(exc)
            continue
        yield here, dirs, files
        for name in reversed(dirs):
            below = os.path.join(here, name)
            if not os.path.islink(below):
                stack.append(below)


def remove_tree(path: str | os.PathLike[str], *, ignore_errors: bool = False) -> None:
    """Delete `path` and everything below it: a link is removed, never followed; a directory
    its owner may not read or change (an agent's `chmod`, overlayfs's `work/work`) is opened up
    to 0700 first, through a handle on the directory itself. What cannot be deleted is passed
    over and the rest deleted; then the first error is raised (`OSError`), unless
    `ignore_errors` (as `shutil.rmtree`'s). Nothing when `path` does not exist."""
    try:
        _remove_tree(os.fspath(path))
    except OSError:
        if not ignore_errors:
            raise


def _remove_tree(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    parent = os.path.dirname(path) or "."
    name = os.path.basename(path)
    errors: list[OSError] = []
    parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if stat.S_ISDIR(st.st_mode):
            top = _open_child(parent_fd, name)
            try:
                moved = itertools.count()
                while _empty_once(top, moved, errors):
                    pass
            finally:
                os.close(top)
        _attempt(errors, _remove_entry, parent_fd, name, directory=stat.S_ISDIR(st.st_mode))
    finally:
        os.close(parent_fd)
    if errors:
        raise errors[0]


def _empty_once(top: int, moved: itertools.count[int], errors: list[OSError]) -> bool:
    """Delete what is below the directory `top` down to `_OPEN_DEPTH` levels (what cannot be
    is added to `errors` and passed over); a directory found there is moved up into `top`
    instead. True when one was (another pass is due)."""
    again = False
    # each open directory: its handle, the names in it left to delete, its own name
    frames: list[tuple[int, list[str], str]] = [(top, _names(top), "")]
    try:
        while frames:
            fd, names, own = frames[-1]
            if not names:
                frames.pop()
                if frames:  # a directory below the top, done with
                    os.close(fd)
                    _attempt(errors, _remove_entry, frames[-1][0], own, directory=True)
                continue
            name = names.pop()
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                _attempt(errors, _remove_entry, fd, name, directory=False)
            elif len(frames) >= _OPEN_DEPTH:
                again = _attempt(errors, _move_up, fd, name, top, moved) or again
            else:
                try:
                    child = _open_child(fd, name)
                except OSError as exc:
                    errors.append(exc)
                    continue
                try:
                    frames.append((child, _names(child), name))
                except OSError as exc:
                    os.close(child)
                    errors.append(exc)
    finally:
        for fd, _left, _own in frames[1:]:
            os.close(fd)
    return again


def _attempt(errors: list[OSError], step: Callable[..., None], *args: Any, **kwargs: Any) -> bool:
    """`step(*args, **kwargs)`; False and its error added to `errors` if it raised one."""
    try:
        step(*args, **kwargs)
    except OSError as exc:
        errors.append(exc)
        return False
    return True


def _names(fd: int) -> list[str]:
    try:
        return os.listdir(fd)
    except PermissionError:
        _open_up(fd)
        return os.listdir(fd)


def _open_child(parent: int, name: str) -> int:
    """The directory `name` of `parent`, opened for reading (not through a link), opened up
    first if its owner may not read it."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(name, flags, dir_fd=parent)
    except PermissionError:
        handle = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            if stat.S_ISDIR(os.fstat(handle).st_mode):
                os.chmod(f"/proc/self/fd/{handle}", 0o700)
        finally:
            os.close(handle)
        return os.open(name, flags, dir_fd=parent)


def _open_up(fd: int) -> None:
    """Make the directory open as `fd` its owner's to list and change."""
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o700)


def _remove_entry(parent: int, name: str, *, directory: bool) -> None:
    """Unlink `name` (rmdir if `directory`) from `parent`, opening `parent` up if its owner
    may not change it."""
    remove = os.rmdir if directory else os.unlink
    try:
        remove(name, dir_fd=parent)
    except PermissionError:
        _open_up(parent)
        remove(name, dir_fd=parent)


def _move_up(parent: int, name: str, top: int, moved: itertools.count[int]) -> None:
    """Move the directory `name` of `parent` into `top` under a name of its own. (Replacing an
    empty directory of that name would lose nothing: all of it is being deleted.)"""
    opened = False
    while True:
        target = f".fanout-deep-{os.getpid()}-{next(moved)}"
        try:
            os.rename(name, target, src_dir_fd=parent, dst_dir_fd=top)
            return
        except PermissionError:
            if opened:
                raise
            _open_up(parent)
            _open_up(top)
            opened = True
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR):
                raise
