"""The one way the server runs git: an explicit repository, no command-running configuration.

An agent can write anything in its workspace, including a `.git` that names another repository
(a file `gitdir: …` or a whole planted repository with its own config). Git run inside the
workspace would discover that repository and run whatever its config names (`core.fsmonitor`,
hooks, `core.sshCommand`, `diff.external`, a pager, filter drivers), outside the sandbox and with
the server's environment. So git on a workspace always gets its git dir and work tree from the
server's records (`Pinned`), never from discovery, and every configuration key that runs a
program is overridden on the command line or in git's environment (`config_env`), where nothing
the agent writes can override it back.

Git run on the user's own repository (`pinned=None`) is the user's git: their hooks and
configuration apply, as when they run git themselves; it refuses to run with a working
directory inside the agents' workspaces, where only pinned git may run.

This module is the only one that starts git processes (`tests/test_git_calls.py` checks it).
"""

from __future__ import annotations

import functools
import os
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "SAFE_CONFIG",
    "GitNotFound",
    "GitStalled",
    "GitTooOld",
    "Pinned",
    "UnpinnedWorkspaceGit",
    "config_env",
    "filter_overrides",
    "git_argv",
    "git_env",
    "git_version",
    "in_workspace_area",
    "named_overrides",
    "pin_named",
    "run",
    "run_bytes",
]

# `-c` pairs that switch off every configuration key that makes git run a program, or reach
# out of the machine, for the commands the server runs on workspaces. `core.hooksPath` at a
# directory that cannot hold hooks disables every hook.
SAFE_CONFIG: tuple[str, ...] = (
    "core.hooksPath=/dev/null",
    "core.fsmonitor=false",
    "core.sshCommand=false",
    "core.gitProxy=",
    "core.askPass=",
    "core.pager=cat",
    "core.editor=true",
    "sequence.editor=true",
    "core.alternateRefsCommand=",
    "credential.helper=",
    "diff.external=",
    "commit.gpgSign=false",
    "tag.gpgSign=false",
    "gpg.program=false",
    "protocol.allow=never",
    "submodule.recurse=false",
    "fetch.recurseSubmodules=false",
    "core.untrackedCache=false",
)

# Environment variables of the server kept for git; every other `GIT_*` variable is dropped, as
# it may redirect git to another repository, index or object store, or name a program to run.
_KEEP_GIT_ENV = frozenset(
    {
        "GIT_CONFIG_GLOBAL",
        "GIT_CONFIG_SYSTEM",
        "GIT_CONFIG_NOSYSTEM",
        "GIT_AUTHOR_NAME",
        "GIT_AUTHOR_EMAIL",
        "GIT_AUTHOR_DATE",
        "GIT_COMMITTER_NAME",
        "GIT_COMMITTER_EMAIL",
        "GIT_COMMITTER_DATE",
    }
)
# What a workspace git command may set itself through `env=`.
_ALLOWED_EXTRA = frozenset({"GIT_INDEX_FILE", "GIT_OPTIONAL_LOCKS", "LC_ALL"}) | _KEEP_GIT_ENV


class GitNotFound(RuntimeError):
    """git is not installed or not on PATH."""


class GitStalled(OSError):
    """Pinned git was stopped waiting to open a named pipe in the workspace: a pipe where git
    reads rules (`.gitignore`, `.gitattributes`) would hold it until a writer came, or its
    timeout."""


class UnpinnedWorkspaceGit(RuntimeError):
    """Git was asked to run inside an agent's workspace without a pinned git dir."""


@dataclass(frozen=True)
class Pinned:
    """A workspace as the server recorded it: its admin git dir and its work tree."""

    git_dir: Path
    work_tree: Path
    config: tuple[tuple[str, str], ...] = ()
    """Further (key, value) pairs (`named_overrides`: the programs the repository's
    configuration names, turned off), given to git apart from `SAFE_CONFIG`: their keys hold
    names the user chose, which may hold `=`, where `-c` would split them (`config_env`)."""
    safe: bool = True
    """Every command-running key off (`SAFE_CONFIG`). Only the first checkout of a new
    workspace, before any agent ran in it, runs with the user's own hooks and filters."""
    lists_keys: bool = False
    """Before its first command, git lists its own configuration's keys, and each program
    they name is turned off too (`run`, `named_overrides`): `config` was made from the keys
    libgit2 listed (`pin_named`), and git may read keys libgit2 does not."""
    listed: list[Pinned] = field(default_factory=list["Pinned"], compare=False, repr=False)
    """The pin completed with git's own list, once made (see `lists_keys`)."""


def pin_named(git_dir: Path, work_tree: Path, config_names: Iterable[str]) -> Pinned:
    """A workspace pinned with every program named in `config_names` off (`named_overrides`):
    the keys of its configuration as libgit2 listed them. Git may read keys libgit2 does not
    list: libgit2 does not evaluate an `includeIf "hasconfig:..."` section, judges a `gitdir:`
    condition at the git dir it opened, and reads the system file at its own place, not at the
    one git was built with. So git lists its own keys before the pin's first command too
    (`Pinned.lists_keys`): one process more, only where git runs at all."""
    return Pinned(git_dir, work_tree, named_overrides(config_names), lists_keys=True)


def named_overrides(config_names: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """(key, value) pairs that turn off every program that `config_names` (the keys of the
    repository's configuration) name one by one, where `SAFE_CONFIG` cannot name them ahead:
    filter drivers (`filter_overrides`), and hooks configured by name (`hook.<name>.command`,
    git 2.54 and later), which `core.hooksPath` does not turn off, as it does the hooks
    directory's. A hook runs in the workspace, among the agent's files."""
    names = list(config_names)
    hooks = _subsections(names, "hook", ("command", "event"))
    return filter_overrides(names) + tuple((f"hook.{hook}.enabled", "false") for hook in hooks)


def filter_overrides(config_names: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """(key, value) pairs that disable every filter driver named in `config_names` (the keys
    of the repository's configuration): a driver's `clean`, `smudge` and `process` programs
    would run on content the agent wrote, picked by attributes the agent wrote."""
    pairs: list[tuple[str, str]] = []
    for driver in _subsections(config_names, "filter", ("clean", "smudge", "process", "required")):
        for key in ("clean", "smudge", "process"):
            pairs.append((f"filter.{driver}.{key}", ""))
        pairs.append((f"filter.{driver}.required", "false"))
    return tuple(pairs)


def _subsections(config_names: Iterable[str], section: str, keys: tuple[str, ...]) -> list[str]:
    """The subsections of `section` (`<section>.<subsection>.<key>`) that one of `keys` is set
    in, sorted: a section and a key are matched case-blind, as git does; a subsection, which
    git keeps as written, is returned as written."""
    prefix = section + "."
    found: set[str] = set()
    for name in config_names:
        lower = name.lower()
        if lower.startswith(prefix) and lower.rsplit(".", 1)[-1] in keys:
            found.add(name[len(prefix) : name.rfind(".")])
    return sorted(found)


def git_env(extra: Mapping[str, str] | None = None, *, pinned: bool = False) -> dict[str, str]:
    """The environment git runs with: the server's, less the `GIT_*` variables outside a short
    list, never asking on a terminal. A pinned command accepts only a few variables in `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_") or k in _KEEP_GIT_ENV}
    env["GIT_TERMINAL_PROMPT"] = "0"
    env.setdefault("LC_ALL", "C")
    if extra:
        if pinned:
            bad = sorted(k for k in extra if k not in _ALLOWED_EXTRA)
            if bad:
                raise ValueError(f"a pinned git command may not set {', '.join(bad)}")
        env.update(extra)
    return env


def git_argv(args: Sequence[str], pinned: Pinned | None = None) -> list[str]:
    """The argv of one git command: pinned to a workspace's git dir and work tree, with every
    command-running configuration off, or plain for the user's repository. The pin's pairs
    whose key holds `=` are not here: see `config_env`."""
    if pinned is None:
        return ["git", *args]
    argv = ["git", f"--git-dir={pinned.git_dir}", f"--work-tree={pinned.work_tree}"]
    pairs = [f"{key}={value}" for key, value in pinned.config if "=" not in key]
    for pair in (*(SAFE_CONFIG if pinned.safe else ()), *pairs):
        argv += ["-c", pair]
    return [*argv, *args]


class GitTooOld(RuntimeError):
    """This git cannot be given a setting the server must give it to run on a workspace."""


def config_env(pinned: Pinned) -> dict[str, str]:
    """The environment that gives git the pin's pairs whose key holds `=` (a driver or hook
    the user named `a=b`): `-c` splits its argument at the first `=`, so such an override
    would not take there. `GIT_CONFIG_COUNT` (git 2.31 and later) carries key and value apart,
    and git reads them as it reads `-c`'s, above every configuration file. Older git ignores
    it: `GitTooOld` then, rather than run with the program on."""
    split = [(key, value) for key, value in pinned.config if "=" in key]
    if not split:
        return {}
    if git_version() < (2, 31):
        names = ", ".join(sorted({key.rpartition(".")[0] for key, _ in split}))
        raise GitTooOld(
            f"the configuration names {names}, which git {'.'.join(map(str, git_version()))} "
            "cannot be told to turn off (its name holds '='): install git 2.31 or later, or "
            "rename it in your git configuration"
        )
    env = {"GIT_CONFIG_COUNT": str(len(split))}
    for n, (key, value) in enumerate(split):
        env[f"GIT_CONFIG_KEY_{n}"] = key
        env[f"GIT_CONFIG_VALUE_{n}"] = value
    return env


@functools.cache
def git_version() -> tuple[int, ...]:
    """This machine's git as (major, minor); (0, 0) where its answer cannot be read."""
    try:
        done = subprocess.run(
            ["git", "--version"], capture_output=True, text=True, check=False, env=git_env()
        )
    except FileNotFoundError as exc:
        raise GitNotFound("git is not installed or not on PATH") from exc
    words = done.stdout.split()
    parts = words[2].split(".")[:2] if len(words) > 2 else []
    return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) and parts else (0, 0)


def _pinned_env(pinned: Pinned, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return git_env(extra, pinned=True) | config_env(pinned)


def in_workspace_area(path: Path) -> bool:
    """Whether `path` is inside the agents' workspaces (`<git dir>/fanout/worktrees/…`)."""
    parts = Path(os.path.abspath(path)).parts
    return any(parts[i] == "fanout" and parts[i + 1] == "worktrees" for i in range(len(parts) - 1))


def _check_cwd(cwd: Path, pinned: Pinned | None) -> None:
    if pinned is None and in_workspace_area(cwd):
        raise UnpinnedWorkspaceGit(
            f"git may run in the workspace {cwd} only pinned to the git dir the server recorded"
        )


def run(
    cwd: Path,
    args: Sequence[str],
    *,
    pinned: Pinned | None = None,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run one git command, its output as text; raises `GitNotFound`, `UnpinnedWorkspaceGit`,
    and `subprocess.TimeoutExpired` past `timeout`."""
    _check_cwd(cwd, pinned)
    if pinned is not None:
        pinned = _with_git_listed(cwd, pinned, timeout)
        data = None if input is None else input.encode("utf-8", "surrogateescape")
        done = _run_watched(git_argv(args, pinned), cwd, _pinned_env(pinned, env), data, timeout)
        return subprocess.CompletedProcess(
            done.args, done.returncode, _text(done.stdout), _text(done.stderr)
        )
    try:
        return subprocess.run(
            git_argv(args, pinned),
            cwd=cwd,
            env=git_env(env, pinned=False),
            input=input,
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="surrogateescape",
            check=False,
            timeout=timeout,
        )
    except FileNotFoundError as exc:
        raise GitNotFound("git is not installed or not on PATH") from exc


def run_bytes(
    cwd: Path,
    args: Sequence[str],
    *,
    pinned: Pinned | None = None,
    timeout: float | None = None,
    input: bytes | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """`run` with the output as bytes, and `input`, if given, as git's standard input (a pack,
    or the revisions `pack-objects --revs` reads)."""
    _check_cwd(cwd, pinned)
    if pinned is not None:
        pinned = _with_git_listed(cwd, pinned, timeout)
        return _run_watched(git_argv(args, pinned), cwd, _pinned_env(pinned), input, timeout)
    try:
        return subprocess.run(
            git_argv(args, pinned),
            cwd=cwd,
            env=git_env(pinned=False),
            input=input,
            capture_output=True,
            check=False,
            timeout=timeout,
        )
    except FileNotFoundError as exc:
        raise GitNotFound("git is not installed or not on PATH") from exc


def _with_git_listed(cwd: Path, pinned: Pinned, timeout: float | None) -> Pinned:
    """`pinned`, with every program off that the keys git itself lists name, for a pin that
    asks for it (`Pinned.lists_keys`): listed once per pin. Listing runs no program. If git
    cannot list its configuration, the command that follows fails to read it too."""
    if not (pinned.safe and pinned.lists_keys):
        return pinned
    if pinned.listed:
        return pinned.listed[0]
    argv = git_argv(["config", "--list", "--name-only", "-z"], pinned)
    done = _run_watched(argv, cwd, _pinned_env(pinned), None, timeout)
    names = _text(done.stdout).split("\0") if done.returncode == 0 else []
    pairs = tuple(dict.fromkeys((*pinned.config, *named_overrides(n for n in names if n))))
    complete = Pinned(pinned.git_dir, pinned.work_tree, pairs, pinned.safe)
    pinned.listed.append(complete)
    return complete


# How often a pinned git that has not finished is looked at, and the kernel's name for where a
# process waits in `open` of a named pipe until the other end opens (Linux's `/proc/PID/wchan`).
_WATCH_EVERY_S = 0.25
_PIPE_OPEN_WAIT = b"wait_for_partner"


def _run_watched(
    argv: list[str],
    cwd: Path,
    env: dict[str, str],
    input: bytes | None,
    timeout: float | None,
) -> subprocess.CompletedProcess[bytes]:
    """`subprocess.run` of a pinned git, which also stops it (`GitStalled`) once it waits to
    open a named pipe: the agent can make one where git reads rules, and git would wait there
    until its timeout, or for ever without one."""
    try:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except FileNotFoundError as exc:
        raise GitNotFound("git is not installed or not on PATH") from exc
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = input
    with proc:
        while True:
            wait = _WATCH_EVERY_S
            if deadline is not None:
                wait = max(0.0, min(wait, deadline - time.monotonic()))
            try:
                out, err = proc.communicate(pending, timeout=wait)
            except subprocess.TimeoutExpired:
                pending = None  # communicate keeps what it has not written yet
                if deadline is not None and time.monotonic() >= deadline:
                    proc.kill()
                    proc.communicate()
                    raise subprocess.TimeoutExpired(argv, timeout or 0.0) from None
                if _waits_on_a_pipe(proc.pid):
                    proc.kill()
                    proc.communicate()
                    raise GitStalled(
                        f"git waited to open a named pipe in {cwd} (one where git reads rules, "
                        "such as a .gitignore or .gitattributes that is a pipe) and was stopped"
                    ) from None
                continue
            except BaseException:
                proc.kill()  # as subprocess.run does: leaving the block waits for git
                raise
            return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _text(data: bytes) -> str:
    """Output as `subprocess.run(text=True)` gives it: universal newlines."""
    return data.decode("utf-8", "surrogateescape").replace("\r\n", "\n").replace("\r", "\n")


def _waits_on_a_pipe(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/wchan", "rb") as wchan:
            return wchan.read().strip() == _PIPE_OPEN_WAIT
    except OSError:
        return False
