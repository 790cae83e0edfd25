"""Git objects stored as loose files by this process, for the quick commits of agents' views.

libgit2 stores an object through its object database: it first looks for a copy (one found is
freshened; none found makes it read the pack directory again and look once more), then writes
a temporary file and links it into place. An agent's commit stores a handful of new objects
(its files, the trees above them, the commit), and that search and linking cost about as much
as the write. `LooseObjects` stores an object the way git does: deflated into a temporary file
in its fan-out directory, renamed over its name (a copy already there holds the same bytes).

Only where that is all git asks: the repository's objects are SHA-1 and not shared with a
group (`core.sharedRepository`, whose file modes git sets); else `loose_objects` gives None
and libgit2 stores them. The trees it writes are those of plain names (`plain_name`); any
other name is left to libgit2's tree builder, which checks names as git does.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import re
import zlib
from collections.abc import Mapping
from pathlib import Path

import pygit2

_TREE = int(pygit2.enums.FileMode.TREE)
_TYPE_BITS = 0o170000
MODES = frozenset(
    int(m)
    for m in (
        pygit2.enums.FileMode.TREE,
        pygit2.enums.FileMode.BLOB,
        pygit2.enums.FileMode.BLOB_EXECUTABLE,
        pygit2.enums.FileMode.LINK,
        pygit2.enums.FileMode.COMMIT,
    )
)
"""The modes `LooseObjects.tree` stores for a changed path."""
_OFF = ("false", "no", "off", "0")
_PLAIN = re.compile(r"[A-Za-z0-9._+=@,-]+")
# (a temporary file's name: this process's, numbered; one left by a killed process of the same
# id is stepped over)
_NAMES = itertools.count()

# git's default level for loose objects (`core.looseCompression`)
DEFAULT_LEVEL = 1
CONFIG_KEYS = (
    "extensions.objectformat",
    "core.sharedrepository",
    "core.fsyncobjectfiles",
    "core.loosecompression",
    "core.compression",
)
"""The configuration `loose_objects` reads: a handle kept for many commits takes a new writer
when any of them changes."""

Change = tuple[str, int] | None
"""A path's new blob id (hex) and mode, or None: deleted."""


def plain_name(name: str) -> bool:
    """Whether `name` is a tree entry's name that libgit2's tree builder takes as it is under
    any setting: ASCII letters, digits and `._-+=@,` only, not `.` or `..`, not starting with
    `.git` in any case, not ending with a dot. (Any other name is left to the tree builder,
    which refuses what git would take for `.git` or a traversal.)"""
    return (
        _PLAIN.fullmatch(name) is not None
        and name not in (".", "..")
        and not name.lower().startswith(".git")
        and not name.endswith(".")
    )


class LooseObjects:
    """Stores objects as loose files under `objects_dir`."""

    def __init__(self, objects_dir: Path, *, level: int = DEFAULT_LEVEL, fsync: bool = False):
        self.objects_dir = str(objects_dir)
        self.level = level
        self.fsync = fsync

    def write(self, kind: bytes, data: bytes, *, unless: pygit2.Oid | None = None) -> pygit2.Oid:
        """Store the object of type `kind` (b"blob", b"tree", b"commit") holding `data`; its
        id. `unless`: an id known stored, not written again when it is this object's."""
        raw = b"%s %d\0%s" % (kind, len(data), data)
        digest = hashlib.sha1(raw).digest()
        oid = pygit2.Oid(raw=digest)
        if unless is not None and oid == unless:
            return oid
        hexed = digest.hex()
        folder = os.path.join(self.objects_dir, hexed[:2])
        compressed = zlib.compress(raw, self.level)
        fd, temporary = self._temporary(folder)
        try:
            try:
                view = memoryview(compressed)
                while view:
                    view = view[os.write(fd, view) :]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temporary, os.path.join(folder, hexed[2:]))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        if self.fsync:
            _sync_dir(folder)
        return oid

    def _temporary(self, folder: str) -> tuple[int, str]:
        """A new temporary file in `folder` (made if missing), open for writing."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        for _ in range(100):
            temporary = os.path.join(folder, f"tmp_obj_fanout_{os.getpid()}_{next(_NAMES)}")
            try:
                return os.open(temporary, flags, 0o444), temporary
            except FileNotFoundError:
                os.makedirs(folder, exist_ok=True)
            except FileExistsError:
                continue
        raise OSError(f"no temporary object file could be made in {folder}")

    def tree(
        self, pyrepo: pygit2.Repository, tree: pygit2.Tree | None, changes: Mapping[str, Change]
    ) -> pygit2.Oid | None:
        """`tree` with `changes` applied, writing only the subtrees they touch, as libgit2's
        tree builder does; None for an empty tree. Each path of `changes` is made of plain
        names (`plain_name`), and each mode is one of `MODES`."""
        entries = _entries(tree.read_raw()) if tree is not None else {}
        direct: dict[str, Change] = {}
        nested: dict[str, dict[str, Change]] = {}
        for rel, change in changes.items():
            head, sep, rest = rel.partition("/")
            if sep:
                nested.setdefault(head, {})[rest] = change
            else:
                direct[head] = change
        for name, change in direct.items():
            key = name.encode("utf-8")
            if change is None:
                if name not in nested:
                    entries.pop(key, None)
            else:
                entries[key] = (change[1], pygit2.Oid(hex=change[0]).raw)
        for name, sub in nested.items():
            if direct.get(name) is not None:
                continue  # a file replaced this directory
            key = name.encode("utf-8")
            subtree: pygit2.Tree | None = None
            held = entries.get(key) if name not in direct else None
            if held is not None and held[0] & _TYPE_BITS == _TREE:
                subtree = pyrepo[pygit2.Oid(raw=held[1])].peel(pygit2.Tree)
            oid = self.tree(pyrepo, subtree, sub)
            if oid is None:
                entries.pop(key, None)
            else:
                entries[key] = (_TREE, oid.raw)
        if not entries:
            return None
        return self.write(b"tree", _serialised(entries))

    def commit(
        self,
        *,
        tree: pygit2.Oid,
        parents: list[pygit2.Oid],
        author: pygit2.Signature,
        committer: pygit2.Signature,
        message: str,
    ) -> pygit2.Oid:
        """Store a commit object as libgit2's `create_commit` writes it."""
        lines = [b"tree " + str(tree).encode("ascii")]
        lines += [b"parent " + str(p).encode("ascii") for p in parents]
        lines.append(b"author " + _signature(author))
        lines.append(b"committer " + _signature(committer))
        return self.write(b"commit", b"\n".join(lines) + b"\n\n" + message.encode("utf-8"))


def loose_objects(pyrepo: pygit2.Repository, objects_dir: Path) -> LooseObjects | None:
    """A writer of `pyrepo`'s objects into `objects_dir` (its object directory), or None where
    libgit2 must store them (see the module's note)."""
    config = pyrepo.config

    def value(key: str) -> str | None:
        try:
            return str(config[key]).strip().lower()
        except KeyError:
            return None

    try:
        object_format = value("extensions.objectformat")
        shared = value("core.sharedrepository")
        fsync = value("core.fsyncobjectfiles")
        level = int(value("core.loosecompression") or value("core.compression") or DEFAULT_LEVEL)
    except (pygit2.GitError, ValueError):
        return None
    if object_format not in (None, "sha1") or shared not in (None, *_OFF, "umask"):
        return None
    if not -1 <= level <= 9:
        return None
    return LooseObjects(objects_dir, level=level, fsync=fsync not in (None, *_OFF))


def _entries(data: bytes) -> dict[bytes, tuple[int, bytes]]:
    """A tree object's entries: name -> (mode, raw id)."""
    out: dict[bytes, tuple[int, bytes]] = {}
    at, end = 0, len(data)
    while at < end:
        space = data.index(b" ", at)
        nul = data.index(b"\0", space)
        out[data[space + 1 : nul]] = (int(data[at:space], 8), data[nul + 1 : nul + 21])
        at = nul + 21
    return out


def _serialised(entries: Mapping[bytes, tuple[int, bytes]]) -> bytes:
    """A tree object's data: its entries in git's order (a subtree's name sorts as if it
    ended with a slash), each mode in octal as libgit2 prints it."""

    def order(name: bytes) -> bytes:
        return name + b"/" if entries[name][0] & _TYPE_BITS == _TREE else name

    return b"".join(
        b"%o %s\0%s" % (entries[name][0], name, entries[name][1])
        for name in sorted(entries, key=order)
    )


def _signature(sig: pygit2.Signature) -> bytes:
    offset = sig.offset
    sign = "-" if offset < 0 else "+"
    hours, minutes = divmod(abs(offset), 60)
    return (
        sig.raw_name
        + b" <"
        + sig.raw_email
        + b"> "
        + f"{sig.time} {sign}{hours:02d}{minutes:02d}".encode("ascii")
    )


def _sync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
