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
import functools
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

from toolbus.trees import remove_tree

log = logging.getLogger(__name__)

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_MNT_DETACH = 2

OVERLAY = "overlay"
FUSE = "fuse-overlayfs"
WORKTREE = "worktree"
DRIVERS = (OVERLAY, FUSE)
"""The ways to mount a view, in the order they are tried: the kernel's overlayfs, then
fuse-overlayfs (a program: where the kernel refuses, say on a filesystem overlayfs cannot use
as an upper layer)."""

_state: dict[str, str | None] = {}
_probes: dict[tuple[str, str | None], ViewSupport] = {}
_probe_lock = threading.Lock()
_daemons: dict[str, subprocess.Popen[bytes]] = {}
_mounted: set[str] = set()
_mounted_lock = threading.Lock()
_daemons_lock = threading.Lock()
FUSE_MOUNT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ViewSupport:
    """What kind of workspace the server makes in a repository: `overlay` (a copy-on-write
    view) or `worktree` (a full checkout), and why, in a line a user can act on."""

    kind: str
    note: str


@functools.cache
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


def mount_view(driver: str, lowers: Sequence[Path], upper: Path, work: Path, target: Path) -> None:
    """Mount `lowers` (uppermost first) with `upper` and `work` at `target` by `driver`."""
    if driver == FUSE:
        mount_fuse_overlay(lowers, upper, work, target)
    else:
        mount_overlay(lowers, upper, work, target)
    with _mounted_lock:
        _mounted.add(os.path.abspath(target))


@contextlib.contextmanager
def _layer_options(
    lowers: Sequence[Path], upper: Path, work: Path
) -> Generator[tuple[str, list[int]]]:
    """Overlay options naming the layers by open descriptors (`/proc/self/fd/N`, so any
    character in their paths is safe in the options), and the descriptors, open until the
    block ends."""
    fds: list[int] = []
    try:
        for layer in (*lowers, upper, work):
            fds.append(os.open(layer, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        names = [f"/proc/self/fd/{fd}" for fd in fds]
        lower = ":".join(names[: len(lowers)])
        yield f"lowerdir={lower},upperdir={names[-2]},workdir={names[-1]}", fds
    finally:
        for fd in fds:
            os.close(fd)


def mount_fuse_overlay(lowers: Sequence[Path], upper: Path, work: Path, target: Path) -> None:
    """The same view by fuse-overlayfs, a daemon of this process's: it runs under a shell that
    stops it when its standard input closes, so it ends with its view's unmount, or with the
    server, however the server ends."""
    exe = shutil.which("fuse-overlayfs")
    if exe is None:
        raise OSError(errno.ENOENT, "fuse-overlayfs is not installed")
    with tempfile.TemporaryFile() as log_file, _layer_options(lowers, upper, work) as named:
        options, fds = named
        daemon = subprocess.Popen(
            [
                "/bin/sh",
                "-c",
                '"$0" -f -o "$1" "$2" & pid=$!; read -r _; kill "$pid" 2>/dev/null; wait "$pid"',
                exe,
                options,
                str(target),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            pass_fds=fds,
        )
        deadline = time.monotonic() + FUSE_MOUNT_TIMEOUT_S
        while not os.path.ismount(target):
            if daemon.poll() is not None or time.monotonic() > deadline:
                _stop(daemon)
                log_file.seek(0)
                err = log_file.read().decode(errors="replace").strip()
                raise OSError(errno.EIO, f"fuse-overlayfs did not mount {target}: {err[-300:]}")
            time.sleep(0.005)
    with _daemons_lock:
        _daemons[str(target)] = daemon


def _stop(daemon: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(OSError):
        if daemon.stdin is not None:
            daemon.stdin.close()
    try:
        daemon.wait(5)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()


def mount_overlay(lowers: Sequence[Path], upper: Path, work: Path, target: Path) -> None:
    """Mount an overlay of `lowers` (uppermost first) with `upper` and `work` at `target`."""
    with _layer_options(lowers, upper, work) as (options, _fds):
        data = (options + ",userxattr").encode("ascii")
        if _libc().mount(b"overlay", os.fsencode(str(target)), b"overlay", 0, data) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"overlay mount at {target}: {os.strerror(err)}")


def unmount(target: Path) -> bool:
    """Detach whatever is mounted at `target` (and below it), and stop the daemons that served
    it; False when nothing was mounted."""
    done = _libc().umount2(os.fsencode(str(target)), _MNT_DETACH) == 0
    err = ctypes.get_errno()
    prefix = str(target).rstrip("/")
    absolute = os.path.abspath(target)
    with _mounted_lock:
        for point in [p for p in _mounted if p == absolute or p.startswith(absolute + "/")]:
            _mounted.discard(point)
    with _daemons_lock:
        served = [
            _daemons.pop(key)
            for key in list(_daemons)
            if key == prefix or key.startswith(prefix + "/")
        ]
    for daemon in served:
        _stop(daemon)
    if not done:
        if err in (errno.EINVAL, errno.ENOENT):
            return False
        raise OSError(err, f"unmount {target}: {os.strerror(err)}")
    return True


def unmount_below(root: Path) -> int:
    """Detach every mount at or below `root` in this process's namespace (deepest first), so
    that deleting `root` deletes the layers, not the views' contents through them. Returns how
    many were mounted."""
    prefix = os.path.realpath(root).rstrip("/")
    points: list[str] = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo", encoding="utf-8") as info:
        for line in info:
            fields = line.split()
            if len(fields) < 5:
                continue
            # mountinfo escapes space, tab, newline and backslash as octal
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    done = 0
    for point in sorted(set(points), key=len, reverse=True):
        with contextlib.suppress(OSError):
            done += unmount(Path(point))
    return done


def mounted_views() -> list[Path]:
    """The mount points of the views this process mounted and has not unmounted."""
    with _mounted_lock:
        return [Path(p) for p in sorted(_mounted)]


def is_mounted(path: Path) -> bool:
    """Whether this process mounted a view at `path` (in its private namespace, only it mounts
    anything under a state dir, so its own record is the truth; no system call needed)."""
    with _mounted_lock:
        return os.path.abspath(path) in _mounted


def is_whiteout(st: os.stat_result) -> bool:
    """An overlay whiteout: a character device numbered 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


OPAQUE_XATTRS = ("user.overlay.opaque", "trusted.overlay.opaque", "user.fuseoverlayfs.opaque")
OPAQUE_MARK = ".wh..wh..opq"
"""The file fuse-overlayfs leaves in an opaque directory (beside a `.wh..opq` device)."""
WHITEOUT_PREFIX = ".wh."
"""fuse-overlayfs's names for its own marks, and for whiteouts where it cannot make a device.
Only its layers hold them as marks: it refuses such names through its mount, while the
kernel's overlayfs takes them as ordinary names (its marks are devices and attributes)."""


def is_opaque(path: Path | str, driver: str) -> bool:
    """A directory of an upper layer of `driver` that hides what the lower layers hold
    under it."""
    try:
        # one call for the names most directories lack, instead of one per name
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        names = []
    for name in OPAQUE_XATTRS:
        if name in names:
            with contextlib.suppress(OSError):
                if os.getxattr(path, name, follow_symlinks=False) == b"y":
                    return True
    return driver == FUSE and os.path.lexists(os.path.join(path, OPAQUE_MARK))


def remove_layer(path: Path) -> None:
    """Delete a layer's directory, including overlayfs's unreadable `work/work`, the
    directories an agent made unwritable and trees of any depth (`toolbus.trees.remove_tree`:
    a link or hard link to a file of the user's there is unlinked, never given a new mode).
    What cannot be deleted is logged and left."""
    try:
        remove_tree(path)
    except OSError as exc:
        log.warning("could not remove %s entirely: %s", path, exc)


def probe_overlay(scratch_parent: Path, driver: str | None = None) -> ViewSupport:
    """Whether this process can make copy-on-write views under `scratch_parent`, by `driver` or
    by the first of `DRIVERS` that works (tried once per directory: a real mount, a write, a
    deletion)."""
    key = (str(scratch_parent), driver)
    with _probe_lock:
        known = _probes.get(key)
        if known is None:
            known = _probe(scratch_parent, driver)
            _probes[key] = known
    return known


def _probe(parent: Path, driver: str | None) -> ViewSupport:
    if not in_private_mounts():
        reason = _state.get("entered", "the server did not enter a private mount namespace")
        return ViewSupport(WORKTREE, f"git worktrees: no copy-on-write views ({reason})")
    failures: list[str] = []
    for candidate in (driver,) if driver else DRIVERS:
        problem = _trial(parent, candidate)
        if problem is None:
            how = "overlayfs" if candidate == OVERLAY else "fuse-overlayfs"
            return ViewSupport(candidate, f"copy-on-write views ({how} in the server's namespace)")
        failures.append(f"{candidate}: {problem}")
    return ViewSupport(
        WORKTREE, "git worktrees: no copy-on-write views (" + "; ".join(failures) + ")"
    )


def _trial(parent: Path, driver: str) -> str | None:
    """None when a view mounted by `driver` under `parent` reads, writes and deletes as it must;
    else what went wrong."""
    scratch = parent / f".probe-{os.getpid()}-{threading.get_ident()}-{driver}"
    try:
        lower, upper, work, merged = (scratch / n for n in ("lower", "upper", "work", "view"))
        for d in (lower, upper, work, merged):
            d.mkdir(parents=True, exist_ok=True)
        (lower / "kept").write_bytes(b"x")
        (lower / "gone").write_bytes(b"x")
        mount_view(driver, [lower], upper, work, merged)
        try:
            (merged / "new").write_bytes(b"y")
            (merged / "gone").unlink()
            ok = (merged / "kept").read_bytes() == b"x" and is_whiteout(os.lstat(upper / "gone"))
        finally:
            unmount(merged)
        return None if ok else "a trial mount misbehaved"
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        remove_layer(scratch)
