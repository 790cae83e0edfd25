"""Copy-on-write views: this process's private mount namespace and the overlay mounts in it.

A server enters its own user and mount namespace once, at start-up, before any thread runs
(`enter_private_mounts`): there it may mount overlayfs without root (Linux lets the owner of a
user namespace mount overlayfs in a mount namespace it owns), nobody else sees its mounts, and
they vanish with the process, so a killed server leaves nothing mounted. The layers themselves
are plain directories under the state dir and outlive it, for recovery.

`probe_overlay` tries a real mount on the state dir's filesystem once per directory and says
which kind of workspace the server can make there, and why not when it cannot.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_MNT_DETACH = 2

OVERLAY = "overlay"
WORKTREE = "worktree"

_state: dict[str, str | None] = {}
_probes: dict[str, ViewSupport] = {}
_probe_lock = threading.Lock()


@dataclass(frozen=True)
class ViewSupport:
    """What kind of workspace the server makes in a repository: `overlay` (a copy-on-write
    view) or `worktree` (a full checkout), and why, in a line a user can act on."""

    kind: str
    note: str


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def enter_private_mounts() -> str | None:
    """Move this process into a user and mount namespace of its own, mapping its uid and gid to
    themselves. Call it first thing in `main`, before any thread starts (the kernel refuses a
    new user namespace to a threaded process). Returns None when done (or done before), else
    why not; never raises. `FANOUT_WORKSPACES=worktree` skips it."""
    if "entered" in _state:
        return _state["entered"]
    reason = _enter()
    _state["entered"] = reason
    if reason is not None:
        log.info("no private mount namespace: %s", reason)
    return reason


def _enter() -> str | None:
    if os.environ.get("FANOUT_WORKSPACES", "").strip().lower() == WORKTREE:
        return "FANOUT_WORKSPACES=worktree"
    if not os.path.exists("/proc/self/uid_map"):
        return "this system has no user namespaces (not Linux?)"
    if threading.active_count() > 1:
        return "threads were running before the server could enter its namespace"
    uid, gid = os.getuid(), os.getgid()
    libc = _libc()
    if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        return f"the kernel refused a user namespace ({os.strerror(err)})"
    try:
        # Own ids only, as an unprivileged user may map them; the kernel lets such a namespace
        # mount overlayfs (with a wider map it refuses).
        Path("/proc/self/setgroups").write_text("deny", encoding="ascii")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1\n", encoding="ascii")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1\n", encoding="ascii")
    except OSError as exc:
        return f"could not map this user into its namespace ({exc.strerror})"
    if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        err = ctypes.get_errno()
        return f"could not make the namespace's mounts private ({os.strerror(err)})"
    return None


def in_private_mounts() -> bool:
    """Whether `enter_private_mounts` succeeded in this process."""
    return "entered" in _state and _state["entered"] is None


def mount_overlay(lowers: Sequence[Path], upper: Path, work: Path, target: Path) -> None:
    """Mount an overlay of `lowers` (uppermost first) with `upper` and `work` at `target`.
    The layers are named by open descriptors (`/proc/self/fd/N`), so any character in their
    paths is safe in the mount options."""
    fds: list[int] = []
    try:
        for layer in (*lowers, upper, work):
            fds.append(os.open(layer, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        names = [f"/proc/self/fd/{fd}" for fd in fds]
        lower = ":".join(names[: len(lowers)])
        options = f"lowerdir={lower},upperdir={names[-2]},workdir={names[-1]},userxattr"
        libc = _libc()
        if (
            libc.mount(b"overlay", os.fsencode(str(target)), b"overlay", 0, options.encode("ascii"))
            != 0
        ):
            err = ctypes.get_errno()
            raise OSError(err, f"overlay mount at {target}: {os.strerror(err)}")
    finally:
        for fd in fds:
            os.close(fd)


def unmount(target: Path) -> bool:
    """Detach whatever is mounted at `target` (and below it); False when nothing was."""
    if _libc().umount2(os.fsencode(str(target)), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return False
        raise OSError(err, f"unmount {target}: {os.strerror(err)}")
    return True


def is_mounted(path: Path) -> bool:
    """Whether something is mounted at `path` in this process's namespace."""
    try:
        return os.path.ismount(path)
    except OSError:
        return False


def is_whiteout(st: os.stat_result) -> bool:
    """An overlay whiteout: a character device numbered 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque(path: Path) -> bool:
    """A directory of an upper layer that hides what the lower layers hold under it."""
    for name in ("user.overlay.opaque", "trusted.overlay.opaque"):
        with contextlib.suppress(OSError):
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
    return False


def remove_layer(path: Path) -> None:
    """Delete a layer's directory, including overlayfs's unreadable `work/work`."""
    if not os.path.lexists(path):
        return

    def unlock(func: object, target: str, _exc: object) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(target), 0o700)
            os.chmod(target, 0o700)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(target)

    shutil.rmtree(path, onerror=unlock)


def probe_overlay(scratch_parent: Path) -> ViewSupport:
    """Whether this process can make copy-on-write views under `scratch_parent` (tried once per
    directory: a real mount, a write, a deletion)."""
    key = str(scratch_parent)
    with _probe_lock:
        known = _probes.get(key)
        if known is None:
            known = _probe(scratch_parent)
            _probes[key] = known
    return known


def _probe(parent: Path) -> ViewSupport:
    if not in_private_mounts():
        reason = _state.get("entered", "the server did not enter a private mount namespace")
        return ViewSupport(WORKTREE, f"git worktrees: no copy-on-write views ({reason})")
    scratch = parent / f".probe-{os.getpid()}-{threading.get_ident()}"
    try:
        lower, upper, work, merged = (scratch / n for n in ("lower", "upper", "work", "view"))
        for d in (lower, upper, work, merged):
            d.mkdir(parents=True, exist_ok=True)
        (lower / "kept").write_bytes(b"x")
        (lower / "gone").write_bytes(b"x")
        mount_overlay([lower], upper, work, merged)
        try:
            (merged / "new").write_bytes(b"y")
            (merged / "gone").unlink()
            ok = (merged / "kept").read_bytes() == b"x" and is_whiteout(os.lstat(upper / "gone"))
        finally:
            unmount(merged)
        if not ok:
            return ViewSupport(WORKTREE, "git worktrees: overlayfs misbehaved in a trial mount")
        return ViewSupport(OVERLAY, "copy-on-write views (overlayfs in the server's namespace)")
    except OSError as exc:
        return ViewSupport(
            WORKTREE, f"git worktrees: overlayfs refused on this filesystem ({exc.strerror})"
        )
    finally:
        remove_layer(scratch)
