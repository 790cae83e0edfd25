"""Git objects to and from a worker that shares no filesystem with the server.

An agent of the Ray executor runs on a remote node. The server (the head) sends the agent's
start commit there as a pack (`pack_objects`); the node keeps one repository per canonical
repository (`NodeRepo`), receives packs into it, and the agent works and commits there. Its
branch comes back as a pack of what the head does not have (`NodeRepo.pack_branch`), at
checkpoints and at the end, and `land_branch` puts it under `refs/heads/fanout/<run>/<agent>`.

The pack that comes back is hostile input: an agent may have written anything into the node's
object store. So landing indexes it into a quarantine directory, never into the object store
itself, with `index-pack --strict` (hashes, object syntax, links, and git's fsck checks of tree
entry names); checks that the commit descends from the base and that no tree it changed holds a
`.git` (in any case or disguise), `.` or `..` entry; and only then moves the pack into the store
and moves the ref, compare-and-swap on the value the caller expects. A refused landing leaves the
repository's objects and refs as they were. Every git process runs pinned with every
command-running configuration off (`toolbus.gitcmd.SAFE_CONFIG`), so nothing the content or the
node chose runs on the head.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pygit2
from filelock import FileLock

from orchestration.errors import RepositoryError
from toolbus import gitcmd

__all__ = ["NodeRepo", "ShippingError", "forbidden_name", "land_branch", "pack_objects"]

_OID = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_STDERR_TAIL = 600

# Code points HFS+ ignores in file names: `.g\u200cit` is `.git` on a Mac (git's `is_hfs_dotgit`).
_HFS_IGNORABLE = dict.fromkeys(
    [
        *range(0x200C, 0x2010),
        *range(0x202A, 0x202F),
        *range(0x206A, 0x2070),
        0xFEFF,
    ]
)


class ShippingError(RepositoryError):
    """Git objects could not be shipped or landed: a pack that does not index, a commit that
    is missing or does not descend from its base, a forbidden path, a ref someone else moved.
    The message says which; a refused landing left the repository as it was."""


def pack_objects(git_dir: Path, want: Sequence[str], have: Sequence[str] = ()) -> bytes:
    """A pack of every object reachable from the `want` commits and not from the `have`
    commits, of the repository whose git dir (bare, or a checkout's `.git`) is `git_dir`.

    With `have`, the pack is thin: its deltas may be against objects of the `have` commits,
    which the receiver already holds (`index-pack --fix-thin` completes it there)."""
    ids = [_check_oid(oid, "want") for oid in want] + [_check_oid(oid, "have") for oid in have]
    if not want:
        raise ShippingError("nothing to pack: no commit asked for")
    revs = "".join(f"{oid}\n" for oid in ids[: len(want)])
    revs += "".join(f"^{oid}\n" for oid in ids[len(want) :])
    args = ["pack-objects", "--stdout", "--revs", "--delta-base-offset", "-q"]
    if have:
        args.append("--thin")
    proc = gitcmd.run_bytes(git_dir, args, pinned=_pin(git_dir), input=revs.encode("ascii"))
    if proc.returncode != 0:
        raise ShippingError(f"could not pack {', '.join(want)} in {git_dir}: {_tail(proc.stderr)}")
    return proc.stdout


class NodeRepo:
    """A worker node's own repository for one canonical repository, at `<root>/<repo_id>`.

    Created once, by whichever process on the node comes first (a file lock next to it
    serializes creation and receiving; it appears whole, renamed into place). It is a normal
    non-bare repository, so workspaces can be made from it; it has no identity configured
    (commits are made with explicit identities) and automatic gc off, because the objects it
    receives are reachable from no ref and gc would prune them."""

    def __init__(self, root: Path, repo_id: str) -> None:
        if not _REPO_ID.fullmatch(repo_id) or repo_id.endswith(".lock"):
            raise ShippingError(
                f"invalid repository id {repo_id!r}: letters, digits, '.', '_' and '-' only"
            )
        self._root = Path(os.path.abspath(root))
        self._path = self._root / repo_id
        self._lock = FileLock(str(self._root / f".{repo_id}.lock"))
        self._root.mkdir(parents=True, exist_ok=True)
        if not self.git_dir.is_dir():
            with self._lock:
                if not self.git_dir.is_dir():
                    self._create()

    @property
    def path(self) -> Path:
        """The repository's directory (its main work tree)."""
        return self._path

    @property
    def git_dir(self) -> Path:
        """The repository's git dir, `<path>/.git`."""
        return self._path / ".git"

    def has(self, commit: str) -> bool:
        """Whether the repository holds the commit `commit`. A received pack is complete, so
        a commit held means its whole history and trees are held as well."""
        oid = _check_oid(commit, "commit")
        obj = _open(self.git_dir).get(oid)
        return obj is not None and obj.type == pygit2.enums.ObjectType.COMMIT

    def receive(self, pack: bytes) -> None:
        """Index `pack` (from `pack_objects`, thin or not) into the object store; receiving the
        same pack again changes nothing. `--strict` makes git check that every object the pack
        links to is in it or already here, so that holding a commit (`has`) means holding its
        history and trees; it costs next to nothing (about 50 ms for a 10,000-file base, with
        or without it)."""
        with self._lock:
            proc = gitcmd.run_bytes(
                self.git_dir,
                ["index-pack", "--strict", "--stdin", "--fix-thin"],
                pinned=_pin(self.git_dir),
                input=pack,
            )
        if proc.returncode != 0:
            raise ShippingError(f"could not receive a pack into {self._path}: {_tail(proc.stderr)}")

    def pack_branch(self, commit: str, have: Sequence[str]) -> bytes:
        """A thin pack of `commit` and its history, less what the `have` commits (those the
        head already holds: the base, landed checkpoints) reach. A `have` commit this
        repository does not hold is left out rather than failing the pack."""
        return pack_objects(self.git_dir, [commit], [h for h in have if self.has(h)])

    def _create(self) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{self._path.name}.init-", dir=self._root))
        try:
            proc = gitcmd.run(self._root, ["init", "-q", str(tmp)])
            if proc.returncode != 0:
                raise ShippingError(f"git init failed in {self._root}: {proc.stderr.strip()}")
            config = _open(tmp / ".git").config
            config["gc.auto"] = "0"
            os.rename(tmp, self._path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def land_branch(
    git_dir: Path,
    pack: bytes,
    *,
    commit: str,
    base: str,
    ref: str,
    expected_old: str | None,
) -> None:
    """Land an agent's branch: index `pack` (hostile: from a worker) into the repository at
    `git_dir`, and point `ref` at `commit`, if the ref is still at `expected_old` (`None`: the
    ref must not exist yet).

    Refused with `ShippingError`, leaving objects and refs untouched, when the pack does not
    pass `index-pack --strict`, `commit` is neither in it nor in the repository, `commit` is
    not `base` or a descendant of it, a tree changed since `base` holds a `.git`, `.` or `..`
    entry, or the ref is not at `expected_old`. (Only when the ref moves between the early
    check and the compare-and-swap itself do the checked objects stay, unreferenced.)"""
    new = _check_oid(commit, "commit")
    base = _check_oid(base, "base")
    old = _check_oid(expected_old, "expected_old") if expected_old is not None else None
    if not ref.startswith("refs/") or not pygit2.reference_is_valid_name(ref):
        raise ShippingError(f"invalid ref name {ref!r}")
    repo = _open(git_dir)
    _check_ref(repo, ref, old)
    held = repo.get(base)
    if held is None or held.type != pygit2.enums.ObjectType.COMMIT:
        raise ShippingError(f"the base {base} is not a commit of the repository at {git_dir}")
    objects = _objects_dir(git_dir)
    quarantine = Path(tempfile.mkdtemp(prefix="fanout-incoming-", dir=objects))
    try:
        incoming = quarantine / "pack"
        incoming.mkdir()
        proc = gitcmd.run_bytes(
            git_dir,
            ["index-pack", "--strict", "--fix-thin", "--stdin", str(incoming / "incoming.pack")],
            pinned=_pin(git_dir),
            input=pack,
        )
        if proc.returncode != 0:
            raise ShippingError(
                f"refused the pack for {ref}: it does not pass `git index-pack --strict`: "
                f"{_tail(proc.stderr)}"
            )
        checked = _open(git_dir)
        checked.odb.add_disk_alternate(str(quarantine))
        _verify(checked, new, base, ref)
        checksum = (proc.stdout.decode("ascii", "replace").split() or [""])[-1]
        _move_pack(incoming, objects / "pack", checksum)
    finally:
        shutil.rmtree(quarantine, ignore_errors=True)
    proc = gitcmd.run_bytes(
        git_dir,
        ["update-ref", "--no-deref", "-m", f"fanout: land {new}", ref, new, old or "0" * len(new)],
        pinned=_pin(git_dir),
    )
    if proc.returncode != 0:
        raise ShippingError(
            f"did not move {ref}: it is no longer at {old or '(absent)'}, someone else moved "
            f"it: {_tail(proc.stderr)}"
        )


def forbidden_name(name: bytes) -> bool:
    """Whether a tree entry named `name` must not land: empty, `.`, `..`, a `/` or NUL in it,
    or a name that some file system takes for `.git` (any case; NTFS trailing dots and spaces
    and its short name `git~1`; HFS+ ignorable code points)."""
    if name in (b"", b".", b"..") or b"/" in name or b"\0" in name:
        return True
    for part in name.split(b"\\"):
        text = part.decode("utf-8", "surrogateescape").translate(_HFS_IGNORABLE)
        folded = text.rstrip(". ").casefold()
        if folded in (".git", "git~1") or part in (b".", b".."):
            return True
    return False


def _verify(repo: pygit2.Repository, new: str, base: str, ref: str) -> None:
    """The landing checks past `index-pack --strict`: `new` is a commit, is `base` or descends
    from it, and no tree changed on the way holds a forbidden name (checked for every commit
    from `base` to `new` against its first parent, descending only into subtrees that changed:
    the cost follows the change, not the repository's size)."""
    obj = repo.get(new)
    if obj is None:
        raise ShippingError(f"refused {ref}: the commit {new} is neither in the pack nor held")
    if obj.type != pygit2.enums.ObjectType.COMMIT:
        raise ShippingError(f"refused {ref}: {new} is a {obj.type_str}, not a commit")
    if new == base:
        return
    try:
        descends = repo.descendant_of(new, base)
    except (pygit2.GitError, KeyError) as exc:
        raise ShippingError(f"refused {ref}: the history of {new} is incomplete: {exc}") from exc
    if not descends:
        raise ShippingError(f"refused {ref}: the commit {new} does not descend from {base}")
    try:
        walker = repo.walk(new, pygit2.enums.SortMode.NONE)
        walker.hide(base)
        for each in walker:
            parent = each.parents[0].tree if each.parents else None
            _check_tree(repo, each.tree, parent, "")
    except (pygit2.GitError, KeyError) as exc:
        raise ShippingError(f"refused {ref}: the history of {new} is incomplete: {exc}") from exc


def _check_tree(
    repo: pygit2.Repository, tree: pygit2.Tree, old: pygit2.Tree | None, at: str
) -> None:
    """Refuse a forbidden name in `tree`, and in every subtree that differs from `old`'s."""
    before = {entry.raw_name: entry for entry in old} if old is not None else {}
    for entry in tree:
        name = entry.raw_name or b""
        if forbidden_name(name):
            shown = at + name.decode("utf-8", "backslashreplace")
            raise ShippingError(f"refused a tree with a forbidden path component: {shown!r}")
        if entry.filemode != pygit2.enums.FileMode.TREE:
            continue
        prior = before.get(name)
        if prior is not None and prior.id == entry.id:
            continue
        sub = repo[entry.id]
        if not isinstance(sub, pygit2.Tree):
            raise ShippingError(f"refused a tree entry {at}{entry.name} that is not a tree")
        prior_tree = repo[prior.id] if prior is not None else None
        _check_tree(
            repo,
            sub,
            prior_tree if isinstance(prior_tree, pygit2.Tree) else None,
            f"{at}{name.decode('utf-8', 'backslashreplace')}/",
        )


def _move_pack(incoming: Path, pack_dir: Path, checksum: str) -> None:
    """Move an indexed pack from the quarantine into the object store, named as git names it;
    its index last, as git finds packs by their index."""
    if not _OID.fullmatch(checksum):
        raise ShippingError(f"unexpected output of git index-pack: {checksum!r}")
    for ext in (".pack", ".rev", ".idx"):
        src = incoming / f"incoming{ext}"
        if src.exists():
            os.replace(src, pack_dir / f"pack-{checksum}{ext}")


def _check_ref(repo: pygit2.Repository, ref: str, old: str | None) -> None:
    """Fail early when `ref` is not at `old` (the update itself compares and swaps again)."""
    current = repo.references.get(ref)
    if current is not None and current.type != pygit2.enums.ReferenceType.DIRECT:
        raise ShippingError(f"refused to move {ref}: it is a symbolic ref")
    target = None if current is None else str(current.target)
    if target != old:
        raise ShippingError(
            f"refused to move {ref}: it is at {target or '(absent)'}, expected "
            f"{old or '(absent)'}; someone else moved it"
        )


def _objects_dir(git_dir: Path) -> Path:
    """The object store of a git dir (a linked worktree's is in its common dir)."""
    common = git_dir / "commondir"
    if common.is_file():
        return (git_dir / common.read_text(encoding="utf-8").strip()).resolve() / "objects"
    return git_dir / "objects"


def _open(git_dir: Path) -> pygit2.Repository:
    try:
        return pygit2.Repository(str(git_dir), pygit2.enums.RepositoryOpenFlag.NO_SEARCH)
    except pygit2.GitError as exc:
        raise ShippingError(f"not a git repository: {git_dir}: {exc}") from exc


def _pin(git_dir: Path) -> gitcmd.Pinned:
    """Git on `git_dir` with every command-running configuration off. The commands run here
    (pack-objects, index-pack, update-ref) never read a work tree; the git dir stands in."""
    return gitcmd.Pinned(git_dir, git_dir)


def _check_oid(value: str, what: str) -> str:
    """A full hex object id, lower case; anything else (a revision expression, an option) is
    refused before it reaches git's command line or `--revs` input."""
    if not _OID.fullmatch(value):
        raise ShippingError(f"{what} must be a full hex commit id, not {value!r}")
    return value


def _tail(stderr: bytes) -> str:
    text = stderr.decode("utf-8", "replace").strip()
    return text if len(text) <= _STDERR_TAIL else "…" + text[-_STDERR_TAIL:]
