"""A git tree with some of its paths changed, rebuilding only the subtrees they touch: how a
view's commit makes its tree from the base's, and how the join writes a merge's result."""

from __future__ import annotations

from dataclasses import dataclass

import pygit2

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
    builder: pygit2.TreeBuilder
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
        builder = pyrepo.TreeBuilder(tree) if tree is not None else pyrepo.TreeBuilder()
        here: dict[str, TreeEdit] = {}
        below: dict[str, dict[str, TreeEdit]] = {}
        for path, edit in edits.items():
            head, sep, rest = path.partition("/")
            if sep:
                below.setdefault(head, {})[rest] = edit
            else:
                here[head] = edit
        for entry_name, edit in here.items():
            if edit is None and _entry(builder, entry_name) is not None:
                builder.remove(entry_name)
        return cls(name, had_tree, builder, here, list(below.items()))


def _entry(builder: pygit2.TreeBuilder, name: str) -> pygit2.Object | None:
    found: pygit2.Object | None = builder.get(name)  # None when absent (the stub omits it)
    return found


def is_tree(obj: pygit2.Object) -> bool:
    """Whether `obj` (a tree's entry) is a tree."""
    return obj.type == pygit2.enums.ObjectType.TREE
