"""Limits of one command: processes (threads count), memory, and the mechanism enforcing them.

The mechanism is picked once per process, best first:

- `cgroup-v2`: a cgroup v2 tree the server may write whose `pids` and `memory` controllers are
  enabled for children (a delegated cgroup: the server's own, or its parent when the server sits
  in a leaf of a delegated subtree). One child cgroup per command.
- `cgroup-v1`: the `pids` and `memory` hierarchies of cgroup v1, writable (typically as root);
  one child per command in each, under the server's own cgroup of that hierarchy.
- `rlimits`: no cgroup to write. Memory is `RLIMIT_DATA` *per process*; processes are
  `RLIMIT_NPROC`, which counts every process of the user and does not bind root, so it is set
  to the user's current count plus the limit (a bound on a fork bomb, not an exact count).
- `none`: no limit applies (all limits set to 0, or no resource limits on this system).

A command joins its cgroups before it execs anything (a tiny `/bin/sh` wrapper writes its own pid
into `cgroup.procs`, then execs the sandbox), so every process it starts is counted. After the
command, the cgroup's event counters say whether it reached a limit; leftovers are killed and the
cgroup removed.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import re
import signal
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import anyio
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "AppliedLimits",
    "CommandLimits",
    "LimitMechanism",
    "LimitsProbe",
    "apply_limits",
    "probe_limits",
]

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
CGROUP_PREFIX = "fanout-"
# Joins the cgroups named by its arguments, then execs the rest: `sh -c JOIN fanout N dir... argv`
_JOIN = (
    'n=$1; shift; while [ "$n" -gt 0 ]; do '
    'echo $$ > "$1/cgroup.procs" || { echo "fanout: cannot enter the cgroup $1" >&2; exit 125; }; '
    'shift; n=$((n - 1)); done; exec "$@"'
)
# Sets the resource limits given (`-` for none), then execs the rest; bash for `ulimit -u`.
_ULIMIT = (
    '{ [ "$1" = - ] || ulimit -d "$1"; } && { [ "$2" = - ] || ulimit -u "$2"; } '
    '|| { echo "fanout: cannot set the resource limits" >&2; exit 125; }; shift 2; exec "$@"'
)


class LimitMechanism(StrEnum):
    """What enforces the limits of a command (see the module docstring)."""

    CGROUP_V2 = "cgroup-v2"
    CGROUP_V1 = "cgroup-v1"
    RLIMITS = "rlimits"
    NONE = "none"


class CommandLimits(BaseModel):
    """The limits of each command; 0 means no limit.

    Processes count threads too (the kernel's `pids` controller does): `cargo build`, a node or
    JVM build, or `pytest -n auto` run a few hundred tasks, so 1,024 leaves room while stopping a
    fork bomb long before the host's pid space. 4 GiB of memory fits a large link or a test suite
    that loads a model of the codebase; `/tmp` (a RAM tmpfs, counted in the memory under cgroups)
    gets 1 GiB, as does `/dev/shm`.
    """

    model_config = ConfigDict(frozen=True)

    max_processes: int = Field(default=1024, ge=0)
    max_memory_mb: int = Field(default=4096, ge=0)
    tmp_mb: int = Field(default=1024, ge=0)
    mechanism: LimitMechanism | None = None
    """`None`: the probe picks; else that one (tests, or a host where the probe's pick is wrong)."""

    @property
    def any(self) -> bool:
        return bool(self.max_processes or self.max_memory_mb)

    def describe(self) -> str:
        parts = [
            f"{self.max_processes} processes" if self.max_processes else "processes unlimited",
            f"{self.max_memory_mb} MiB memory" if self.max_memory_mb else "memory unlimited",
            f"{self.tmp_mb} MiB /tmp" if self.tmp_mb else "/tmp unsized",
        ]
        return ", ".join(parts)


@dataclass(frozen=True)
class LimitsProbe:
    """The mechanism this process uses, where its cgroups go, and why not a better one."""

    mechanism: LimitMechanism
    note: str
    """How the limits apply (or why cgroups are not used), for spawn's warnings."""
    parents: tuple[Path, ...] = ()
    """cgroup v2: the one parent; cgroup v1: the `pids` parent, then the `memory` parent."""


@dataclass
class AppliedLimits:
    """The limits of one running command: the argv wrapper, then `verdict` and `release`."""

    mechanism: LimitMechanism
    limits: CommandLimits
    prefix: tuple[str, ...] = ()
    cgroups: tuple[Path, ...] = ()
    warning: str | None = None

    def verdict(self) -> str | None:
        """Which limit the command reached, in words the model can act on; None when none."""
        if not self.cgroups:
            return None
        procs = mem = 0
        if self.mechanism is LimitMechanism.CGROUP_V2:
            procs = _counter(self.cgroups[0] / "pids.events", "max")
            mem = _counter(self.cgroups[0] / "memory.events", "oom_kill")
        elif self.mechanism is LimitMechanism.CGROUP_V1:
            procs = _counter(self.cgroups[0] / "pids.events", "max")
            memory = self.cgroups[1]
            mem = _counter(memory / "memory.oom_control", "oom_kill")
        found: list[str] = []
        if procs and self.limits.max_processes:
            found.append(
                f"the command reached its limit of {self.limits.max_processes} processes "
                f"(threads count): {procs} fork or thread creation(s) failed with EAGAIN; "
                "run fewer at once (e.g. fewer parallel jobs)"
            )
        if mem and self.limits.max_memory_mb:
            found.append(
                f"the command reached its memory limit of {self.limits.max_memory_mb} MiB "
                f"(files in its /tmp count too): {mem} process(es) were killed by the kernel "
                "(out of memory); use less memory at once"
            )
        return "; ".join(found) or None

    async def release(self) -> None:
        """Kill what is left in the command's cgroups, then remove them (bounded waits)."""
        for cgroup in self.cgroups:
            await _remove_cgroup(cgroup)


def _counter(path: Path, name: str) -> int:
    """The value of `name` in a flat-keyed cgroup file (`pids.events`, `memory.events`, ...)."""
    try:
        text = path.read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def _procs(cgroup: Path) -> list[int]:
    try:
        return [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


async def _remove_cgroup(cgroup: Path, limit_s: float = 5.0) -> None:
    with anyio.move_on_after(limit_s):
        while True:
            pids = _procs(cgroup)
            if pids and (cgroup / "cgroup.kill").exists():
                with contextlib.suppress(OSError):
                    (cgroup / "cgroup.kill").write_text("1")
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            try:
                cgroup.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                    logger.warning("cannot remove the command cgroup %s: %s", cgroup, exc)
                    return
            await anyio.sleep(0.01)
    logger.warning("the command cgroup %s still has processes; left in place", cgroup)


# --------------------------------------------------------------------------- the probe

_probe: dict[str, LimitsProbe] = {}
_names = itertools.count(1)


def probe_limits() -> LimitsProbe:
    """The mechanism of this process (picked once, then cached)."""
    if "probe" not in _probe:
        _probe["probe"] = _pick()
        logger.info("command limits: %s (%s)", _probe["probe"].mechanism, _probe["probe"].note)
    return _probe["probe"]


@dataclass(frozen=True)
class _Mount:
    root: str
    point: Path
    fstype: str
    options: frozenset[str]


def _mounts() -> list[_Mount]:
    found: list[_Mount] = []
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return found
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        point = fields[4].replace("\\040", " ")
        found.append(_Mount(fields[3], Path(point), tail[0], frozenset(tail[2].split(","))))
    return found


def _own_cgroups() -> dict[str, str]:
    """Controller name (`""` for cgroup v2) -> this process's cgroup path."""
    own: dict[str, str] = {}
    try:
        text = Path("/proc/self/cgroup").read_text()
    except OSError:
        return own
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(",") if parts[1] else [""]:
            own[controller] = parts[2]
    return own


def _dir_of(mount: _Mount, path: str) -> Path:
    """Where a cgroup path (relative to the hierarchy root) is under a mount of it."""
    root = mount.root.rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        path = path[len(root) :]
    return mount.point / path.lstrip("/")


def _try_child(parent: Path, files: dict[str, str]) -> str | None:
    """Make and remove a trial child cgroup under `parent`; None when it works, else why."""
    trial = parent / f"{CGROUP_PREFIX}probe-{os.getpid()}"
    try:
        trial.mkdir()
    except OSError as exc:
        return f"cannot create a cgroup under {parent}: {exc.strerror}"
    problem = None
    for name, value in files.items():
        try:
            (trial / name).write_text(value)
        except OSError as exc:
            problem = f"cannot set {name} under {parent}: {exc.strerror}"
            break
    with contextlib.suppress(OSError):
        trial.rmdir()
    return problem


def _cgroup_v2(mounts: list[_Mount], own: dict[str, str]) -> tuple[Path | None, str]:
    mount = next((m for m in mounts if m.fstype == "cgroup2"), None)
    if mount is None or "" not in own:
        return None, "no cgroup v2 hierarchy"
    here = _dir_of(mount, own[""])
    reasons: list[str] = []
    for parent in (here, here.parent):
        try:
            available = set((parent / "cgroup.controllers").read_text().split())
            enabled = set((parent / "cgroup.subtree_control").read_text().split())
        except OSError:
            continue
        if not {"pids", "memory"} <= available:
            reasons.append(f"{parent} lacks the pids and memory controllers")
            continue
        if not {"pids", "memory"} <= enabled:
            try:
                (parent / "cgroup.subtree_control").write_text("+pids +memory")
            except OSError as exc:
                reasons.append(f"cannot enable pids and memory under {parent}: {exc.strerror}")
                continue
        problem = _try_child(parent, {"pids.max": "max", "memory.max": "max"})
        if problem is None:
            return parent, f"cgroup v2 under {parent}"
        reasons.append(problem)
    return None, "; ".join(reasons) or "no cgroup v2 controllers for this process"


def _cgroup_v1(mounts: list[_Mount], own: dict[str, str]) -> tuple[tuple[Path, ...], str]:
    parents: list[Path] = []
    for controller, probe_file in (("pids", "pids.max"), ("memory", "memory.limit_in_bytes")):
        mount = next((m for m in mounts if m.fstype == "cgroup" and controller in m.options), None)
        if mount is None or controller not in own:
            return (), f"no cgroup v1 {controller} hierarchy"
        parent = _dir_of(mount, own[controller])
        problem = _try_child(parent, {probe_file: "max" if controller == "pids" else "-1"})
        if problem is not None:
            return (), problem
        parents.append(parent)
    return tuple(parents), f"cgroup v1 (pids under {parents[0]}, memory under {parents[1]})"


def _pick() -> LimitsProbe:
    mounts, own = _mounts(), _own_cgroups()
    v2, why_v2 = _cgroup_v2(mounts, own)
    if v2 is not None:
        _clean_stale((v2,))
        return LimitsProbe(LimitMechanism.CGROUP_V2, why_v2, (v2,))
    v1, why_v1 = _cgroup_v1(mounts, own)
    if v1:
        _clean_stale(v1)
        return LimitsProbe(LimitMechanism.CGROUP_V1, why_v1, v1)
    return LimitsProbe(
        LimitMechanism.RLIMITS,
        f"no writable cgroup ({why_v2}; {why_v1}): memory is limited per process "
        "(RLIMIT_DATA), processes by RLIMIT_NPROC over the user's current count"
        + (" (which does not bind root)" if os.getuid() == 0 else ""),
    )


_STALE = re.compile(rf"{CGROUP_PREFIX}(\d+)-\d+")


def _clean_stale(parents: tuple[Path, ...]) -> None:
    """Remove the command cgroups a dead server process left (it was killed mid-command)."""
    for parent in parents:
        try:
            entries = list(parent.iterdir())
        except OSError:
            continue
        for entry in entries:
            match = _STALE.fullmatch(entry.name)
            if match is None or _alive(int(match.group(1))):
                continue
            for pid in _procs(entry):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                entry.rmdir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- per command


def apply_limits(limits: CommandLimits, probe: LimitsProbe) -> AppliedLimits:
    """Prepare the limits of one command: its cgroups (made here) and the argv wrapper that
    puts it in them. Never raises: a failure falls back to rlimits with a warning."""
    mechanism = limits.mechanism or probe.mechanism
    if not limits.any or mechanism is LimitMechanism.NONE:
        return AppliedLimits(LimitMechanism.NONE, limits)
    if mechanism in (LimitMechanism.CGROUP_V1, LimitMechanism.CGROUP_V2) and probe.parents:
        try:
            return _cgroups(limits, probe, mechanism)
        except OSError as exc:
            applied = _rlimits(limits)
            applied.warning = (
                f"the command's cgroup could not be made ({exc}); it ran under per-process "
                "resource limits instead"
            )
            return applied
    return _rlimits(limits)


def _cgroups(limits: CommandLimits, probe: LimitsProbe, mechanism: LimitMechanism) -> AppliedLimits:
    name = f"{CGROUP_PREFIX}{os.getpid()}-{next(_names)}"
    made: list[Path] = []
    try:
        if mechanism is LimitMechanism.CGROUP_V2:
            cgroup = probe.parents[0] / name
            cgroup.mkdir()
            made.append(cgroup)
            if limits.max_processes:
                (cgroup / "pids.max").write_text(str(limits.max_processes))
            if limits.max_memory_mb:
                (cgroup / "memory.max").write_text(str(limits.max_memory_mb * MIB))
                _write_if_there(cgroup / "memory.swap.max", "0")
                _write_if_there(cgroup / "memory.oom.group", "1")
        else:
            pids, memory = probe.parents[0] / name, probe.parents[1] / name
            pids.mkdir()
            made.append(pids)
            memory.mkdir()
            made.append(memory)
            if limits.max_processes:
                (pids / "pids.max").write_text(str(limits.max_processes))
            if limits.max_memory_mb:
                limit = str(limits.max_memory_mb * MIB)
                (memory / "memory.limit_in_bytes").write_text(limit)
                # with swap accounting, swap counts in the same limit
                _write_if_there(memory / "memory.memsw.limit_in_bytes", limit)
    except OSError:
        for cgroup in made:
            with contextlib.suppress(OSError):
                cgroup.rmdir()
        raise
    prefix = ("/bin/sh", "-c", _JOIN, "fanout", str(len(made)), *map(str, made))
    return AppliedLimits(mechanism, limits, prefix=prefix, cgroups=tuple(made))


def _write_if_there(path: Path, value: str) -> None:
    with contextlib.suppress(OSError):
        if path.exists():
            path.write_text(value)


def _rlimits(limits: CommandLimits) -> AppliedLimits:
    data = str(limits.max_memory_mb * 1024) if limits.max_memory_mb else "-"
    nproc = "-"
    if limits.max_processes and os.getuid() != 0:
        nproc = str(_user_tasks(os.getuid()) + limits.max_processes)
    if data == "-" and nproc == "-":
        return AppliedLimits(LimitMechanism.NONE, limits)
    prefix = ("bash", "-c", _ULIMIT, "fanout", data, nproc)
    return AppliedLimits(LimitMechanism.RLIMITS, limits, prefix=prefix)


def _user_tasks(uid: int) -> int:
    """The tasks (threads) whose owner is `uid`: what RLIMIT_NPROC counts."""
    count = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                if entry.stat().st_uid != uid:
                    continue
                stat = Path(entry.path, "stat").read_text()
                count += int(stat[stat.rfind(")") + 2 :].split()[17])
            except (OSError, ValueError, IndexError):
                continue
    return count
