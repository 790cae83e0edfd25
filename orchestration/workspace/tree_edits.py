"""A git tree with some of its paths changed, rebuilding only the subtrees they touch: how a
view's commit makes its tree from the base's, and how the join writes a merge's result."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pygit2

from orchestration.contracts import is_utf8

TreeEdit = tuple[pygit2.Oid, int] | None
"""A path's new blob (or link, or gitlink) and file mode, or None to delete it."""


def edit_tree(
    pyrepo: pygit2.Repository, tree: pygit2.Tree | None, edits: dict[str, TreeEdit]
) -> pygit2.Oid | None:
    """`tree` with `edits` applied; None when the result is empty. In each directory the
    deletions come first and the other edits last, so that a file may replace a directory and
    a directory a file. Without recursion: an agent's directories may nest thousands deep."""
    stack = [_Frame.start(pyrepo, tree, edits, "", had_tree=False)]
    while True:
        frame = stack[-1]
        if frame.below:
            name, sub = frame.below.pop()
            current = _entry(frame.builder, name)
            subtree = (
                current.peel(pygit2.Tree) if current is not None and is_tree(current) else None
            )
            stack.append(_Frame.start(pyrepo, subtree, sub, name, had_tree=subtree is not None))
            continue
        stack.pop()
        for name, edit in frame.here.items():
            if edit is not None:
                frame.builder.insert(name, edit[0], edit[1])
        new_id = frame.builder.write() if len(frame.builder) else None
        if not stack:
            return new_id
        above = stack[-1].builder
        if new_id is not None:
            above.insert(frame.name, new_id, pygit2.enums.FileMode.TREE)
        elif frame.had_tree:
            above.remove(frame.name)


@dataclass
class _Frame:
    """One directory of `edit_tree`: its builder with its own deletions made, its own other
    edits (made last), and the subdirectories with edits still to rewrite."""

    name: str
    had_tree: bool
    builder: pygit2.TreeBuilder | _NamedInBytes
    here: dict[str, TreeEdit]
    below: list[tuple[str, dict[str, TreeEdit]]]

    @classmethod
    def start(
        cls,
        pyrepo: pygit2.Repository,
        tree: pygit2.Tree | None,
        edits: dict[str, TreeEdit],
        name: str,
        *,
        had_tree: bool,
    ) -> _Frame:
        here: dict[str, TreeEdit] = {}
        below: dict[str, dict[str, TreeEdit]] = {}
        for path, edit in edits.items():
            head, sep, rest = path.partition("/")
            if sep:
                below.setdefault(head, {})[rest] = edit
            else:
                here[head] = edit
        added = [n for n, edit in here.items() if edit is not None] + list(below)
        builder: pygit2.TreeBuilder | _NamedInBytes
        if all(is_utf8(n) for n in added):
            builder = pyrepo.TreeBuilder(tree) if tree is not None else pyrepo.TreeBuilder()
        else:
            builder = _NamedInBytes(pyrepo, tree)
        for entry_name, edit in here.items():
            if edit is None and _has(builder, entry_name):
                builder.remove(entry_name)
        return cls(name, had_tree, builder, here, list(below.items()))


def _entry(builder: pygit2.TreeBuilder | _NamedInBytes, name: str) -> pygit2.Object | None:
    found: pygit2.Object | None = builder.get(name)  # None when absent (the stub omits it)
    return found


def _has(builder: pygit2.TreeBuilder | _NamedInBytes, name: str) -> bool:
    if isinstance(builder, _NamedInBytes):
        return name in builder
    return _entry(builder, name) is not None


class _NamedInBytes:
    """A directory's entries where one of the names to add is not UTF-8, which libgit2's tree
    builder refuses: its entries by their names' bytes (`os.fsencode`), written as git writes
    a tree. Git takes such names (`git add` stores them byte for byte), and so does the join."""

    def __init__(self, pyrepo: pygit2.Repository, tree: pygit2.Tree | None) -> None:
        self._pyrepo = pyrepo
        self._entries: dict[bytes, tuple[int, pygit2.Oid]] = {}
        for entry in tree if tree is not None else ():
            raw = entry.raw_name
            if raw is None:
                raise ValueError(f"an entry of the tree {tree.id if tree else ''} has no name")
            self._entries[raw] = (int(entry.filemode), entry.id)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: str) -> bool:
        return os.fsencode(name) in self._entries

    def get(self, name: str) -> pygit2.Object | None:
        found = self._entries.get(os.fsencode(name))
        if found is None:
            return None
        if found[0] == pygit2.enums.FileMode.TREE:
            return self._pyrepo[found[1]]
        return self._pyrepo.get(found[1])  # (a gitlink's commit is not in this repository)

    def remove(self, name: str) -> None:
        del self._entries[os.fsencode(name)]

    def insert(self, name: str, oid: pygit2.Oid, mode: int) -> None:
        if is_utf8(name):
            # libgit2's own checks of the name (`.git` and its other spellings) and the object
            self._pyrepo.TreeBuilder().insert(name, oid, mode)
        else:
            # (a name with a byte that is not UTF-8 spells no `.git`, here or on NTFS or HFS+)
            raw = os.fsencode(name)
            if raw in (b".", b"..") or b"/" in raw or b"\0" in raw:
                raise ValueError(f"{name!r} cannot name a tree's entry")
            if mode != pygit2.enums.FileMode.COMMIT and oid not in self._pyrepo.odb:
                raise ValueError(f"the object {oid} of {name!r} is not in the repository")
        self._entries[os.fsencode(name)] = (int(mode), oid)

    def write(self) -> pygit2.Oid:
        """The tree written to the object store: its entries in git's order (by their bytes, a
        directory's name as if it ended in `/`), each `<octal mode> <name>\\0<20-byte id>`."""

        def order(item: tuple[bytes, tuple[int, pygit2.Oid]]) -> bytes:
            name, (mode, _) = item
            return name + b"/" if mode == pygit2.enums.FileMode.TREE else name

        data = b"".join(
            b"%o %s\0%s" % (mode, name, oid.raw)
            for name, (mode, oid) in sorted(self._entries.items(), key=order)
        )
        return self._pyrepo.odb.write(pygit2.enums.ObjectType.TREE, data)


def is_tree(obj: pygit2.Object) -> bool:
    """Whether `obj` (a tree's entry) is a tree."""
    return obj.type == pygit2.enums.ObjectType.TREE
