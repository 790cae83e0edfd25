"""The bubblewrap sandbox of a terminal: its mode, the probe, and the `bwrap` command line.

Inside the sandbox the whole filesystem is read-only, the agent's workspace (and its private
HOME) read-write, `/tmp` private, configured paths hidden under an empty tmpfs (the state dir
holding other agents' worktrees), the PID namespace private and, unless allowed, the network too.
The worktree's git dir (`<repo>/.git/worktrees/<name>`) stays readable so git works read-only.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import anyio

logger = logging.getLogger(__name__)


class SandboxMode(StrEnum):
    """`auto`: bubblewrap when it works, else none with a warning; `bwrap`: required; `none`."""

    AUTO = "auto"
    BWRAP = "bwrap"
    NONE = "none"


@dataclass(frozen=True)
class SandboxPlan:
    """How a command will run: the argv prefix (empty without sandbox) and any warning."""

    prefix: tuple[str, ...]
    sandboxed: bool
    warning: str | None


_probe_results: dict[tuple[str, bool], str | None] = {}
_warned: set[str] = set()


async def probe_bwrap(bwrap: str | None = None, *, network: bool = False) -> str | None:
    """`None` when bubblewrap runs here with the flags the terminal uses, else the reason.

    Cached per process (concurrent first probes may both run; they agree).
    """
    exe = bwrap or shutil.which("bwrap")
    if exe is None:
        return "bubblewrap (bwrap) is not installed"
    key = (exe, network)
    if key in _probe_results:
        return _probe_results[key]
    argv = [exe, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-pid"]
    if not network:
        argv.append("--unshare-net")
    argv += ["--die-with-parent", "--new-session", "true"]
    try:
        with anyio.fail_after(30):
            done = await anyio.run_process(argv, check=False, stdin=subprocess.DEVNULL)
        reason = (
            None
            if done.returncode == 0
            else f"bubblewrap probe failed (exit {done.returncode}): "
            + done.stderr.decode(errors="replace").strip()[:300]
        )
    except (OSError, TimeoutError) as exc:
        reason = f"bubblewrap probe failed: {exc}"
    _probe_results[key] = reason
    return reason


def warn_once(message: str) -> None:
    """Log a sandbox warning once per process."""
    if message not in _warned:
        _warned.add(message)
        logger.warning("%s", message)


def _git_dirs(workspace: Path) -> list[Path]:
    """The worktree's git dir and common dir, when `.git` is a `gitdir:` file."""
    dot_git = workspace / ".git"
    try:
        if not dot_git.is_file():
            return []
        line = dot_git.read_text(encoding="utf-8").strip()
    except OSError:
        return []
    if not line.startswith("gitdir:"):
        return []
    gitdir = Path(line.removeprefix("gitdir:").strip())
    if not gitdir.is_absolute():
        gitdir = workspace / gitdir
    gitdir = Path(os.path.realpath(gitdir))
    dirs = [gitdir]
    try:
        common = (gitdir / "commondir").read_text(encoding="utf-8").strip()
        common_path = Path(common) if os.path.isabs(common) else gitdir / common
        dirs.append(Path(os.path.realpath(common_path)))
    except OSError:
        pass
    return dirs


def _inside(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def bwrap_prefix(
    bwrap: str,
    *,
    workspace: Path,
    home: Path,
    hidden: tuple[Path, ...],
    allow_network: bool,
) -> tuple[str, ...]:
    """The `bwrap ... --` argv prefix for a command run in `workspace`."""
    ws = Path(os.path.realpath(workspace))
    home = Path(os.path.realpath(home))
    args = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    git_dirs = [g for g in _git_dirs(ws) if g.exists()]
    for g in git_dirs:  # readable even under the private /tmp
        args += ["--ro-bind", str(g), str(g)]
    hidden_real = [Path(os.path.realpath(h)) for h in hidden if os.path.lexists(h)]
    for h in hidden_real:
        args += ["--tmpfs", str(h)]
    # Git's own dirs stay readable if a hidden path covers them (binding one that merely
    # contains a hidden path would re-expose it, so those are bound before the hiding).
    for g in git_dirs:
        if any(_inside(g, h) for h in hidden_real):
            args += ["--ro-bind", str(g), str(g)]
    args += ["--bind", str(ws), str(ws)]
    if not _inside(home, ws):
        args += ["--bind", str(home), str(home)]
    args += ["--unshare-pid", "--die-with-parent", "--new-session", "--chdir", str(ws)]
    if not allow_network:
        args.append("--unshare-net")
    args += ["--setenv", "TMPDIR", "/tmp", "--"]
    return tuple(args)
