"""Shipping an agent's work as git objects between the head and a node that shares no
filesystem with it (`orchestration.executors.shipping`), on real repositories: the round trip,
the node repository under concurrent use, and hostile packs, each refused with the head's refs
and object store left as they were."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import pygit2
import pytest

from orchestration.errors import RepositoryError
from orchestration.executors import shipping
from orchestration.executors.shipping import (
    NodeRepo,
    ShippingError,
    forbidden_name,
    land_branch,
    pack_objects,
)
from tests.orchestration.gitutil import (
    assert_fsck,
    commit_files,
    git,
    head,
    isolated_git,  # pyright: ignore[reportUnusedImport]  # noqa: F401  (autouse fixture)
    make_repo,
)

REF = "refs/heads/fanout/run1/agent1"
SIG = pygit2.Signature("Agent", "agent@example.invalid", 1_700_000_000, 0)
FILES = {
    "README.md": "hello\n",
    "src/app.py": "print('app')\n",
    "src/lib/util.py": "def f() -> int:\n    return 1\n",
    "docs/guide.md": "# guide\n",
}


def _open(git_dir: Path) -> pygit2.Repository:
    return pygit2.Repository(str(git_dir), pygit2.enums.RepositoryOpenFlag.NO_SEARCH)


def _commit(
    git_dir: Path, parents: list[str], files: Mapping[str, bytes], *, tree: str | None = None
) -> str:
    """A commit in the repository at `git_dir` (as an agent on the node makes one): the first
    parent's tree with `files` written, or `tree` as given."""
    repo = _open(git_dir)
    if tree is None:
        index = pygit2.Index()
        if parents:
            index.read_tree(repo[pygit2.Oid(hex=parents[0])].peel(pygit2.Tree))
        for path, data in files.items():
            blob = repo.create_blob(data)
            index.add(pygit2.IndexEntry(path, blob, pygit2.enums.FileMode.BLOB))
        tree_id = index.write_tree(repo)
    else:
        tree_id = pygit2.Oid(hex=tree)
    oids = [pygit2.Oid(hex=p) for p in parents]
    return str(repo.create_commit(None, SIG, SIG, "agent work", tree_id, oids))


def _tree_with(git_dir: Path, base_tree: str, name: bytes, *, inside: str | None = None) -> str:
    """The tree `base_tree` plus an entry `name` (a directory holding one file), written raw:
    libgit2's TreeBuilder refuses names like `.git`, an agent's own git need not. With `inside`,
    the entry goes into that top-level directory instead."""
    repo = _open(git_dir)
    blob = repo.create_blob(b"[core]\n\tfsmonitor = touch /tmp/pwned\n")
    leaf = repo.TreeBuilder()
    leaf.insert("config", blob, pygit2.enums.FileMode.BLOB)
    sub = str(leaf.write())

    def write_tree(tree_hex: str, add: tuple[bytes, str] | None) -> str:
        entries: list[tuple[bytes, bytes, bytes]] = []
        for entry in repo[pygit2.Oid(hex=tree_hex)].peel(pygit2.Tree):
            mode = b"40000" if entry.filemode == pygit2.enums.FileMode.TREE else b"100644"
            entries.append((mode, entry.raw_name or b"", entry.id.raw))
        if add is not None:
            entries = [e for e in entries if e[1] != add[0]]
            entries.append((b"40000", add[0], bytes.fromhex(add[1])))
        entries.sort(key=lambda e: e[1] + (b"/" if e[0] == b"40000" else b""))
        raw = b"".join(mode + b" " + nm + b"\0" + oid for mode, nm, oid in entries)
        return str(repo.odb.write(pygit2.enums.ObjectType.TREE, raw))

    if inside is None:
        return write_tree(base_tree, (name, sub))
    outer = repo[pygit2.Oid(hex=base_tree)].peel(pygit2.Tree)[inside]
    inner = write_tree(str(outer.id), (name, sub))
    return write_tree(base_tree, (inside.encode(), inner))


def _tree_of(git_dir: Path, commit: str) -> str:
    return str(_open(git_dir)[pygit2.Oid(hex=commit)].peel(pygit2.Tree).id)


def _ref(root: Path, ref: str = REF) -> str | None:
    found = git(root, "for-each-ref", "--format=%(objectname)", ref).strip()
    return found or None


def _store(root: Path) -> set[str]:
    """The head's object store as a set of file names (packs and loose objects), and anything
    else left under objects/ (a quarantine that was not cleaned up would show here)."""
    objects = root / ".git" / "objects"
    return {p.relative_to(objects).as_posix() for p in objects.rglob("*") if p.is_file()}


def _fsck_node(node: NodeRepo) -> None:
    """Every object in the node's store is sound (it has no refs: every object is checked)."""
    git(node.path, "fsck", "--strict", "--no-progress", "--no-dangling")


@pytest.fixture
def head_repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "user", FILES)


@pytest.fixture
def node(tmp_path: Path, head_repo: Path) -> NodeRepo:
    """A fresh node repository that has received the head's base commit."""
    repo = NodeRepo(tmp_path / "node-cache", "repo1")
    repo.receive(pack_objects(head_repo / ".git", [head(head_repo)]))
    return repo


# --- the round trip -------------------------------------------------------------------------


def test_round_trip_lands_the_agents_commits_on_the_head(tmp_path: Path, head_repo: Path) -> None:
    base = head(head_repo)
    node = NodeRepo(tmp_path / "node-cache", "repo1")
    assert not node.has(base)
    node.receive(pack_objects(head_repo / ".git", [base]))
    assert node.has(base)
    assert _tree_of(node.git_dir, base) == _tree_of(head_repo / ".git", base)

    first = _commit(
        node.git_dir, [base], {"src/app.py": b"print('changed')\n", "src/new/mod.py": b"x = 1\n"}
    )
    pack = node.pack_branch(first, have=[base])
    land_branch(head_repo / ".git", pack, commit=first, base=base, ref=REF, expected_old=None)
    assert _ref(head_repo) == first
    assert _tree_of(head_repo / ".git", first) == _tree_of(node.git_dir, first)
    assert git(head_repo, "show", f"{REF}:src/new/mod.py") == "x = 1\n"

    # A later checkpoint: only what the head lacks travels, and the ref moves from the first.
    second = _commit(node.git_dir, [first], {"docs/guide.md": b"# guide, v2\n"})
    thin = node.pack_branch(second, have=[base, first])
    assert len(thin) < len(pack)
    land_branch(head_repo / ".git", thin, commit=second, base=base, ref=REF, expected_old=first)
    assert _ref(head_repo) == second
    assert git(head_repo, "show", f"{REF}:docs/guide.md") == "# guide, v2\n"
    assert_fsck(head_repo)
    assert not any(name.startswith("fanout-incoming") for name in _store(head_repo))


def test_landing_the_base_itself_needs_no_objects(head_repo: Path) -> None:
    base = head(head_repo)
    empty = pack_objects(head_repo / ".git", [base], [base])
    land_branch(head_repo / ".git", empty, commit=base, base=base, ref=REF, expected_old=None)
    assert _ref(head_repo) == base


def test_a_thin_pack_needs_its_bases_only_on_the_receiver(head_repo: Path, node: NodeRepo) -> None:
    base = head(head_repo)
    big = "line of text that deltas well\n" * 200
    first = commit_files(head_repo, {"big.txt": big}, "big")
    second = commit_files(head_repo, {"big.txt": big + "one more\n"}, "bigger")
    node.receive(pack_objects(head_repo / ".git", [first], [base]))
    thin = pack_objects(head_repo / ".git", [second], [first])
    assert len(thin) < len(big) // 4
    node.receive(thin)
    assert node.has(second)
    _fsck_node(node)


def test_pack_branch_leaves_out_a_have_the_node_does_not_hold(
    head_repo: Path, node: NodeRepo
) -> None:
    base = head(head_repo)
    elsewhere = commit_files(head_repo, {"other.txt": "x\n"}, "not on the node")
    mine = _commit(node.git_dir, [base], {"a.txt": b"a\n"})
    pack = node.pack_branch(mine, have=[base, elsewhere])
    land_branch(head_repo / ".git", pack, commit=mine, base=base, ref=REF, expected_old=None)
    assert _ref(head_repo) == mine


# --- the node repository --------------------------------------------------------------------


def test_node_repo_is_created_once_non_bare_without_auto_gc(tmp_path: Path) -> None:
    first = NodeRepo(tmp_path / "cache", "repo1")
    marker = first.git_dir / "marker"
    marker.write_text("still here\n")
    again = NodeRepo(tmp_path / "cache", "repo1")
    assert again.git_dir == first.git_dir == tmp_path / "cache" / "repo1" / ".git"
    assert marker.read_text() == "still here\n"
    repo = _open(again.git_dir)
    assert not repo.is_bare
    assert repo.config["gc.auto"] == "0"
    assert [p.name for p in (tmp_path / "cache").iterdir() if "init" in p.name] == []


@pytest.mark.parametrize("bad", ["", "../up", "a/b", ".hidden", "x.lock"])
def test_node_repo_refuses_an_id_that_is_not_a_plain_name(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ShippingError, match="invalid repository id"):
        NodeRepo(tmp_path / "cache", bad)


def test_receive_is_idempotent(head_repo: Path, node: NodeRepo) -> None:
    base = head(head_repo)
    packs_before = sorted(p.name for p in (node.git_dir / "objects" / "pack").iterdir())
    node.receive(pack_objects(head_repo / ".git", [base]))
    node.receive(pack_objects(head_repo / ".git", [base]))
    assert sorted(p.name for p in (node.git_dir / "objects" / "pack").iterdir()) == packs_before
    assert node.has(base)
    _fsck_node(node)


def _receive_in_a_process(root: str, repo_id: str, pack: bytes, commit: str) -> bool:
    """In a separate process: open (maybe create) the node repository and receive a pack."""
    repo = NodeRepo(Path(root), repo_id)
    repo.receive(pack)
    return repo.has(commit)


def test_processes_create_and_receive_into_one_node_repo_at_once(
    tmp_path: Path, head_repo: Path
) -> None:
    commits = [head(head_repo)]
    for i in range(3):
        commits.append(commit_files(head_repo, {f"f{i}.txt": f"{i}\n"}, f"c{i}"))
    packs = [pack_objects(head_repo / ".git", [c]) for c in commits]
    root = tmp_path / "node-cache"
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=4, mp_context=context) as pool:
        futures = [
            pool.submit(_receive_in_a_process, str(root), "repo1", packs[i % 4], commits[i % 4])
            for i in range(8)
        ]
        assert [f.result(timeout=120) for f in futures] == [True] * 8
    node = NodeRepo(root, "repo1")
    assert all(node.has(c) for c in commits)
    assert [p.name for p in root.iterdir() if "init" in p.name] == []
    _fsck_node(node)


def test_threads_receive_into_one_node_repo_at_once(tmp_path: Path, head_repo: Path) -> None:
    commits = [head(head_repo)]
    for i in range(3):
        commits.append(commit_files(head_repo, {f"t{i}.txt": f"{i}\n"}, f"t{i}"))
    packs = [pack_objects(head_repo / ".git", [c]) for c in commits]
    start = threading.Barrier(8)

    def receive(i: int) -> bool:
        start.wait(timeout=30)
        repo = NodeRepo(tmp_path / "node-cache", "repo1")
        repo.receive(packs[i % 4])
        return repo.has(commits[i % 4])

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(receive, range(8))) == [True] * 8
    _fsck_node(NodeRepo(tmp_path / "node-cache", "repo1"))


def test_receive_of_a_thin_pack_without_its_bases_fails_clearly(
    tmp_path: Path, head_repo: Path
) -> None:
    base = head(head_repo)
    nxt = commit_files(head_repo, {"README.md": "hello\n" * 50 + "more\n"}, "next")
    fresh = NodeRepo(tmp_path / "other-cache", "repo1")
    with pytest.raises(ShippingError, match="could not receive"):
        fresh.receive(pack_objects(head_repo / ".git", [nxt], [base]))
    assert not fresh.has(nxt)


# --- hostile packs --------------------------------------------------------------------------


@pytest.mark.parametrize("name", [b".git", b".GIT", b".Git"])
@pytest.mark.parametrize("inside", [None, "src"])
def test_a_tree_entry_named_dot_git_is_refused(
    head_repo: Path, node: NodeRepo, name: bytes, inside: str | None
) -> None:
    base = head(head_repo)
    tree = _tree_with(node.git_dir, _tree_of(node.git_dir, base), name, inside=inside)
    bad = _commit(node.git_dir, [base], {}, tree=tree)
    store = _store(head_repo)
    with pytest.raises(ShippingError, match=r"index-pack --strict.*hasDotgit"):
        land_branch(
            head_repo / ".git",
            node.pack_branch(bad, have=[base]),
            commit=bad,
            base=base,
            ref=REF,
            expected_old=None,
        )
    assert _ref(head_repo) is None
    assert _store(head_repo) == store
    assert not _open(head_repo / ".git").odb.exists(bad)


@pytest.mark.parametrize("name", [b".git", b".GiT", b"..", b"git~1", b".git. "])
def test_the_path_check_refuses_a_bad_tree_the_pack_did_not_carry(
    head_repo: Path, name: bytes
) -> None:
    """Defence in depth: a forbidden tree already in the head's store (so not in the pack, and
    not seen by index-pack) is still refused by the check of the trees the commits changed."""
    base = head(head_repo)
    # Planted straight into the head's store, as no landing would let it in.
    tree = _tree_with(head_repo / ".git", _tree_of(head_repo / ".git", base), name, inside="src")
    bad = _commit(head_repo / ".git", [base], {}, tree=tree)
    empty = pack_objects(head_repo / ".git", [base], [base])
    with pytest.raises(ShippingError, match="forbidden path component: 'src/"):
        land_branch(head_repo / ".git", empty, commit=bad, base=base, ref=REF, expected_old=None)
    assert _ref(head_repo) is None


def test_a_commit_that_does_not_descend_from_the_base_is_refused(
    head_repo: Path, node: NodeRepo
) -> None:
    base = head(head_repo)
    unrelated = _commit(node.git_dir, [], {"evil.txt": b"x\n"})
    with pytest.raises(ShippingError, match="does not descend from"):
        land_branch(
            head_repo / ".git",
            node.pack_branch(unrelated, have=[base]),
            commit=unrelated,
            base=base,
            ref=REF,
            expected_old=None,
        )
    assert _ref(head_repo) is None
    # Nor does an ancestor of the base: the branch would go backwards.
    later = commit_files(head_repo, {"later.txt": "later\n"}, "later")
    empty = pack_objects(head_repo / ".git", [later], [later])
    with pytest.raises(ShippingError, match="does not descend from"):
        land_branch(head_repo / ".git", empty, commit=base, base=later, ref=REF, expected_old=None)
    assert _ref(head_repo) is None


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty"])
def test_corrupt_pack_bytes_are_refused(head_repo: Path, node: NodeRepo, damage: str) -> None:
    base = head(head_repo)
    work = _commit(node.git_dir, [base], {"a.txt": b"some agent work\n" * 20})
    pack = node.pack_branch(work, have=[base])
    if damage == "flip":
        middle = len(pack) // 2
        pack = pack[:middle] + bytes([pack[middle] ^ 0xFF]) + pack[middle + 1 :]
    elif damage == "truncate":
        pack = pack[: len(pack) - 30]
    elif damage == "garbage":
        pack = b"PACK this is not a pack at all" * 10
    else:
        pack = b""
    store = _store(head_repo)
    with pytest.raises(ShippingError, match="index-pack --strict"):
        land_branch(head_repo / ".git", pack, commit=work, base=base, ref=REF, expected_old=None)
    assert _ref(head_repo) is None
    assert _store(head_repo) == store


def test_a_ref_someone_else_moved_is_not_overwritten(head_repo: Path, node: NodeRepo) -> None:
    base = head(head_repo)
    first = _commit(node.git_dir, [base], {"a.txt": b"1\n"})
    land_branch(
        head_repo / ".git",
        node.pack_branch(first, have=[base]),
        commit=first,
        base=base,
        ref=REF,
        expected_old=None,
    )
    second = _commit(node.git_dir, [first], {"a.txt": b"2\n"})
    pack = node.pack_branch(second, have=[base, first])
    git(head_repo, "update-ref", REF, base)  # someone moved it
    with pytest.raises(ShippingError, match="someone else moved it"):
        land_branch(head_repo / ".git", pack, commit=second, base=base, ref=REF, expected_old=first)
    assert _ref(head_repo) == base
    with pytest.raises(ShippingError, match="expected \\(absent\\)"):
        land_branch(head_repo / ".git", pack, commit=second, base=base, ref=REF, expected_old=None)
    assert _ref(head_repo) == base


def _no_early_check(repo: pygit2.Repository, ref: str, old: str | None) -> None:
    """Stands in for the early check of the ref, to reach the compare-and-swap itself."""


def test_the_ref_update_itself_compares_and_swaps(
    head_repo: Path, node: NodeRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the early check, `update-ref <new> <old>` still refuses a ref moved in between."""
    base = head(head_repo)
    work = _commit(node.git_dir, [base], {"a.txt": b"1\n"})
    git(head_repo, "update-ref", REF, base)
    monkeypatch.setattr(shipping, "_check_ref", _no_early_check)
    with pytest.raises(ShippingError, match="did not move"):
        land_branch(
            head_repo / ".git",
            node.pack_branch(work, have=[base]),
            commit=work,
            base=base,
            ref=REF,
            expected_old=None,
        )
    assert _ref(head_repo) == base


def test_a_commit_the_pack_does_not_contain_is_refused(head_repo: Path, node: NodeRepo) -> None:
    base = head(head_repo)
    work = _commit(node.git_dir, [base], {"a.txt": b"1\n"})
    other = _commit(node.git_dir, [base], {"b.txt": b"2\n"})
    pack = node.pack_branch(work, have=[base])
    store = _store(head_repo)
    with pytest.raises(ShippingError, match="neither in the pack nor held"):
        land_branch(head_repo / ".git", pack, commit=other, base=base, ref=REF, expected_old=None)
    assert _ref(head_repo) is None
    assert _store(head_repo) == store


def test_a_pack_missing_history_the_head_lacks_is_refused(head_repo: Path, node: NodeRepo) -> None:
    base = head(head_repo)
    first = _commit(node.git_dir, [base], {"a.txt": b"first\n"})
    second = _commit(node.git_dir, [first], {"b.txt": b"second\n"})
    partial = node.pack_branch(second, have=[first])  # the head never received `first`
    store = _store(head_repo)
    with pytest.raises(ShippingError, match="did not receive expected object"):
        land_branch(
            head_repo / ".git", partial, commit=second, base=base, ref=REF, expected_old=None
        )
    assert _ref(head_repo) is None
    assert _store(head_repo) == store


@pytest.mark.parametrize("bad", ["HEAD", "--all", "main", "abc", "G" * 40])
def test_ids_must_be_full_hex(head_repo: Path, bad: str) -> None:
    base = head(head_repo)
    with pytest.raises(ShippingError, match="full hex commit id"):
        pack_objects(head_repo / ".git", [bad])
    with pytest.raises(ShippingError, match="full hex commit id"):
        pack_objects(head_repo / ".git", [base], [bad])
    with pytest.raises(ShippingError, match="full hex commit id"):
        land_branch(head_repo / ".git", b"", commit=bad, base=base, ref=REF, expected_old=None)


@pytest.mark.parametrize("ref", ["HEAD", "refs/heads/a..b", "refs/heads/x.lock", "main"])
def test_ref_must_be_a_valid_full_ref_name(head_repo: Path, ref: str) -> None:
    base = head(head_repo)
    with pytest.raises(ShippingError, match="invalid ref name"):
        land_branch(head_repo / ".git", b"", commit=base, base=base, ref=ref, expected_old=None)


def test_shipping_error_is_a_repository_error() -> None:
    assert issubclass(ShippingError, RepositoryError)


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        (b".git", True),
        (b".GIT", True),
        (b".Git", True),
        (b".git.", True),
        (b".git ", True),
        (b"GIT~1", True),
        (b".g\xe2\x80\x8cit", True),
        (b"..", True),
        (b".", True),
        (b"", True),
        (b"a/b", True),
        (b"x\\.git", True),
        (b".gitignore", False),
        (b".github", False),
        (b"git", False),
        (b"..foo", False),
        (b"README.md", False),
    ],
)
def test_forbidden_names(name: bytes, bad: bool) -> None:
    assert forbidden_name(name) is bad
