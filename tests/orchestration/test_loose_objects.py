"""The objects of a view's quick commit are stored by this process (`workspace.loose`) where
git allows it: they must be the very objects libgit2 would store, byte for byte, and a write
cut short must leave nothing behind."""

from __future__ import annotations

import os
from pathlib import Path

import pygit2
import pytest

from orchestration.workspace import GitRepo, layer_of, loose
from orchestration.workspace.layered import (
    _apply,  # pyright: ignore[reportPrivateUsage]
    _storable,  # pyright: ignore[reportPrivateUsage]
)
from orchestration.workspace.loose import LooseObjects, loose_objects, plain_name
from tests.orchestration.gitutil import (
    git,
    isolated_git,  # pyright: ignore[reportUnusedImport]  # noqa: F401  (autouse fixture)
    make_repo,
    needs_views,
    write,
)
from tests.orchestration.test_quick_workspace_ops import (
    _commit,  # pyright: ignore[reportPrivateUsage]
    _view,  # pyright: ignore[reportPrivateUsage]
    kernel_overlay,  # pyright: ignore[reportUnusedImport]  # noqa: F401  (autouse fixture)
)

BASE = {
    "a.txt": "a\n",
    "a-b": "dash\n",
    "a.b/c": "dot dir\n",
    "a/b.txt": "slash\n",
    "a0": "zero\n",
    "dir/keep.txt": "keep\n",
    "dir/sub/deep.txt": "deep\n",
    "gone/only.txt": "only\n",
    "run.sh": "#!/bin/sh\n",
    "src/keep.py": "k = 1\n",
}
_BLOB, _EXEC, _LINK, _GITLINK = 0o100644, 0o100755, 0o120000, 0o160000


def _writer(pyrepo: pygit2.Repository) -> LooseObjects:
    made = loose_objects(pyrepo, Path(pyrepo.path) / "objects")
    assert made is not None
    return made


def _loose_files(root: Path) -> set[str]:
    objects = root / ".git/objects"
    return {
        f"{d.name}/{f.name}" for d in objects.iterdir() if len(d.name) == 2 for f in d.iterdir()
    }


def test_the_objects_are_the_ones_libgit2_stores(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r", BASE)
    pyrepo = GitRepo(root).open()
    try:
        objects = _writer(pyrepo)
        base = pyrepo.head.peel(pygit2.Commit)
        blobs = [b"", b"x\n", bytes(range(256)) * 40]
        ids = [objects.write(b"blob", data) for data in blobs]
        assert ids == [pyrepo.create_blob(data) for data in blobs]
        new, other = str(ids[1]), str(ids[2])
        cases: dict[str, dict[str, tuple[str, int] | None]] = {
            "added in order": {"a.c": (new, _BLOB), "a/c.txt": (new, _BLOB), "a+": (new, _BLOB)},
            "modes": {"run.sh": (new, _BLOB), "x": (new, _EXEC), "l": (new, _LINK)},
            "gitlink": {"dir/mod": (str(base.id), _GITLINK)},
            "deleted to nothing": {"gone/only.txt": None, "dir/sub/deep.txt": None},
            "dir to file": {"a.b": (other, _BLOB), "a.b/c": None},
            "file to dir": {"a0": None, "a0/in.txt": (new, _BLOB)},
            "deep new": {"n/e/s/t/e/d.txt": (other, _BLOB)},
        }
        everything = {p: c for changes in cases.values() for p, c in changes.items()}
        cases["all but two"] = {p: None for p in BASE if p not in ("a.txt", "src/keep.py")}
        cases["everything deleted"] = {p: None for p in BASE}
        for case, changes in cases.items():
            assert _storable(changes), case
            got = objects.tree(pyrepo, base.tree, changes)
            assert got == _apply(pyrepo, base.tree, changes), case
        assert objects.tree(pyrepo, base.tree, cases["everything deleted"]) is None
        assert objects.tree(pyrepo, None, {"only": (new, _BLOB)}) == _apply(
            pyrepo, None, {"only": (new, _BLOB)}
        )
        tree = objects.tree(pyrepo, base.tree, {k: v for k, v in everything.items() if v})
        assert tree is not None
        for offset in (0, 330, -420):
            author = pygit2.Signature("Ana Ñ", "ana@example.org", 1700000000, offset)
            committer = pygit2.Signature("fanout", "fanout@localhost", 1700000123, -offset)
            message = "work: ünïcode\n\nbody\n"
            want = pyrepo.create_commit(None, author, committer, message, tree, [base.id])
            got = objects.commit(
                tree=tree, parents=[base.id], author=author, committer=committer, message=message
            )
            assert got == want
    finally:
        pyrepo.free()
    git(root, "fsck", "--strict", "--no-dangling")
    assert not any("tmp_obj" in name for name in _loose_files(root))


def test_a_name_libgit2_may_refuse_is_left_to_its_tree_builder() -> None:
    for name in ("a.py", ".env", "node_modules", "x-1_2+3=4@5,6", ".gitx-not", "a.b.c"):
        assert plain_name(name) == (not name.startswith(".git")), name
    for name in ("", ".", "..", ".git", ".GIT", ".gitmodules", "git~1", "end.", "a b", "a:b"):
        assert not plain_name(name), name
    for name in ("ü.txt", "a\\b", "new\nline", ".g\u200cit", "tab\t"):
        assert not plain_name(name), name
    assert _storable({"src/a.py": ("0" * 40, _BLOB), "gone": None})
    assert not _storable({"src/.git/x": ("0" * 40, _BLOB)})
    assert not _storable({"src/ü.py": ("0" * 40, _BLOB)})
    assert not _storable({"odd": ("0" * 40, 0o100664)})


def test_git_decides_where_this_process_may_store_objects(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r", {"x": "x\n"})

    def made() -> LooseObjects | None:
        pyrepo = GitRepo(root).open()
        try:
            return loose_objects(pyrepo, root / ".git/objects")
        finally:
            pyrepo.free()

    plain = made()
    assert plain is not None and (plain.level, plain.fsync) == (loose.DEFAULT_LEVEL, False)
    git(root, "config", "core.looseCompression", "9")
    git(root, "config", "core.fsyncObjectFiles", "true")
    tuned = made()
    assert tuned is not None and (tuned.level, tuned.fsync) == (9, True)
    git(root, "config", "core.looseCompression", "12")
    assert made() is None
    git(root, "config", "--unset", "core.looseCompression")
    git(root, "config", "core.sharedRepository", "group")  # git sets the files' modes
    assert made() is None
    git(root, "config", "core.sharedRepository", "umask")
    assert made() is not None


def test_a_write_cut_short_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_repo(tmp_path / "r", {"x": "x\n"})
    before = _loose_files(root)
    objects = LooseObjects(root / ".git/objects")

    def full_disk(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loose.os, "write", full_disk)
    with pytest.raises(OSError, match="No space"):
        objects.write(b"blob", b"never stored\n")
    monkeypatch.undo()
    assert _loose_files(root) == before
    # (a temporary name left by a killed process is stepped over)
    data = b"stored\n"
    oid = pygit2.hash(data)
    folder = root / ".git/objects" / str(oid)[:2]
    folder.mkdir(exist_ok=True)
    stale = folder / f"tmp_obj_fanout_{os.getpid()}_{next(loose._NAMES) + 1}"  # pyright: ignore[reportPrivateUsage]
    stale.write_bytes(b"left")
    assert objects.write(b"blob", data) == oid
    assert git(root, "cat-file", "-p", str(oid)) == data.decode()


@needs_views()
def test_a_quick_commit_stores_its_objects_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_repo(tmp_path / "r", BASE)
    repo = GitRepo(root)
    ws = _view(repo, "q")
    write(ws.path, "src/sub/new.py", "n = 1\n")
    write(ws.path, "src/keep.py", "k = 1\n")  # as in the base: not stored again
    stored: list[bytes] = []
    real = LooseObjects.write

    def spy(self: LooseObjects, kind: bytes, data: bytes, **kw: pygit2.Oid | None) -> pygit2.Oid:
        oid = real(self, kind, data, **kw)
        if kw.get("unless") != oid:
            stored.append(kind)
        return oid

    monkeypatch.setattr(LooseObjects, "write", spy)
    done = _commit(ws, wait=False)
    assert layer_of(ws) is not None and done.commit is not None
    assert stored == [b"blob", b"tree", b"tree", b"tree", b"commit"]
    assert [c.path for c in done.changes] == ["src/sub/new.py"]
    assert git(root, "rev-parse", ws.branch_ref).strip() == done.commit
    assert git(root, "show", f"{done.commit}:src/sub/new.py") == "n = 1\n"
    git(root, "fsck", "--strict", "--no-dangling")
