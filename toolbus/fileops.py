"""Jailed, scoped and fenced file operations: read, write, edit, list and search.

Every path goes through the `Jail` (escape checks, `O_NOFOLLOW` opens relative to a directory
fd); writes also need the `WriteScope` to allow the resolved path and the `Fence` to pass, and are
atomic (temp file in the same directory, fsync, `os.replace`).

Ignored files: `list_files` and `search` see what `git ls-files --cached --others
--exclude-standard` reports in the worktree (git's own `.gitignore` semantics, including nested
ignore files and `info/exclude`), git pinned to the git dir the server gives; without one, or
when git fails (as when it would wait on a named pipe where it reads rules), they fall back to a
walk that skips only `.git`. Symlinked files are listed but not searched.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import regex
from pydantic import BaseModel, ConfigDict

from toolbus import gitcmd
from toolbus.errors import (
    BinaryFile,
    FileNotFound,
    FileTooLarge,
    InvalidArguments,
    MultipleMatches,
    NoMatch,
    NotAFile,
    OutOfScope,
    PathEscape,
)
from toolbus.jail import Jail, describe_kind, os_error, split_parent
from toolbus.resources import WriteScope, is_within
from toolbus.trees import walk

BINARY_SNIFF_BYTES = 8192
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

QUICK_FILE_BYTES = 256 * 1024
"""The largest file a `quick` call reads or writes (see `NotQuick`)."""


class NotQuick(Exception):
    """A `quick` call found more than `QUICK_FILE_BYTES` to read or write: it changed nothing,
    and the caller makes the call again, not quick, in a worker thread."""


class Fence(Protocol):
    """The write guard of a lease holder (re-exported by `toolbus.bus`).

    `check(path)` raises `LeaseLost` unless the holder still holds a live lease covering `path`
    (`None` for a command, which may write anywhere in the workspace). The bus calls it in the
    event loop's thread, unless the fence has a `thread_safe` attribute that is `True`.
    """

    @property
    def token(self) -> int | None: ...

    def check(self, path: str | None) -> None: ...


@dataclass(frozen=True)
class FileLimits:
    """Size and count caps of the file tools."""

    max_read_bytes: int = 2 * 1024 * 1024
    max_write_bytes: int = 5 * 1024 * 1024
    default_read_lines: int = 2000
    max_page_chars: int = 100_000
    max_line_chars: int = 2000
    max_list_entries: int = 1000
    max_search_matches: int = 200
    max_search_line_chars: int = 300
    max_search_file_bytes: int = 2 * 1024 * 1024
    search_time_budget_s: float = 20.0


class _Result(BaseModel):
    model_config = ConfigDict(frozen=True)


class ReadResult(_Result):
    path: str
    text: str
    """Line-numbered text of the page (`<number>\\t<line>`)."""
    start_line: int
    end_line: int
    total_lines: int
    truncated: bool
    next_offset: int | None
    size_bytes: int


_R = TypeVar("_R", bound=_Result)


class WriteResult(_Result):
    path: str
    bytes_written: int
    created: bool
    previous_bytes: int | None


class EditResult(_Result):
    path: str
    replacements: int
    bytes_written: int
    previous_bytes: int


class ListResult(_Result):
    path: str
    pattern: str | None
    entries: list[str]
    """Recursive file paths with a pattern; otherwise direct children (directories end in `/`)."""
    total: int
    truncated: bool


class SearchMatch(_Result):
    path: str
    line: int
    text: str


class SearchResult(_Result):
    pattern: str
    matches: list[SearchMatch]
    total_matches: int
    """Matching lines counted over all searched files (even beyond the shown cap)."""
    files_with_matches: int
    files_searched: int
    truncated: bool
    stopped_early: bool
    """The time budget ran out before every file was searched."""


# An agent's regex or glob may backtrack for ever (`^(a+)+$`, `**a**a**a**b`): they are run
# by the `regex` module, which gives up past a timeout and lets go of the GIL meanwhile.
GLOB_TIME_BUDGET_S = 2.0
"""What matching one `list_files` or `search` glob against every path may take."""


def glob_regex(pattern: str) -> regex.Pattern[str]:
    """A gitignore-flavoured glob: `*` and `?` stay inside a component, `**` crosses them."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            end = pattern.find("]", i + 2)
            if end == -1:
                out.append(re.escape(c))
                i += 1
            else:
                body = pattern[i + 1 : end]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    try:
        return regex.compile("".join(out) + r"\Z")
    except regex.error as exc:
        raise InvalidArguments(f"invalid glob {pattern!r}: {exc}") from None


class _GlobFilter:
    """Matches a repository path against a glob, relative to `base` or to the root.

    A pattern without `/` matches the file name (as in `.gitignore`).
    """

    def __init__(self, pattern: str, base: str) -> None:
        self.regex = glob_regex(pattern)
        self.pattern = pattern
        self.basename_only = "/" not in pattern
        self.base = base
        self.deadline = time.monotonic() + GLOB_TIME_BUDGET_S

    def __call__(self, path: str) -> bool:
        if self.basename_only:
            return self._match(path.rpartition("/")[2])
        if self._match(path):
            return True
        if self.base and is_within(path, self.base) and path != self.base:
            return self._match(path[len(self.base) + 1 :])
        return False

    def _match(self, text: str) -> bool:
        left = self.deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            return self.regex.match(text, timeout=left, concurrent=True) is not None
        except TimeoutError:
            raise InvalidArguments(
                f"the glob {self.pattern!r} took over {GLOB_TIME_BUDGET_S:g} s to match the "
                "paths; use fewer `**` and `*` in a row"
            ) from None


class FileOps:
    """The file tools of one agent: inside `jail`, writes within `scope` and fenced."""

    def __init__(
        self,
        jail: Jail,
        scope: WriteScope,
        fence: Fence,
        limits: FileLimits | None = None,
        git_dir: Path | Callable[[], Path | None] | None = None,
    ) -> None:
        self.jail = jail
        self.scope = scope
        self.fence = fence
        self.limits = limits or FileLimits()
        self._git_dir = git_dir
        """The workspace's git dir as the server recorded it; `None`: not a git work tree; a
        function: what makes it when a listing first needs it (None: it could not)."""

    def git_dir(self) -> Path | None:
        """The workspace's git dir (made by the first call, when it is made on demand)."""
        if callable(self._git_dir):
            self._git_dir = self._git_dir()
        return self._git_dir

    # ---- reads -------------------------------------------------------------------------------

    def _read_bytes(
        self, rel: str, shown: str, cap: int, *, quick: bool = False
    ) -> tuple[bytes, int]:
        """The bytes of the regular file at real path `rel` (size-capped) and its mode. `quick`:
        `NotQuick` if it is over `QUICK_FILE_BYTES`."""
        if not rel:
            raise NotAFile("the workspace root is a directory; use list_files to see its entries")
        parent, name = split_parent(rel)
        dfd = self.jail.open_dir(parent)
        try:
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except OSError as exc:
                raise os_error(exc, shown) from None
            self._require_regular(st.st_mode, shown)
            if quick and st.st_size > QUICK_FILE_BYTES:
                raise NotQuick(shown)
            if st.st_size > cap:
                raise FileTooLarge(
                    f"{shown!r} is {st.st_size} bytes, over the {cap}-byte cap; use search to "
                    "find the relevant lines, or run_command with head/sed to read a part"
                )
            try:
                fd = os.open(name, _FILE_FLAGS, dir_fd=dfd)
            except OSError as exc:
                raise os_error(exc, shown) from None
            try:
                st = os.fstat(fd)
                self._require_regular(st.st_mode, shown)
                data = _read_fd(fd, min(cap, QUICK_FILE_BYTES if quick else cap) + 1)
            finally:
                os.close(fd)
        finally:
            os.close(dfd)
        if quick and len(data) > QUICK_FILE_BYTES:
            raise NotQuick(shown)  # it grew after the check
        if len(data) > cap:
            raise FileTooLarge(f"{shown!r} grew over the {cap}-byte cap while being read")
        return data, st.st_mode

    @staticmethod
    def _require_regular(mode: int, shown: str) -> None:
        if stat.S_ISREG(mode):
            return
        if stat.S_ISDIR(mode):
            raise NotAFile(f"{shown!r} is a directory; use list_files to see its entries")
        raise NotAFile(f"{shown!r} is {describe_kind(mode)}; only regular files can be used")

    @staticmethod
    def _decode(data: bytes, shown: str) -> str:
        if b"\x00" in data[:BINARY_SNIFF_BYTES]:
            raise BinaryFile(f"{shown!r} is a binary file (NUL bytes); it cannot be read as text")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise BinaryFile(
                f"{shown!r} is not valid UTF-8 text; it cannot be read as text"
            ) from None

    def read(
        self,
        path: str,
        offset: int | None = None,
        limit: int | None = None,
        *,
        quick: bool = False,
    ) -> ReadResult:
        """A page of a text file, line-numbered; `offset` is the 1-based first line. `quick`:
        `NotQuick` for a file over `QUICK_FILE_BYTES`."""
        rel = self.jail.resolve(path)
        data, _ = self._read_bytes(rel, path, self.limits.max_read_bytes, quick=quick)
        text = self._decode(data, path)
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        total = len(lines)
        start = max(1, offset or 1)
        want = limit or self.limits.default_read_lines
        out: list[str] = []
        chars = 0
        end = start - 1
        for number in range(start, min(total, start - 1 + want) + 1):
            line = lines[number - 1].rstrip("\r")
            if len(line) > self.limits.max_line_chars:
                line = (
                    line[: self.limits.max_line_chars]
                    + f"… [line truncated, {len(line)} chars in all]"
                )
            entry = f"{number:>6}\t{line}"
            if out and chars + len(entry) + 1 > self.limits.max_page_chars:
                break
            out.append(entry)
            chars += len(entry) + 1
            end = number
        truncated = end < total
        return ReadResult(
            path=rel,
            text="\n".join(out),
            start_line=start,
            end_line=end,
            total_lines=total,
            truncated=truncated,
            next_offset=end + 1 if truncated else None,
            size_bytes=len(data),
        )

    # ---- writes ------------------------------------------------------------------------------

    def _writable(self, path: str) -> str:
        rel = self.jail.resolve(path)
        if not rel:
            raise NotAFile("the workspace root is a directory; give a file path")
        if not self.scope.allows(rel):
            via = f" (it resolves to {rel!r})" if rel != self.jail.check(path) else ""
            raise OutOfScope(
                f"{path!r}{via} is outside your write scope ({self.scope.describe()}); "
                "write only there, or report the needed change in your summary"
            )
        return rel

    def write(self, path: str, content: str) -> WriteResult:
        """Create or replace a text file atomically (parents created, mode kept)."""
        return _done(self.begin_write(path, content), WriteResult)

    def begin_write(self, path: str, content: str, *, quick: bool = False) -> PendingWrite:
        """`write` up to its durability: checked, fenced, the new content in a temporary file
        beside the target. `quick`: `NotQuick` for content over `QUICK_FILE_BYTES`."""
        data = content.encode("utf-8", "surrogatepass")
        if quick and len(data) > QUICK_FILE_BYTES:
            raise NotQuick(path)
        if len(data) > self.limits.max_write_bytes:
            raise FileTooLarge(
                f"content is {len(data)} bytes, over the {self.limits.max_write_bytes}-byte "
                "write cap; split the file"
            )
        rel = self._writable(path)
        self.fence.check(rel)
        pending = self._begin_atomic_write(rel, path, data)
        pending.result = WriteResult(
            path=rel,
            bytes_written=len(data),
            created=pending.previous is None,
            previous_bytes=pending.previous,
        )
        return pending

    def edit(self, path: str, old: str, new: str, replace_all: bool = False) -> EditResult:
        """Replace the exact text `old` by `new` (once, unless `replace_all`)."""
        return _done(self.begin_edit(path, old, new, replace_all), EditResult)

    def begin_edit(
        self, path: str, old: str, new: str, replace_all: bool = False, *, quick: bool = False
    ) -> PendingWrite:
        """`edit` up to its durability, as `begin_write`. `quick`: `NotQuick` when the file
        or its edited text is over `QUICK_FILE_BYTES`."""
        if old == "":
            raise InvalidArguments("old must not be empty; use write_file to create a file")
        if old == new:
            raise InvalidArguments("old and new are identical; nothing would change")
        rel = self._writable(path)
        data, _ = self._read_bytes(rel, path, self.limits.max_write_bytes, quick=quick)
        text = self._decode(data, path)
        count = text.count(old)
        if count == 0:
            raise NoMatch(
                f"the text to replace does not occur in {path!r}; read the file and copy the "
                "exact text, including whitespace and indentation"
            )
        if count > 1 and not replace_all:
            raise MultipleMatches(
                f"the text to replace occurs {count} times in {path!r}; include more surrounding "
                "context to make it unique, or set replace_all to replace every occurrence"
            )
        updated = text.replace(old, new).encode("utf-8", "surrogatepass")
        if quick and len(updated) > QUICK_FILE_BYTES:
            raise NotQuick(path)
        if len(updated) > self.limits.max_write_bytes:
            raise FileTooLarge(
                f"the edited file would be {len(updated)} bytes, over the "
                f"{self.limits.max_write_bytes}-byte write cap"
            )
        self.fence.check(rel)
        pending = self._begin_atomic_write(rel, path, updated)
        pending.result = EditResult(
            path=rel, replacements=count, bytes_written=len(updated), previous_bytes=len(data)
        )
        return pending

    def _begin_atomic_write(self, rel: str, shown: str, data: bytes) -> PendingWrite:
        """`data` in a new temporary file in the directory of `rel` (made if missing), after
        the checks on the file it will replace; `PendingWrite.sync` puts it in place."""
        parent, name = split_parent(rel)
        dfd = self.jail.open_dir(parent, create=True)
        # (at most 200 bytes of the name: the temporary name must fit where the name fits)
        short = name.encode("utf-8", "surrogateescape")[:200].decode("utf-8", "surrogateescape")
        tmp = f".{short}.fanout-{os.getpid()}-{time.monotonic_ns()}.tmp"
        fd: int | None = None
        try:
            try:
                st: os.stat_result | None = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None:
                if stat.S_ISLNK(st.st_mode):
                    raise PathEscape(f"{shown!r} became a symlink while in use; retry")
                self._require_regular(st.st_mode, shown)
                if st.st_nlink > 1:
                    raise PathEscape(
                        f"{shown!r} has {st.st_nlink} hard links (it may alias a file outside "
                        "the workspace); writes to hard-linked files are refused"
                    )
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o666, dir_fd=dfd,
            )  # fmt: skip
            if st is not None:
                os.fchmod(fd, stat.S_IMODE(st.st_mode))
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            return PendingWrite(
                dfd, fd, tmp, name, shown, previous=None if st is None else st.st_size
            )
        except BaseException as exc:
            _discard(dfd, fd, None if fd is None else tmp)
            if isinstance(exc, OSError):
                raise os_error(exc, shown) from None
            raise

    # ---- listing and search ------------------------------------------------------------------

    def _tree(self, base: str) -> list[str]:
        """Non-ignored files (real relative paths, sorted) at or under `base`."""
        files = _git_files(self.jail.root, self.git_dir(), base)
        if files is None:
            files = _walk_files(self.jail.root, base)
        root = str(self.jail.root)
        kept: list[str] = []
        for f in files:
            if any(p.casefold() == ".git" for p in f.split("/")):
                continue
            try:
                os.lstat(os.path.join(root, f))
            except OSError:
                continue  # in the index but deleted from the worktree
            kept.append(f)
        return kept

    def _base(self, path: str) -> str:
        rel = self.jail.resolve(path)
        if rel and not os.path.lexists(os.path.join(self.jail.root, rel)):
            raise FileNotFound(f"{path!r} does not exist")
        return rel

    def list(self, path: str = "", pattern: str | None = None) -> ListResult:
        """Files under `path` matching `pattern` (recursive), or its direct children."""
        base = self._base(path)
        files = [f for f in self._tree(base) if is_within(f, base)]
        if pattern:
            match = _GlobFilter(pattern, base)
            entries = [f for f in files if match(f)]
        else:
            children: set[str] = set()
            for f in files:
                rest = f[len(base) + 1 :] if base else f
                head, sep, _ = rest.partition("/")
                if not rest:
                    children.add(f)
                else:
                    children.add((f"{base}/{head}" if base else head) + ("/" if sep else ""))
            entries = sorted(children)
        cap = self.limits.max_list_entries
        return ListResult(
            path=base,
            pattern=pattern,
            entries=entries[:cap],
            total=len(entries),
            truncated=len(entries) > cap,
        )

    def search(self, pattern: str, path: str = "", glob: str | None = None) -> SearchResult:
        """Lines matching the regex `pattern` in the text files under `path` (and `glob`)."""
        try:
            compiled = regex.compile(pattern, regex.MULTILINE)
        except (regex.error, ValueError) as exc:
            raise InvalidArguments(f"invalid regular expression {pattern!r}: {exc}") from None
        base = self._base(path)
        files = [f for f in self._tree(base) if is_within(f, base)]
        if glob:
            match = _GlobFilter(glob, base)
            files = [f for f in files if match(f)]
        limits = self.limits
        deadline = time.monotonic() + limits.search_time_budget_s
        matches: list[SearchMatch] = []
        total = files_with = searched = 0
        stopped = False
        by_dir: dict[str, list[str]] = {}
        for f in files:
            parent, name = split_parent(f)
            by_dir.setdefault(parent, []).append(name)
        for parent, names in by_dir.items():
            if stopped:
                break
            try:
                dfd = self.jail.open_dir(parent)
            except (PathEscape, NotAFile, FileNotFound, OSError):
                continue
            try:
                for name in names:
                    if time.monotonic() > deadline:
                        stopped = True
                        break
                    text = _read_text(dfd, name, limits.max_search_file_bytes)
                    if text is None:
                        continue
                    searched += 1
                    shown = f"{parent}/{name}" if parent else name
                    try:
                        hits = _matching_lines(compiled, text, deadline - time.monotonic())
                    except TimeoutError:
                        stopped = True
                        break
                    if not hits:
                        continue
                    files_with += 1
                    total += len(hits)
                    for number, line in hits:
                        if len(matches) >= limits.max_search_matches:
                            break
                        cut = line[: limits.max_search_line_chars]
                        text_shown = cut + "…" if len(line) > len(cut) else cut
                        matches.append(SearchMatch(path=shown, line=number, text=text_shown))
            finally:
                os.close(dfd)
        return SearchResult(
            pattern=pattern,
            matches=matches,
            total_matches=total,
            files_with_matches=files_with,
            files_searched=searched,
            truncated=total > len(matches),
            stopped_early=stopped,
        )


def _read_fd(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(fd, min(1024 * 1024, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def read_regular_file(
    name: str | os.PathLike[str], cap: int, dfd: int | None = None
) -> bytes | None:
    """The bytes of the regular file `name` (relative to the directory `dfd`, if given), opened
    without following a link or waiting on a pipe; None for anything else: a link, a pipe, a
    file of more than `cap` bytes (also one that grew past it while read), one that vanished or
    cannot be read."""
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dfd)
    except OSError:
        return None  # symlink (O_NOFOLLOW), vanished, unreadable
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > cap:
            return None
        data = _read_fd(fd, cap + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) <= cap else None


def _read_text(dfd: int, name: str, cap: int) -> str | None:
    """The text of a regular, non-binary file in `dfd`, or `None` to skip it."""
    data = read_regular_file(name, cap, dfd)
    if data is None or b"\x00" in data[:BINARY_SNIFF_BYTES]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _matching_lines(
    compiled: regex.Pattern[str], text: str, timeout_s: float
) -> list[tuple[int, str]]:
    """The lines of `text` where `compiled` matches; TimeoutError past `timeout_s`."""
    if timeout_s <= 0:
        raise TimeoutError
    hits: list[tuple[int, str]] = []
    line_no = 1
    scanned = 0
    last_line = 0
    for m in compiled.finditer(text, timeout=timeout_s, concurrent=True):
        start = m.start()
        line_no += text.count("\n", scanned, start)
        scanned = start
        if line_no == last_line:
            continue
        last_line = line_no
        line_start = text.rfind("\n", 0, start) + 1
        line_end = text.find("\n", start)
        if line_end == -1:
            line_end = len(text)
        if line_start == len(text):
            continue  # a zero-width match at the very end (after the last newline)
        hits.append((line_no, text[line_start:line_end].rstrip("\r")))
    return hits


def _git_files(root: Path, git_dir: Path | None, base: str) -> list[str] | None:
    """Non-ignored files from git, or `None` when `root` is not a git work tree. Git runs pinned
    to the git dir the server recorded: the workspace's own `.git` is the agent's to write."""
    if git_dir is None or not git_dir.is_dir():
        return None
    command = ["--literal-pathspecs", "-c", "core.quotepath=off", "ls-files", "-z"]
    command += ["--cached", "--others", "--exclude-standard"]
    if base:
        command += ["--", base]
    try:
        done = gitcmd.run_bytes(root, command, pinned=gitcmd.Pinned(git_dir, root), timeout=60)
    except (OSError, subprocess.TimeoutExpired, gitcmd.GitNotFound):
        return None
    if done.returncode != 0:
        return None
    names = {n for n in done.stdout.decode("utf-8", "surrogateescape").split("\0") if n}
    return sorted(names)


def _walk_files(root: Path, base: str) -> list[str]:
    found: list[str] = []
    start = os.path.join(root, base) if base else str(root)
    if not os.path.isdir(start) or os.path.islink(start):
        return [base] if base and os.path.lexists(start) else []
    for dirpath, dirnames, filenames in walk(start):
        dirnames[:] = sorted(d for d in dirnames if d.casefold() != ".git")
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        for f in filenames:
            found.append(f if rel_dir == "." else f"{rel_dir}/{f}")
    return sorted(found)


_PARTIAL_WRITE = re.compile(r"^\..+\.fanout-\d+-\d+\.tmp$")


def remove_partial_writes(root: Path) -> list[str]:
    """Delete the temporary files of atomic writes that a killed process never renamed into
    place (the file they were replacing is intact), so they are never committed as work."""
    removed: list[str] = []
    for dirpath, dirnames, filenames in walk(root):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in filenames:
            if _PARTIAL_WRITE.match(name):
                path = Path(dirpath, name)
                path.unlink(missing_ok=True)
                removed.append(path.relative_to(root).as_posix())
    return sorted(removed)


@dataclass(eq=False)
class PendingWrite:
    """A write or edit made up to its durability (`FileOps.begin_write`): its content is in a
    temporary file beside the target. `sync` (which waits for the disk: a worker thread's
    part) makes it durable and puts it in place; `close`, which must follow in any case, lets
    go of the descriptors and removes the temporary file if it was not put in place."""

    dfd: int
    fd: int | None
    tmp: str
    name: str
    shown: str
    previous: int | None
    """The size of the file it replaces, None when it makes a new one."""
    result: WriteResult | EditResult | None = None
    _placed: bool = False

    def sync(self) -> None:
        """`fsync` the content, rename it over the target, `fsync` the directory."""
        if self.fd is None:
            raise RuntimeError("the pending write was closed before it was synced")
        try:
            os.fsync(self.fd)
            os.replace(self.tmp, self.name, src_dir_fd=self.dfd, dst_dir_fd=self.dfd)
            self._placed = True
            os.fsync(self.dfd)
        except OSError as exc:
            raise os_error(exc, self.shown) from None

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            _discard(self.dfd, fd, None if self._placed else self.tmp)

    def finish(self) -> WriteResult | EditResult:
        """`sync` and `close` in this thread: the result, once durable and in place."""
        try:
            self.sync()
        finally:
            self.close()
        if self.result is None:
            raise RuntimeError("a pending write without its result")
        return self.result


def _discard(dfd: int, fd: int | None, tmp: str | None) -> None:
    """Close the descriptors of a write; remove its temporary file `tmp` (None: none left)."""
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
    if tmp is not None:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
    os.close(dfd)


def _done(pending: PendingWrite, kind: type[_R]) -> _R:
    """`pending.finish()`, its result checked to be of `kind`."""
    result = pending.finish()
    if not isinstance(result, kind):
        raise TypeError(f"a pending write carries {type(result).__name__}")
    return result
