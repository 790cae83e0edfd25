"""Per-agent terminals: one `bash -c` at a time in the workspace, sandboxed, scrubbed, bounded.

Each command runs under the limits of `toolbus.limits` (processes, memory; its cgroup, when the
system has one the server may write, is removed after it) and, under bubblewrap, sees only what
`toolbus.sandbox` shows it, with a size-limited private `/tmp`. When it reaches a limit, its
result's warning says which.

A command runs in its own process group (its own session). When it times out the group gets
SIGTERM, then SIGKILL after a grace period; when it ends, whatever it left running in the group is
killed too (background processes do not outlive their command). Under bubblewrap the command also
has its own PID namespace, so nothing escapes by changing session. Output (stdout and stderr
interleaved) is read concurrently and capped: head and tail kept, total size reported.

The environment starts from a small allowlist plus configured names; names that look like secrets
(`*KEY*`, `*TOKEN*`, `*SECRET*`, `*PASSWORD*`, ...) pass only when configured by exact name.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.abc import ByteReceiveStream
from pydantic import BaseModel, ConfigDict, Field, field_validator

from toolbus.errors import CommandDenied, InvalidArguments, SandboxUnavailable
from toolbus.limits import (
    CommandLimits,
    LimitMechanism,
    LimitsProbe,
    apply_limits,
    probe_limits,
)
from toolbus.sandbox import (
    GitView,
    GitViewCache,
    SandboxMode,
    SandboxPlan,
    bwrap_prefix,
    bwrap_supports_size,
    hidden_path_entries,
    prepare_git_view,
    probe_bwrap,
    warn_once,
)
from toolbus.trees import remove_tree

__all__ = [
    "CommandLimits",
    "CommandPolicy",
    "CommandResult",
    "SandboxMode",
    "Terminal",
    "TerminalConfig",
    "describe_commands",
    "scrubbed_env",
]

BASE_ENV_NAMES = ("PATH", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ", "USER")
FIXED_ENV = {
    "TERM": "dumb",
    "PAGER": "cat",
    "GIT_PAGER": "cat",
    "GIT_TERMINAL_PROMPT": "0",
}
# A name a wildcard of `env_passthrough` does not let through (a name given whole does): what
# names secrets (SMTP_PASS, NPM_CONFIG__AUTH, SESSION_COOKIE; not GIT_AUTHOR_NAME)
SECRET_NAME = re.compile(
    r"KEY|TOKEN|SECRET|PASS(?!THROUGH)|CREDENTIAL|AUTH(?!OR)|COOKIE|SESSION", re.IGNORECASE
)
# a value holding a URL with a password (DATABASE_URL=postgres://user:secret@host/db)
SECRET_VALUE = re.compile(r"://[^/@\s:]*:[^/@\s]+@")


class CommandPolicy(BaseModel):
    """Regex patterns (searched anywhere in the command): deny wins; a non-empty allow list
    admits only commands matching one of its patterns."""

    model_config = ConfigDict(frozen=True)

    deny: tuple[str, ...] = ()
    allow: tuple[str, ...] = ()

    @field_validator("deny", "allow")
    @classmethod
    def _compiles(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for p in patterns:
            re.compile(p)
        return patterns

    def check(self, command: str) -> None:
        """Raise `CommandDenied` naming the pattern that refuses `command`."""
        for pattern in self.deny:
            if re.search(pattern, command):
                raise CommandDenied(
                    f"command refused by the policy: it matches the deny pattern {pattern!r}; "
                    "do the task another way or report it in your summary"
                )
        if self.allow and not any(re.search(p, command) for p in self.allow):
            raise CommandDenied(
                "command refused by the policy: it matches none of the allowed patterns "
                f"({', '.join(repr(p) for p in self.allow)})"
            )


class TerminalConfig(BaseModel):
    """How an agent's commands run."""

    model_config = ConfigDict(frozen=True)

    sandbox: SandboxMode = SandboxMode.AUTO
    allow_network: bool = False
    hidden_paths: tuple[Path, ...] = ()
    """Hidden (an empty tmpfs) inside the sandbox, e.g. the state dir of other agents."""
    extra_ro_paths: tuple[Path, ...] = ()
    """Shown read-only inside the sandbox besides the system directories (a toolchain, a cache)."""
    git_admin_dir: Path | None = None
    """The workspace's worktree admin dir, from the server's records (never from its `.git`)."""
    git_common_dir: Path | None = None
    """The repository's common git dir; with `git_admin_dir`, git works read-only inside."""
    home: Path | None = None
    """The private HOME; `None`: a temporary one, removed by `Terminal.close`. The sandbox's
    filtered git files go in a sibling directory `<home>.sandbox`, also removed by `close`."""
    limits: CommandLimits = CommandLimits()
    env_passthrough: tuple[str, ...] = ()
    """Names (or fnmatch patterns) copied from the server's environment."""
    env_set: Mapping[str, str] = Field(default_factory=dict[str, str])
    policy: CommandPolicy = CommandPolicy()
    default_timeout_s: float = 120.0
    max_timeout_s: float = 900.0
    kill_grace_s: float = 2.0
    drain_s: float = 2.0
    """After the command ends, how long to wait for output still in the pipe."""
    max_output_bytes: int = 30_000
    bwrap_path: str | None = None


class CommandResult(BaseModel):
    """What one command did."""

    model_config = ConfigDict(frozen=True)

    command: str
    exit_code: int | None
    """The shell's convention: 128+N when killed by signal N."""
    output: str
    output_bytes: int
    """Total bytes the command printed (the output shown may be cut)."""
    truncated: bool
    timed_out: bool
    duration_ms: float
    sandboxed: bool
    warning: str | None = None


@dataclass(frozen=True)
class _Outcome:
    exit_code: int | None
    output: str
    output_bytes: int
    truncated: bool
    timed_out: bool


def scrubbed_env(config: TerminalConfig, home: Path, source: Mapping[str, str]) -> dict[str, str]:
    """The environment of a command: allowlist, fixed values, configured names."""
    env = {name: source[name] for name in BASE_ENV_NAMES if name in source}
    env.setdefault("PATH", os.defpath)
    env.update(FIXED_ENV)
    env["HOME"] = str(home)
    for entry in config.env_passthrough:
        if any(c in entry for c in "*?["):
            for name, value in source.items():
                if (
                    fnmatch.fnmatchcase(name, entry)
                    and not SECRET_NAME.search(name)
                    and not SECRET_VALUE.search(value)
                ):
                    env[name] = value
        elif entry in source:
            env[entry] = source[entry]
    env.update(config.env_set)
    return env


def describe_commands(
    *, sandboxed: bool, extra_ro_paths: tuple[Path, ...], limits: CommandLimits, path: str
) -> str:
    """One line for spawn's answer: what commands see and which mechanism limits them (probes
    the limits once per process: blocking file work)."""
    if sandboxed:
        shown = ", ".join(str(p) for p in extra_ro_paths) or "none"
        line = (
            "commands see the system directories, their worktree, a private HOME and /tmp; "
            f"extra read-only paths (FANOUT_SANDBOX_RO_PATHS): {shown}"
        )
        missing = hidden_path_entries(path, extra_ro_paths)
        if missing:
            line += f"; PATH entries they do not see: {', '.join(missing[:4])}"
    else:
        line = "commands are not sandboxed"
    mechanism = limits.mechanism or probe_limits().mechanism
    how = {
        LimitMechanism.CGROUP_V2: "by a cgroup v2 per command",
        LimitMechanism.CGROUP_V1: "by a cgroup v1 per command",
        LimitMechanism.RLIMITS: "by per-process rlimits only (no writable cgroup here"
        + ("; processes unlimited for root)" if os.getuid() == 0 else ")"),
        LimitMechanism.NONE: "not enforced",
    }[mechanism]
    return f"{line}; limits: {limits.describe()}, {how}"


class _CappedBuffer:
    """Keeps the first and last `cap // 2` bytes of a stream and counts the rest."""

    def __init__(self, cap: int) -> None:
        self.head_cap = cap // 2
        self.tail_cap = cap - self.head_cap
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self.tail += chunk
            if len(self.tail) > self.tail_cap:
                del self.tail[: len(self.tail) - self.tail_cap]

    @property
    def truncated(self) -> bool:
        return self.total > len(self.head) + len(self.tail)

    def text(self) -> str:
        head = self.head.decode("utf-8", "replace")
        tail = self.tail.decode("utf-8", "replace")
        if not self.truncated:
            return head + tail
        omitted = self.total - len(self.head) - len(self.tail)
        return f"{head}\n[... {omitted} bytes of output omitted ...]\n{tail}"


def _killpg(pgid: int, sig: signal.Signals) -> bool:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _group_alive(pgid: int) -> bool:
    """True while a process of the group other than a zombie exists (read from /proc)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return False
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


async def _reap_wait(pgid: int, limit_s: float = 5.0) -> None:
    """Wait (bounded) until SIGKILLed members of the group are gone, so none outlives the call."""
    with anyio.move_on_after(limit_s):
        while _group_alive(pgid):
            _killpg(pgid, signal.SIGKILL)
            await anyio.sleep(0.01)


def _remove_dirs(paths: tuple[Path, ...]) -> None:
    for path in paths:
        remove_tree(path, ignore_errors=True)


def remove_home(home: Path) -> None:
    """Remove an agent's HOME and its sandbox's files (`<home>.sandbox`), e.g. once its workspace
    is gone."""
    _remove_dirs((home, home.parent / f"{home.name}.sandbox"))


class Terminal:
    """The terminal of one agent: commands run one at a time in `workspace`."""

    def __init__(
        self,
        workspace: Path,
        config: TerminalConfig | None = None,
        *,
        register_git: Callable[[], Path] | None = None,
    ) -> None:
        """`register_git`: makes the workspace's git registration if it is not made yet and
        returns its admin dir (the server's record, as `config.git_admin_dir` would give it);
        the first command calls it, so that a workspace no command runs in is never
        registered."""
        self._workspace = workspace
        self.config = config or TerminalConfig()
        self._register_git = register_git
        self._admin_dir = self.config.git_admin_dir
        self._lock = anyio.Lock()
        self._own_home = self.config.home is None
        # a configured home is made by the first command (`_prepare_run`): most agents run
        # none, and every directory made per agent costs an inode's allocation
        self.home = (
            Path(tempfile.mkdtemp(prefix="fanout-home-"))
            if self.config.home is None
            else self.config.home
        )
        self.view_dir = self.home.parent / f"{self.home.name}.sandbox"
        self._git_cache = GitViewCache()
        self._plan: SandboxPlan | None = None
        # what it made in the system's temporary directory goes with it even unclosed (at
        # garbage collection or interpreter exit); a configured home is its owner's to remove
        if self._own_home:
            self._cleanup = weakref.finalize(self, _remove_dirs, (self.home, self.view_dir))

    @functools.cached_property
    def workspace(self) -> Path:
        """The workspace's real path, resolved when a command first needs it: most agents run
        none, and resolving walks every component of a deep path."""
        return Path(os.path.realpath(self._workspace))

    def grant_network(self) -> None:
        """Let the next commands reach the network (a grant of the permission policy)."""
        if not self.config.allow_network:
            self.config = self.config.model_copy(update={"allow_network": True})
            self._plan = None  # probed again: bubblewrap's network setup differs

    def close(self) -> None:
        """Remove the temporary HOME this terminal made (if any) and the sandbox's files."""
        remove_tree(self.view_dir, ignore_errors=True)
        if self._own_home:
            self._cleanup()

    async def sandbox_plan(self) -> SandboxPlan:
        """Decide (once) how commands run; raises `SandboxUnavailable` in `bwrap` mode."""
        if self._plan is not None:
            return self._plan
        mode = self.config.sandbox
        if mode is SandboxMode.NONE:
            self._plan = SandboxPlan(None, warning=None)
            return self._plan
        exe = self.config.bwrap_path or shutil.which("bwrap")
        reason = await probe_bwrap(exe, network=self.config.allow_network)
        if reason is not None or exe is None:
            reason = reason or "bubblewrap (bwrap) is not installed"
            if mode is SandboxMode.BWRAP:
                raise SandboxUnavailable(
                    f"the sandbox is required (FANOUT_SANDBOX=bwrap) but cannot run: {reason}"
                )
            warning = f"commands run WITHOUT a sandbox: {reason}"
            warn_once(warning)
            self._plan = SandboxPlan(None, warning=warning)
            return self._plan
        self._plan = SandboxPlan(exe, warning=None)
        return self._plan

    def _sandbox_prefix(self, bwrap: str) -> tuple[str, ...]:
        """The `bwrap` argv of the next command, built afresh (refs and the git files it
        filters change between commands); blocking file work, run off the event loop."""
        config = self.config
        git: GitView | None = None
        if self._admin_dir is not None and config.git_common_dir is not None:
            git = prepare_git_view(
                self._admin_dir, config.git_common_dir, self.view_dir, self._git_cache
            )
        tmp_mb = config.limits.tmp_mb
        return bwrap_prefix(
            bwrap,
            workspace=self.workspace,
            home=self.home,
            hidden=config.hidden_paths,
            allow_network=config.allow_network,
            git=git,
            extra_ro=config.extra_ro_paths,
            tmp_bytes=tmp_mb * 1024 * 1024 if tmp_mb and bwrap_supports_size(bwrap) else None,
        )

    def _prepare_run(self) -> LimitsProbe:
        """The HOME made (again, if a command removed it) and the limits' mechanism probed;
        blocking file work, run off the event loop. The workspace's git is registered first
        (`register_git`), once."""
        if self._admin_dir is None and self._register_git is not None:
            self._admin_dir = self._register_git()
        self.home.mkdir(parents=True, exist_ok=True)
        return probe_limits()

    def env(self) -> dict[str, str]:
        """The scrubbed environment commands get."""
        return scrubbed_env(self.config, self.home, os.environ)

    async def run(self, command: str, timeout_s: float | None = None) -> CommandResult:
        """Run `command` with `bash -c`; raises `CommandDenied`, `SandboxUnavailable`,
        `InvalidArguments` (a NUL byte, which no argv can carry)."""
        if "\x00" in command:
            raise InvalidArguments("the command contains a NUL byte; remove it")
        self.config.policy.check(command)
        timeout = min(timeout_s or self.config.default_timeout_s, self.config.max_timeout_s)
        async with self._lock:
            plan = await self.sandbox_plan()
            return await self._run(plan, command, limit_s=timeout)

    async def _run(self, plan: SandboxPlan, command: str, *, limit_s: float) -> CommandResult:
        started = time.monotonic()
        prefix: tuple[str, ...] = ()
        probe = await anyio.to_thread.run_sync(self._prepare_run)
        if plan.bwrap is not None:
            prefix = await anyio.to_thread.run_sync(self._sandbox_prefix, plan.bwrap)
        limits = apply_limits(self.config.limits, probe)
        verdict: str | None = None
        try:
            result = await self._run_process(
                [*limits.prefix, *prefix, "bash", "-c", command], limit_s=limit_s
            )
        finally:
            with anyio.CancelScope(shield=True):
                verdict = limits.verdict()
                await limits.release()
        warnings = [w for w in (plan.warning, limits.warning, verdict) if w]
        return CommandResult(
            command=command,
            exit_code=result.exit_code,
            output=result.output,
            output_bytes=result.output_bytes,
            truncated=result.truncated,
            timed_out=result.timed_out,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
            sandboxed=plan.sandboxed,
            warning="; ".join(warnings) or None,
        )

    async def _run_process(self, argv: list[str], *, limit_s: float) -> _Outcome:
        buffer = _CappedBuffer(self.config.max_output_bytes)
        drained = anyio.Event()
        timed_out = False
        process = await anyio.open_process(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=self.workspace,
            env=self.env(),
            start_new_session=True,
        )
        pgid = process.pid

        async def pump(stream: ByteReceiveStream) -> None:
            try:
                async for chunk in stream:
                    buffer.feed(chunk)
            except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass
            finally:
                drained.set()

        try:
            async with anyio.create_task_group() as tg:
                assert process.stdout is not None
                tg.start_soon(pump, process.stdout)
                with anyio.move_on_after(limit_s) as scope:
                    await process.wait()
                if scope.cancelled_caught:
                    timed_out = True
                    await self._stop_group(process, pgid)
                _killpg(pgid, signal.SIGKILL)  # leftovers of a finished command
                with anyio.move_on_after(self.config.drain_s):
                    await drained.wait()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    _killpg(pgid, signal.SIGKILL)
                    await process.wait()
                _killpg(pgid, signal.SIGKILL)
                await process.aclose()
                await _reap_wait(pgid)
        code = process.returncode
        return _Outcome(
            exit_code=None if code is None else (128 - code if code < 0 else code),
            output=buffer.text(),
            output_bytes=buffer.total,
            truncated=buffer.truncated,
            timed_out=timed_out,
        )

    async def _stop_group(self, process: anyio.abc.Process, pgid: int) -> None:
        """SIGTERM the group, then SIGKILL it after the grace period."""
        _killpg(pgid, signal.SIGTERM)
        with anyio.move_on_after(self.config.kill_grace_s):
            await process.wait()
        _killpg(pgid, signal.SIGKILL)
        await process.wait()
