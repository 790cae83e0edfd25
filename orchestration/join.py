"""The join step: merge agents' branches into the canonical branch, one writer, never losing work.

Each candidate is merged in memory (libgit2 `merge_trees` against the agent's explicit base,
which may be a snapshot commit that is no ancestor of the canonical head), committed on top of
the canonical head, and landed by a compare-and-swap of the branch ref. The user's index and
working tree are then brought forward for exactly the paths the merge changed; when the user's
uncommitted changes touch one of those paths the agent is skipped and nothing moves.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import filelock
import pygit2
from pydantic import BaseModel, ConfigDict, Field

from orchestration.contracts import DiffStat, MergeOutcome, shown_path, shown_paths
from orchestration.errors import MergeError, OrchestrationError, RepositoryError
from orchestration.workspace import (
    GitRepo,
    Identity,
    run_git,
    status_entries,
    tree_changes,
)
from orchestration.workspace.engine import changed_paths
from orchestration.workspace.git import tree_of
from orchestration.workspace.tree_edits import TreeEdit, edit_tree, is_tree
from toolbus import gitcmd
from toolbus.resources import is_within, overlaps

CanLand = Callable[[str], str | None]
"""Asked right before an agent lands: a reason to skip it (e.g. its lease was lost), or None."""
OnProgress = Callable[["JoinOutcome"], None]
"""Told each outcome as soon as it is known."""

JOURNAL_NAME = "merge-journal.json"
# A git lock file is taken for stale (left by a process killed inside a ref update) only when it
# appeared during the journaled compare-and-swap, give or take this many seconds.
STALE_LOCK_WINDOW_S = 120.0

MAX_PATHSPECS = 500
SUBJECT_LIMIT = 72
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class MergeJournal(BaseModel):
    """Written before the branch ref moves, removed once the user's checkout has followed it.

    Found at the start of a later merge (under the one-writer lock, so its writer is gone), it
    says a merge was cut short between the compare-and-swap and bringing the checkout forward.
    """

    ref: str
    old: str
    new: str
    started_at: float
    pid: int


class JoinCandidate(BaseModel):
    """An agent's finished work, offered to the join step."""

    model_config = ConfigDict(frozen=True)

    agent_id: str
    name: str
    task_summary: str
    model_summary: str = ""
    base_commit: str
    branch: str
    commit: str
    # the files it changes, and those whose contents the bus showed it (read_file, search hits)
    changed: tuple[str, ...] = ()
    reads: frozenset[str] = frozenset()
    ran_commands: bool = False


@dataclass(frozen=True)
class MergedReader:
    """An agent merged before this join (of the same run): what it read, and its merge."""

    agent_id: str
    name: str
    commit: str | None  # its merge commit on the canonical branch
    reads: frozenset[str]
    changed: frozenset[str]


@dataclass
class _Readers:
    """Who read and who changed what, for the stale check of one `merge` call."""

    earlier: Sequence[MergedReader]
    landed: list[MergedReader] = field(default_factory=list[MergedReader])
    accept_stale: bool = False


class JoinOutcome(BaseModel):
    """What the join did with one candidate (`clean` is a dry run's `merged`)."""

    model_config = ConfigDict(frozen=True)

    agent_id: str
    outcome: MergeOutcome
    commit: str | None = None
    conflicts: list[str] = Field(default_factory=list[str])
    stale_reads: list[str] = Field(default_factory=list[str])
    reason: str | None = None
    diffstat: DiffStat = Field(default_factory=DiffStat)
    # skipped because the branch moved after the verification: its merge now makes another
    # tree than the one the command passed on
    unverified: bool = False


@dataclass(frozen=True)
class _Target:
    """Where merges land: the ref to compare-and-swap and the commit it points to."""

    ref: str
    head: pygit2.Oid


@dataclass(frozen=True)
class _Merge:
    """One candidate merged in memory onto a head tree."""

    tree: pygit2.Oid | None
    conflicts: list[str]
    changed: list[str]
    diffstat: DiffStat


def merge_message(candidate: JoinCandidate) -> str:
    """The commit message of an agent's merge: subject, the model's summary, trailers."""
    task = " ".join(_CONTROL.sub(" ", candidate.task_summary).split())
    name = " ".join(_CONTROL.sub(" ", candidate.name).split()) or candidate.agent_id
    subject = f"fanout: {name}: {task}" if task else f"fanout: {name}"
    if len(subject) > SUBJECT_LIMIT:
        subject = subject[: SUBJECT_LIMIT - 1].rstrip() + "…"
    summary = _CONTROL.sub("", candidate.model_summary.replace("\r\n", "\n")).strip()
    trailers = (
        f"Fanout-Agent: {candidate.agent_id}\n"
        f"Fanout-Base: {candidate.base_commit}\n"
        f"Fanout-Agent-Commit: {candidate.commit}\n"
    )
    return f"{subject}\n\n{summary}\n\n{trailers}" if summary else f"{subject}\n\n{trailers}"


def _tree(pyrepo: pygit2.Repository, rev: str | pygit2.Oid) -> pygit2.Tree | None:
    try:
        obj = pyrepo[rev] if isinstance(rev, pygit2.Oid) else pyrepo.revparse_single(rev)
        return obj.peel(pygit2.Tree)
    except (KeyError, ValueError, pygit2.GitError):
        return None


def _write_merged_tree(
    pyrepo: pygit2.Repository, index: pygit2.Index, ours: pygit2.Tree
) -> tuple[pygit2.Oid, list[str]]:
    """The merge result as a tree built on `ours`, and the paths where it differs from `ours`.

    Equivalent to `index.write_tree()`, but only the directories the merge touched are
    rewritten, which matters in repositories of many thousand files.
    """
    deletes: dict[str, TreeEdit] = {}
    writes: dict[str, TreeEdit] = {}
    for delta in index.diff_to_tree(ours).deltas:
        if delta.status_char() == "D":
            deletes[delta.old_file.path] = None
        else:
            writes[delta.new_file.path] = (delta.new_file.id, int(delta.new_file.mode))
    changed = sorted(set(deletes) | set(writes))
    if not changed:
        return ours.id, []
    # deletions first, so a file may replace a directory (or the other way) in one pass
    tree_id = edit_tree(pyrepo, ours, deletes) if deletes else ours.id
    if writes:
        base = pyrepo[tree_id].peel(pygit2.Tree) if tree_id is not None else None
        tree_id = edit_tree(pyrepo, base, writes)
    return (tree_id if tree_id is not None else _empty_tree(pyrepo)), changed


def _empty_tree(pyrepo: pygit2.Repository) -> pygit2.Oid:
    return pyrepo.TreeBuilder().write()


def _merge_in_memory(
    pyrepo: pygit2.Repository, base: pygit2.Tree, ours: pygit2.Tree, theirs: pygit2.Tree
) -> _Merge:
    index = pyrepo.merge_trees(base, ours, theirs)
    conflicts = index.conflicts
    if conflicts is not None:
        paths: set[str] = set()
        for entries in conflicts:  # pyright: ignore[reportUnknownVariableType]
            for entry in entries:  # pyright: ignore[reportUnknownVariableType]
                if entry is not None:
                    paths.add(shown_path(str(entry.path)))  # pyright: ignore[reportUnknownArgumentType, reportUnknownMemberType]
        agent = tree_changes(pyrepo, base, theirs)
        return _Merge(None, sorted(paths), [], DiffStat.of(agent))
    tree_id, changed = _write_merged_tree(pyrepo, index, ours)
    if not changed:
        return _Merge(tree_id, [], [], DiffStat())
    merged = pyrepo[tree_id].peel(pygit2.Tree)
    return _Merge(tree_id, [], changed, DiffStat.of(tree_changes(pyrepo, ours, merged)))


def _dirty_overlap(root: Path, changed: Sequence[str], *, staged: bool = True) -> list[str]:
    """The user's uncommitted (or untracked, or ignored) paths that the merge would touch;
    without `staged`, only where the working tree differs from the index."""
    if not changed:
        return []
    specs = list(changed)
    if len(specs) > MAX_PATHSPECS:  # too many to name: ask about their directories instead
        specs = _covering_dirs(changed)
        if len(specs) > MAX_PATHSPECS or "" in specs:
            specs = []
    entries = status_entries(root, specs, ignored=True)
    hits = {
        e.path
        for e in entries
        if (staged or e.code[1:] != " ") and any(overlaps(e.path, c) for c in changed)
    }
    changed_set = set(changed)
    for path in changed:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            ancestor = "/".join(parts[:depth])
            if ancestor in changed_set:
                continue
            full = root / ancestor
            if full.is_symlink() or (full.exists() and not full.is_dir()):
                hits.add(ancestor)  # a file of the user's where the merge needs a directory
    return sorted(hits)


def _covering_dirs(paths: Sequence[str]) -> list[str]:
    """The fewest parent directories covering `paths` (`""` when one sits at the top)."""
    dirs = sorted({p.rpartition("/")[0] for p in paths})
    kept: list[str] = []
    for d in dirs:
        if not kept or not is_within(d, kept[-1]):
            kept.append(d)
    return kept


def _overlap_reason(paths: Sequence[str]) -> str:
    return (
        f"your uncommitted changes to {shown_paths(paths)} overlap this agent's changes; "
        "commit or stash them, then merge again"
    )


class Joiner:
    """Merges candidates into the canonical branch of one repository, one writer at a time."""

    def __init__(
        self,
        repo: GitRepo,
        *,
        lock_timeout_s: float = 60.0,
        identity: Identity | None = None,
        branch_ref: str | None = None,
        max_attempts: int = 5,
    ) -> None:
        self._repo = repo
        self._lock_timeout_s = lock_timeout_s
        self._identity = identity
        self._pinned_ref = branch_ref
        self._max_attempts = max(1, max_attempts)
        self._final_head: str | None = None
        self._verified: Mapping[str, str] | None = None
        self.recovered: str | None = None
        # after a dry run: the head's tree, and per candidate the tree after it (None: it
        # would not land)
        self.preview_head_tree: str | None = None
        self.preview_trees: list[str | None] = []

    @property
    def final_head(self) -> str | None:
        """The canonical head after the last `merge` call (unchanged by a dry run)."""
        return self._final_head

    @property
    def lock_path(self) -> Path:
        """The one-writer lock file of this repository's join step."""
        return self._repo.state_dir / "merge.lock"

    def merge(
        self,
        candidates: Sequence[JoinCandidate],
        *,
        dry_run: bool,
        can_land: CanLand | None = None,
        on_progress: OnProgress | None = None,
        merged_readers: Sequence[MergedReader] = (),
        accept_stale: bool = False,
        verified: Mapping[str, str] | None = None,
    ) -> list[JoinOutcome]:
        """Join the candidates in order; a dry run reports what would happen and changes nothing.

        A candidate that read a file changed on the canonical branch since its base, or that
        changes a file read by an agent merged after its base (`merged_readers`, and the
        candidates landed before it), is `stale` and not merged, unless `accept_stale`.
        With `verified` (agent id -> the tree a verification passed on, from a dry run of the
        same candidates), a candidate lands only where its merge makes exactly that tree: if
        the branch moved since, what would land was not verified."""
        self._repo.head_commit()  # a clear error for a repository without commits
        self._verified = verified
        readers = _Readers(earlier=merged_readers, accept_stale=accept_stale)
        if dry_run:
            return self._run(
                candidates,
                dry_run=True,
                can_land=can_land,
                on_progress=on_progress,
                readers=readers,
            )
        lock = filelock.FileLock(str(self.lock_path), timeout=self._lock_timeout_s)
        try:
            lock.acquire()
        except filelock.Timeout as exc:
            raise MergeError(
                f"another merge into {self._repo.root} has held {self.lock_path} for over "
                f"{self._lock_timeout_s:g} s; wait for it to finish, then merge again"
            ) from exc
        try:
            self.recovered = self._recover_locked()
            return self._run(
                candidates,
                dry_run=False,
                can_land=can_land,
                on_progress=on_progress,
                readers=readers,
            )
        finally:
            lock.release()

    def recover(self) -> str | None:
        """Finish or undo what a merge cut short (killed) left behind; say what was done."""
        lock = filelock.FileLock(str(self.lock_path), timeout=self._lock_timeout_s)
        try:
            lock.acquire()
        except filelock.Timeout:
            return None  # a merge is running; it recovers first
        try:
            return self._recover_locked()
        finally:
            lock.release()

    @property
    def journal_path(self) -> Path:
        return self._repo.state_dir / JOURNAL_NAME

    def _write_journal(self, journal: MergeJournal) -> None:
        path = self.journal_path
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.write(journal.model_dump_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _clear_journal(self) -> None:
        self.journal_path.unlink(missing_ok=True)

    def _recover_locked(self) -> str | None:
        """Under the one-writer lock: a journal left here belongs to a merge that was killed."""
        path = self.journal_path
        if not path.exists():
            return None
        try:
            journal = MergeJournal.model_validate_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self._clear_journal()
            return "dropped an unreadable merge journal"
        notes = self._clear_stale_ref_locks(journal)
        current = self._repo.try_git("rev-parse", "--verify", "--quiet", journal.ref)
        current = current.strip() if current else None
        if current == journal.new:
            old, new = pygit2.Oid(hex=journal.old), pygit2.Oid(hex=journal.new)
            pyrepo = self._repo.open()
            try:
                changed = changed_paths(pyrepo, journal.old, str(tree_of(pyrepo, journal.new).id))
                problem, _ = self._bring_forward(pyrepo, old, new, changed)
            finally:
                pyrepo.free()
            if problem is None:
                notes.append(
                    f"brought your checkout forward to {journal.new[:12]}, which an interrupted "
                    "merge had landed"
                )
            else:
                notes.append(
                    f"an interrupted merge landed {journal.new[:12]} but your checkout could not "
                    f"be brought forward ({problem}); run `git status` and "
                    f"`git read-tree -m -u {journal.old[:12]} {journal.new[:12]}`"
                )
        elif current == journal.old:
            notes.append("an interrupted merge had not landed; nothing changed")
        self._clear_journal()
        return "; ".join(notes) or None

    def _clear_stale_ref_locks(self, journal: MergeJournal) -> list[str]:
        """Remove the git lock files a killed `update-ref` of the journaled merge left behind."""
        git_dir = self._repo.git_dir
        candidates = [git_dir / f"{journal.ref}.lock"]
        if journal.ref != "HEAD":
            candidates.append(git_dir / "HEAD.lock")
        removed: list[str] = []
        for lock in candidates:
            try:
                mtime = lock.stat().st_mtime
            except FileNotFoundError:
                continue
            if journal.started_at - 5 <= mtime <= journal.started_at + STALE_LOCK_WINDOW_S:
                lock.unlink(missing_ok=True)
                removed.append(lock.name)
        return [f"removed stale git lock(s) {', '.join(removed)}"] if removed else []

    def conflict_diff(self, candidate: JoinCandidate, *, head: str | None = None) -> str:
        """The conflicting files of `candidate` merged onto `head` (default: canonical head)."""
        return conflict_diff(self._repo, candidate, head=head)

    # ------------------------------------------------------------------ internals

    def _target(self, pyrepo: pygit2.Repository, expected_ref: str | None) -> _Target:
        head_ref = pyrepo.lookup_reference("HEAD")
        target = head_ref.target
        ref = target if isinstance(target, str) else "HEAD"
        if expected_ref is not None and ref != expected_ref:
            where = "a detached HEAD" if ref == "HEAD" else ref
            raise MergeError(
                f"the checkout of {self._repo.root} is on {where}, not {expected_ref}: "
                f"check out {expected_ref.removeprefix('refs/heads/')} and merge again"
            )
        try:
            head = pyrepo.lookup_reference(ref).resolve().target if ref != "HEAD" else target
        except (KeyError, pygit2.GitError) as exc:
            raise RepositoryError(f"{ref} has no commit yet; make a first commit") from exc
        if not isinstance(head, pygit2.Oid):
            raise MergeError(f"{ref} does not point to a commit")
        return _Target(ref, head)

    def _run(
        self,
        candidates: Sequence[JoinCandidate],
        *,
        dry_run: bool,
        can_land: CanLand | None,
        on_progress: OnProgress | None,
        readers: _Readers,
    ) -> list[JoinOutcome]:
        pyrepo = self._repo.open()
        try:
            start = self._target(pyrepo, self._pinned_ref)
            expected_ref = start.ref
            virtual_head: pygit2.Tree | None = None
            outcomes: list[JoinOutcome] = []
            if dry_run:
                self.preview_head_tree = str(pyrepo[start.head].peel(pygit2.Tree).id)
                self.preview_trees = []
            for cand in candidates:
                try:
                    if dry_run:
                        if virtual_head is None:
                            virtual_head = pyrepo[start.head].peel(pygit2.Tree)
                        outcome, virtual_head = self._evaluate(
                            pyrepo, cand, virtual_head, can_land, readers
                        )
                    else:
                        outcome = self._land(pyrepo, cand, expected_ref, can_land, readers)
                except (OrchestrationError, pygit2.GitError, OSError) as exc:
                    # raised before anything landed for this candidate: report it, go on
                    outcome = self._skipped(cand, None, f"the merge step failed: {exc}")
                outcomes.append(outcome)
                if dry_run:
                    lands = outcome.outcome is MergeOutcome.CLEAN and virtual_head is not None
                    tree = str(virtual_head.id) if lands and virtual_head is not None else None
                    self.preview_trees.append(tree)
                if outcome.outcome in (MergeOutcome.MERGED, MergeOutcome.CLEAN):
                    readers.landed.append(
                        MergedReader(
                            agent_id=cand.agent_id,
                            name=cand.name,
                            commit=outcome.commit,
                            reads=cand.reads,
                            changed=frozenset(outcome.diffstat.paths),
                        )
                    )
                if on_progress is not None:
                    on_progress(outcome)
            self._final_head = str(self._target(pyrepo, None).head)
            return outcomes
        finally:
            pyrepo.free()

    def _inputs(
        self, pyrepo: pygit2.Repository, cand: JoinCandidate
    ) -> tuple[pygit2.Tree, pygit2.Tree] | JoinOutcome:
        base = _tree(pyrepo, cand.base_commit)
        theirs = _tree(pyrepo, cand.commit)
        if base is None or theirs is None:
            missing = cand.base_commit if base is None else cand.commit
            return JoinOutcome(
                agent_id=cand.agent_id,
                outcome=MergeOutcome.SKIPPED,
                reason=f"commit {missing} of this agent is not in the repository; "
                f"its branch {cand.branch} may have been deleted",
            )
        if base.id == theirs.id:
            return JoinOutcome(
                agent_id=cand.agent_id,
                outcome=MergeOutcome.SKIPPED,
                reason="the agent changed nothing",
            )
        return base, theirs

    def _evaluate(
        self,
        pyrepo: pygit2.Repository,
        cand: JoinCandidate,
        head_tree: pygit2.Tree,
        can_land: CanLand | None,
        readers: _Readers,
    ) -> tuple[JoinOutcome, pygit2.Tree]:
        """A dry run of one candidate on a (possibly virtual) head tree; the next head tree."""
        inputs = self._inputs(pyrepo, cand)
        if isinstance(inputs, JoinOutcome):
            return inputs, head_tree
        base, theirs = inputs
        m = _merge_in_memory(pyrepo, base, head_tree, theirs)
        if m.tree is None:
            return self._conflicted(cand, m), head_tree
        stale = _stale(pyrepo, cand, base, head_tree, m=m, readers=readers)
        if stale is not None and not readers.accept_stale:
            return stale, head_tree
        reason = can_land(cand.agent_id) if can_land is not None else None
        if reason is None:
            dirty = _dirty_overlap(self._repo.root, m.changed)
            reason = _overlap_reason(dirty) if dirty else None
        if reason is not None:
            return self._skipped(cand, m, reason), head_tree
        note = None if m.changed else "already in the canonical branch: nothing to apply"
        if stale is not None:
            note = f"merged although stale (accept_stale): {stale.reason}"
        outcome = JoinOutcome(
            agent_id=cand.agent_id,
            outcome=MergeOutcome.CLEAN,
            reason=note,
            diffstat=m.diffstat,
            stale_reads=stale.stale_reads if stale is not None else [],
        )
        return outcome, pyrepo[m.tree].peel(pygit2.Tree)

    def _conflicted(self, cand: JoinCandidate, m: _Merge) -> JoinOutcome:
        return JoinOutcome(
            agent_id=cand.agent_id,
            outcome=MergeOutcome.CONFLICTED,
            conflicts=m.conflicts,
            reason=f"{len(m.conflicts)} file(s) conflict with the canonical branch; "
            "the agent's branch is kept: rerun it on the new base or resolve by hand",
            diffstat=m.diffstat,
        )

    def _skipped(
        self, cand: JoinCandidate, m: _Merge | None, reason: str, *, unverified: bool = False
    ) -> JoinOutcome:
        return JoinOutcome(
            agent_id=cand.agent_id,
            outcome=MergeOutcome.SKIPPED,
            reason=reason,
            diffstat=m.diffstat if m is not None else DiffStat(),
            unverified=unverified,
        )

    def _land(
        self,
        pyrepo: pygit2.Repository,
        cand: JoinCandidate,
        expected_ref: str,
        can_land: CanLand | None,
        readers: _Readers,
    ) -> JoinOutcome:
        inputs = self._inputs(pyrepo, cand)
        if isinstance(inputs, JoinOutcome):
            return inputs
        base, theirs = inputs
        m: _Merge | None = None
        for _attempt in range(self._max_attempts):
            try:
                target = self._target(pyrepo, expected_ref)
            except MergeError as exc:
                return self._skipped(cand, m, str(exc))
            head_tree = pyrepo[target.head].peel(pygit2.Tree)
            m = _merge_in_memory(pyrepo, base, head_tree, theirs)
            if m.tree is None:
                return self._conflicted(cand, m)
            if not m.changed:
                return JoinOutcome(
                    agent_id=cand.agent_id,
                    outcome=MergeOutcome.MERGED,
                    reason="already in the canonical branch: nothing to apply",
                )
            if self._verified is not None and self._verified.get(cand.agent_id) != str(m.tree):
                return self._skipped(
                    cand,
                    m,
                    f"{target.ref} moved while the verification command ran, so what would land "
                    "now is not what it verified; merge again to verify on the new head",
                    unverified=True,
                )
            stale = _stale(pyrepo, cand, base, head_tree, m=m, readers=readers)
            if stale is not None and not readers.accept_stale:
                return stale
            reason = can_land(cand.agent_id) if can_land is not None else None
            if reason is not None:
                return self._skipped(cand, m, reason)
            # read-only status (no index refresh): a merely stat-dirty path, which status
            # reports clean, is refreshed by _bring_forward if read-tree trips over it
            dirty = _dirty_overlap(self._repo.root, m.changed)
            if dirty:
                return self._skipped(cand, m, _overlap_reason(dirty))
            if self._identity is None:
                self._identity = self._repo.identity()
            signature = self._identity.signature()
            new = pyrepo.create_commit(
                None, signature, signature, merge_message(cand), m.tree, [target.head]
            )
            self._write_journal(
                MergeJournal(
                    ref=target.ref,
                    old=str(target.head),
                    new=str(new),
                    started_at=time.time(),
                    pid=os.getpid(),
                )
            )
            swapped = self._compare_and_swap(target.ref, new, target.head, cand)
            if swapped is not True:
                self._clear_journal()
                if swapped is not False:
                    return self._skipped(cand, m, swapped)
                continue  # the branch moved since we read it: merge again on the new head
            problem, restored = self._bring_forward(pyrepo, target.head, new, m.changed)
            if problem is None:
                self._clear_journal()
                return JoinOutcome(
                    agent_id=cand.agent_id,
                    outcome=MergeOutcome.MERGED,
                    commit=str(new),
                    diffstat=m.diffstat,
                    stale_reads=stale.stale_reads if stale is not None else [],
                    reason=None
                    if stale is None
                    else f"merged although stale (accept_stale): {stale.reason}",
                )
            undone = self._compare_and_swap(target.ref, target.head, new, cand, undo=True)
            self._clear_journal()
            if undone is True:
                if restored:
                    return self._skipped(
                        cand,
                        m,
                        "your checkout could not be brought forward, so the merge was undone "
                        f"(nothing changed): {problem}",
                    )
                return self._skipped(
                    cand,
                    m,
                    "your checkout could not be brought forward, so the merge was undone, but "
                    f"git had already written some of its files and not all could be put back "
                    f"({problem}); run `git status` and `git checkout -- <path>` for what it "
                    "shows changed",
                )
            return JoinOutcome(
                agent_id=cand.agent_id,
                outcome=MergeOutcome.MERGED,
                commit=str(new),
                reason="merged, but your checkout could not be brought forward and the branch "
                f"moved again since: {problem}; run `git status` and check your working tree",
                diffstat=m.diffstat,
            )
        return self._skipped(
            cand,
            m,
            f"the canonical branch kept moving during {self._max_attempts} attempts; "
            "merge again when it is quiet",
        )

    def _compare_and_swap(
        self,
        ref: str,
        new: pygit2.Oid,
        old: pygit2.Oid,
        cand: JoinCandidate,
        *,
        undo: bool = False,
    ) -> bool | str:
        """True when the ref moved from `old` to `new`; False when it had moved elsewhere; else
        why git refused (a lock file held by another git command)."""
        action = "undo merge of" if undo else "merge"
        args = ["update-ref", "-m", f"fanout: {action} agent {cand.agent_id}"]
        if ref == "HEAD":
            args.append("--no-deref")
        proc = run_git(self._repo.root, *args, ref, str(new), str(old), check=False)
        if proc.returncode == 0:
            return True
        if ".lock" in proc.stderr and "exists" in proc.stderr:
            lock = re.search(r"'([^']+\.lock)'", proc.stderr)
            named = lock.group(1) if lock else "a .lock file under .git"
            return (
                f"git could not lock {ref}: {named} exists. Another git command is running, or "
                "one was killed; if none is running, delete that file and merge again"
            )
        return False

    def _bring_forward(
        self, pyrepo: pygit2.Repository, old: pygit2.Oid, new: pygit2.Oid, changed: Sequence[str]
    ) -> tuple[str | None, bool]:
        """Move the user's index and working tree from `old` to `new` (`changed`: the paths
        where they differ); (None, True), or (git's complaint, whether the working tree is as
        it was before).

        `read-tree -m -u` (two-tree form) only touches paths that differ between the trees and
        refuses to overwrite local changes or untracked files. It checks before it writes, but
        a write can still fail midway (a name or link target the file system refuses, a full
        disk): the files written by then are put back as `old` has them (`_put_back`).
        """
        root = self._repo.root
        proc = run_git(root, "read-tree", "-m", "-u", str(old), str(new), check=False)
        if proc.returncode == 0:
            return None, True
        restored = self._put_back(pyrepo, old, new, changed)
        run_git(root, "update-index", "-q", "--refresh", check=False)
        proc = run_git(root, "read-tree", "-m", "-u", str(old), str(new), check=False)
        if proc.returncode == 0:
            return None, True
        restored = self._put_back(pyrepo, old, new, changed) and restored
        return proc.stderr.strip() or f"git read-tree exited with {proc.returncode}", restored

    def _put_back(
        self, pyrepo: pygit2.Repository, old: pygit2.Oid, new: pygit2.Oid, changed: Sequence[str]
    ) -> bool:
        """After a failed `read-tree -m -u old new`: each of `changed` that git had already
        written as `new` has it (or removed) is put back as `old` has it; whether every one of
        them is clean now.

        The failed command left the index as it was. A path holding anything but `new`'s
        content is left alone: git had refused before writing, and what stands there is the
        user's."""
        root = self._repo.root
        old_tree = pyrepo[old].peel(pygit2.Tree)
        new_tree = pyrepo[new].peel(pygit2.Tree)
        back: list[str] = []
        for path in sorted(changed, key=lambda p: p.count("/"), reverse=True):
            full = os.path.join(root, path)
            if _entry_id(old_tree, path) is not None:
                if not os.path.lexists(full) or _holds(full, new_tree, path):
                    back.append(path)
                continue
            if not _holds(full, new_tree, path):
                continue
            try:
                os.unlink(full)
            except OSError:
                continue
            parent = os.path.dirname(path)
            while parent and not _is_dir_in(old_tree, parent):
                try:
                    os.rmdir(os.path.join(root, parent))
                except OSError:
                    break
                parent = os.path.dirname(parent)
        if back:
            run_git(
                root,
                "checkout-index",
                "-f",
                "-q",
                "-z",
                "--stdin",
                input="\0".join(back) + "\0",
                check=False,
            )
        # (the branch may already name `new`: what is staged against it is the index of `old`)
        return not _dirty_overlap(root, changed, staged=False)


def _holds(full: str, tree: pygit2.Tree, path: str) -> bool:
    """Whether the file at `full` is `tree`'s blob at `path`, byte for byte (a link, its
    target)."""
    try:
        entry = tree[path]
        info = os.lstat(full)
    except (KeyError, ValueError, OSError):
        return False
    if not isinstance(entry, pygit2.Blob):
        return False
    if stat.S_ISLNK(info.st_mode):
        if entry.filemode != pygit2.enums.FileMode.LINK:
            return False
        try:
            return os.readlink(os.fsencode(full)) == entry.data
        except OSError:
            return False
    if not stat.S_ISREG(info.st_mode) or entry.filemode == pygit2.enums.FileMode.LINK:
        return False
    if info.st_size != entry.size:
        return False
    try:
        with open(full, "rb") as file:
            return file.read() == entry.data
    except OSError:
        return False


def _is_dir_in(tree: pygit2.Tree, path: str) -> bool:
    try:
        return is_tree(tree[path])
    except (KeyError, ValueError):
        return False


# ---------------------------------------------------------------------- conflict text


def _entry_id(tree: pygit2.Tree, path: str) -> pygit2.Oid | None:
    try:
        return tree[path].id
    except (KeyError, ValueError):
        return None


def _stale(
    pyrepo: pygit2.Repository,
    cand: JoinCandidate,
    base: pygit2.Tree,
    head: pygit2.Tree,
    *,
    m: _Merge,
    readers: _Readers,
) -> JoinOutcome | None:
    """Why the candidate would make a head that line merges cannot vouch for, if it would:
    it read files that changed on the branch since its base, or it changes files that an agent
    merged after its base read (that agent built on the old version)."""
    outdated = sorted(p for p in cand.reads if _entry_id(base, p) != _entry_id(head, p))
    reasons: list[str] = []
    if outdated:
        merged = [*readers.earlier, *readers.landed]
        by: list[str] = []
        for path in outdated:
            names = [r.name for r in merged if path in r.changed]
            by.append(f"{path} (by {', '.join(names)})" if names else path)
        reasons.append("it read files changed on the branch since its base: " + "; ".join(by))
    pulled: list[str] = []
    changes = set(m.changed)
    for reader in [*readers.earlier, *readers.landed]:
        if reader.agent_id == cand.agent_id or not reader.reads & changes:
            continue
        if reader.commit is not None and reader in readers.earlier:
            try:
                if pyrepo.descendant_of(cand.base_commit, reader.commit):
                    continue  # merged before this agent started: it built on that work
            except (KeyError, ValueError, pygit2.GitError):
                pass
        paths = sorted(reader.reads & changes)
        pulled.extend(paths)
        reasons.append(f"it changes {', '.join(paths)}, which {reader.name} read and was merged")
    if not reasons:
        return None
    commands = (
        " It also ran commands, which read files the bus does not see: a verification command "
        "covers those."
        if cand.ran_commands
        else ""
    )
    return JoinOutcome(
        agent_id=cand.agent_id,
        outcome=MergeOutcome.STALE,
        stale_reads=sorted(set(outdated) | set(pulled)),
        reason="; ".join(reasons)
        + ". Its branch is kept: rerun_subagent shows it the new versions (or merge with "
        "accept_stale)." + commands,
        diffstat=m.diffstat,
    )


def conflict_diff(repo: GitRepo, candidate: JoinCandidate, *, head: str | None = None) -> str:
    """The conflicting files of merging `candidate` onto `head`, with diff3 conflict markers."""
    pyrepo = repo.open()
    try:
        head_rev = head or repo.canonical_ref()
        ours = _tree(pyrepo, head_rev)
        base = _tree(pyrepo, candidate.base_commit)
        theirs = _tree(pyrepo, candidate.commit)
        if ours is None or base is None or theirs is None:
            raise MergeError(f"a commit of agent {candidate.agent_id} or {head_rev} is missing")
        index = pyrepo.merge_trees(base, ours, theirs)
        conflicts = index.conflicts
        if conflicts is None:
            return ""
        ours_label = f"canonical {str(pyrepo.revparse_single(head_rev).id)[:12]}"
        labels = (ours_label, f"base {candidate.base_commit[:12]}", f"agent {candidate.name}")
        parts: list[str] = []
        for entries in conflicts:  # pyright: ignore[reportUnknownVariableType]
            ancestor, our, their = entries  # pyright: ignore[reportUnknownVariableType]
            blobs = [
                _blob(pyrepo, e)  # pyright: ignore[reportUnknownArgumentType]
                for e in (our, ancestor, their)  # pyright: ignore[reportUnknownVariableType]
            ]
            path = next(str(e.path) for e in (our, their, ancestor) if e is not None)  # pyright: ignore[reportUnknownMemberType, reportUnknownArgumentType, reportUnknownVariableType]
            parts.append(_conflict_text(repo, path, blobs, labels))
        return "".join(parts)
    finally:
        pyrepo.free()


def _blob(pyrepo: pygit2.Repository, entry: pygit2.IndexEntry | None) -> bytes | None:
    if entry is None:
        return None
    return pyrepo[entry.id].peel(pygit2.Blob).data


def _conflict_text(
    repo: GitRepo, path: str, blobs: Sequence[bytes | None], labels: tuple[str, str, str]
) -> str:
    ours, base, theirs = blobs
    state = (
        "deleted on the canonical branch, changed by the agent"
        if ours is None
        else "deleted by the agent, changed on the canonical branch"
        if theirs is None
        else "added on both sides"
        if base is None
        else "changed on both sides"
    )
    header = f"=== conflict in {path}: {state}\n"
    if any(b is not None and b"\0" in b[:8000] for b in blobs):
        return header + "(binary file: no conflict markers)\n\n"
    tmp = Path(tempfile.mkdtemp(prefix="conflict-", dir=repo.state_dir))
    try:
        files: list[str] = []
        for name, data in zip(("ours", "base", "theirs"), blobs, strict=True):
            f = tmp / name
            f.write_bytes(data or b"")
            files.append(str(f))
        proc = gitcmd.run_bytes(
            tmp,
            [
                "merge-file",
                "-p",
                "--diff3",
                "-L",
                labels[0] + ("" if ours is not None else " (deleted)"),
                "-L",
                labels[1],
                "-L",
                labels[2] + ("" if theirs is not None else " (deleted)"),
                *files,
            ],
        )
        body = proc.stdout.decode("utf-8", errors="replace")
    finally:
        for f in tmp.iterdir():
            f.unlink()
        os.rmdir(tmp)
    return header + body + ("" if body.endswith("\n") else "\n") + "\n"
