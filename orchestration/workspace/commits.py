"""Committing an agent's work on its branch: in-scope changes committed, the rest dropped."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from pathlib import Path

import pygit2

from orchestration.errors import RepositoryError
from orchestration.workspace.engine import CommitJob, GitEngine, WorkCommit, WouldBlock
from orchestration.workspace.engines import DEFAULT_ENGINE
from orchestration.workspace.git import FANOUT_IDENTITY, Identity
from orchestration.workspace.layered import (
    CommitHandle,
    UpperListing,
    ViewTree,
    commit_view,
    ensure_mounted,
    layer_of,
    quick_upper,
    registration_held,
    view_commit_handle,
    view_git_dir,
    view_tree,
)
from orchestration.workspace.pinning import (
    Workspace,
    lists_secured,
    open_workspace_repo,
    pin_and_open,
    pin_and_open_view,
    secure_workspace_git,
)
from toolbus.fileops import remove_partial_writes
from toolbus.gitcmd import Pinned
from toolbus.resources import WriteScope


def commit_workspace(
    ws: Workspace,
    *,
    message: str,
    write_scope: WriteScope,
    author: Identity = FANOUT_IDENTITY,
    engine: GitEngine = DEFAULT_ENGINE,
    wait: bool = True,
    keep_working: bool = False,
    prepared: PreparedCommit | None = None,
) -> WorkCommit:
    """Commit the agent's in-scope changes on its branch; out-of-scope ones stay on disk, dropped.

    The commit's tree is the base outside the write scope and the working tree inside it, so
    nothing out of scope reaches the branch, even if the agent ran git itself. Calling it again
    commits later edits on top. Git works on the workspace only pinned to its recorded git dir,
    after any `.git` the agent planted is moved out (`secure_workspace_git`).

    Not `wait`: raises `WouldBlock`, having changed nothing, unless the commit is quick
    (`quick_upper`), so that the event loop can make it without a hop to a thread.

    `keep_working`: the agent goes on in the workspace (a checkpoint), so a view's index
    follows the commit too; a worktree's always does.

    `prepared`: the commit made ahead by `prepare_commit` with this scope, of a view whose
    caller knows it unchanged since; used (and closed) when the branch has not moved since.

    The user's files copied or laid into the workspace (`ws.included`) are never committed.
    """
    if ws.included:
        write_scope = write_scope.without(ws.included)
    if prepared is not None:
        try:
            made = prepared.finish(message)
        finally:
            prepared.close()
        if made is not None:
            return made
    layers = layer_of(ws)  # a copy-on-write view: its upper layer holds the agent's work
    listing = None if wait or layers is None else quick_upper(layers, ws.base_commit)
    if not wait and listing is None:
        raise WouldBlock(f"committing {ws.path} may take a while")
    if layers is not None:
        ensure_mounted(ws)
    # a view stays registered or not until its commit is made; a worktree always is registered
    held = (
        registration_held(ws, wait=wait)
        if layers is not None
        else contextlib.nullcontext(enter_result=True)
    )
    with held as registered:
        # one libgit2 handle for the pinned configuration and the commit: opened, as `pin`
        # opens it to read that configuration, before `secure_workspace_git`; it reads the
        # workspace's files only afterwards. A view that git never worked in is committed
        # through the repository's git dir, its work tree the view.
        opened: pygit2.Repository | None
        shared, plain, config = False, frozenset[str](), None
        if registered:
            pinned, opened = pin_and_open(ws.path)
        else:
            if not ws.branch:
                raise RepositoryError(f"the view {ws.path} has no branch recorded; rerun the agent")
            (pinned, opened, plain, config), shared = _open_view(ws, layers, listing)
        try:
            upper = layers / "upper" if layers else None
            planted = secure_workspace_git(pinned, upper=upper, gitfile=registered, listing=listing)
        except BaseException:
            if opened is not None:
                _release(opened, shared)
            raise
        pyrepo = opened if opened is not None else open_workspace_repo(pinned)
        try:
            job = _commit_job(
                ws,
                pyrepo,
                pinned,
                write_scope=write_scope,
                message=message,
                author=author,
                shared_handle=shared,
                plain_paths=plain,
                config=config,
            )
            parent = str(job.head.id)
            if layers is not None:
                # a view's index is in its registration: one not registered gets its index
                # from the branch when it is
                done = commit_view(
                    job, layers, keep_working=keep_working and registered, listing=listing
                )
            else:
                done = engine.commit(job)
        finally:
            _release(pyrepo, shared)
    if done is None:
        raise RepositoryError(f"no git engine committed the work of the workspace {ws.path}")
    return done.model_copy(update={"planted": planted, "parent": parent})


def _open_view(
    ws: Workspace, layers: Path | None, listing: UpperListing | None
) -> tuple[CommitHandle, bool]:
    """What a view not registered is committed through, and whether its libgit2 handle is its
    base's kept one (`view_commit_handle`, for a quick commit: `listing`), never freed by its
    user; else one opened on the view."""
    if layers is not None and listing is not None:
        kept = view_commit_handle(ws, layers, listing)
        if kept is not None:
            return kept, True
    pinned, handle = pin_and_open_view(view_git_dir(ws.path), ws.path)
    return CommitHandle(pinned, handle, frozenset(), None), False


def _release(pyrepo: pygit2.Repository, shared: bool) -> None:
    """Free a handle opened for one commit; a base's kept one stays (`_open_view`)."""
    if not shared:
        pyrepo.free()


def _commit_job(
    ws: Workspace,
    pyrepo: pygit2.Repository,
    pinned: Pinned,
    *,
    write_scope: WriteScope,
    message: str,
    author: Identity,
    shared_handle: bool = False,
    plain_paths: frozenset[str] = frozenset(),
    config: pygit2.Config | None = None,
) -> CommitJob:
    """The job of committing the workspace's work through `pyrepo`: on its branch, even if the
    agent moved HEAD (HEAD for a workspace without one), on top of its head as it stands.
    `shared_handle`: `pyrepo` is a kept handle (`view_commit_handle`); `plain_paths`: the
    paths it found no attribute applies to; `config`: the snapshot of its configuration."""
    ref = ws.branch_ref if ws.branch else "HEAD"
    try:
        head = pyrepo.revparse_single(ref).peel(pygit2.Commit)
    except (KeyError, ValueError, pygit2.GitError) as exc:
        raise RepositoryError(
            f"{ref} of the workspace {pinned.work_tree} names no commit: {exc}"
        ) from exc
    return CommitJob(
        pyrepo=pyrepo,
        pinned=pinned,
        ref=ref,
        head=head,
        base=ws.base_commit or str(head.id),
        write_scope=write_scope,
        message=message,
        author=author,
        shared_handle=shared_handle,
        plain_paths=plain_paths,
        config=config,
    )


def clear_partial_writes(ws: Workspace) -> list[str]:
    """Delete the temporary files of writes a killed server never renamed into place (the
    files they replaced are intact), so the commit of the agent's work never holds them; a view
    is mounted first, since its files show only through the mount. The paths deleted."""
    ensure_mounted(ws)
    return remove_partial_writes(ws.path)


@dataclasses.dataclass
class PreparedCommit:
    """A view's commit made ahead of its message (`prepare_commit`): its tree written, and the
    handle that wrote it kept open until `finish` or `close` (a kept one, `job.shared_handle`,
    is used only by the thread that keeps it)."""

    job: CommitJob
    layers: Path
    made: ViewTree
    planted: list[str]
    thread: int = dataclasses.field(default_factory=threading.get_ident)
    _open: bool = True

    def finish(self, message: str) -> WorkCommit | None:
        """Commit the tree with `message`; None when the branch moved since it was made (or
        the handle was closed, or is another thread's), and the commit must be made anew."""
        if not self._open or (self.job.shared_handle and threading.get_ident() != self.thread):
            return None
        job = self.job
        try:
            head = job.pyrepo.revparse_single(job.ref).peel(pygit2.Commit)
        except (KeyError, ValueError, pygit2.GitError):
            return None
        if head.id != job.head.id:
            return None
        job = dataclasses.replace(job, message=message)
        done = commit_view(job, self.layers, made=self.made)
        return done.model_copy(update={"planted": self.planted, "parent": str(head.id)})

    def close(self) -> None:
        if self._open:
            self._open = False
            _release(self.job.pyrepo, self.job.shared_handle)


def prepare_commit(
    ws: Workspace, *, write_scope: WriteScope, author: Identity = FANOUT_IDENTITY
) -> PreparedCommit | None:
    """The commit of the view `ws` but for its message, made now: its tree written to the
    object store, no reference moved, so that `commit_workspace(prepared=...)` has only the
    commit object to make once the message is known, if the view is unchanged by then (its
    caller knows; the branch it checks). Only where the commit is quick (`quick_upper`), in a
    view not registered as a git worktree, whose upper layer holds neither a `.git` nor a rule
    file (`lists_secured`: what `secure_workspace_git` may move or remove); else None, and
    nothing is done."""
    if ws.included:  # (the user's files, copied in: never the agent's to commit)
        write_scope = write_scope.without(ws.included)
    layers = layer_of(ws)
    if layers is None or not ws.branch:
        return None
    listing = quick_upper(layers, ws.base_commit)
    if listing is None or lists_secured(listing):
        return None
    ensure_mounted(ws)
    try:
        with registration_held(ws, wait=False) as registered:
            if registered:
                return None
            (pinned, pyrepo, plain, config), shared = _open_view(ws, layers, listing)
            try:
                planted = secure_workspace_git(
                    pinned, upper=layers / "upper", gitfile=False, listing=listing
                )
                job = _commit_job(
                    ws,
                    pyrepo,
                    pinned,
                    write_scope=write_scope,
                    message="",
                    author=author,
                    shared_handle=shared,
                    plain_paths=plain,
                    config=config,
                )
                made = view_tree(job, layers, listing)
            except BaseException:
                _release(pyrepo, shared)
                raise
    except WouldBlock:
        return None
    return PreparedCommit(job=job, layers=layers, made=made, planted=planted)
