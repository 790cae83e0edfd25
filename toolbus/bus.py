"""The agent bus: the subagent tools dispatched by name, each call checked, audited and rendered.

`AgentBus.call` never raises for a refusal or bad arguments: a `ToolbusError` becomes an error
outcome whose text says what to do; any other exception becomes an error outcome naming its type
(no traceback). Every call, refusals included, leaves one `AuditRecord`. Mutating calls (writes,
edits, commands) are serialized by a lock of the bus; reads run concurrently in worker threads.
With `quick_files` (a workspace on a local filesystem with no daemon in between), a read of a
file up to `QUICK_FILE_BYTES` runs in the event loop's thread, and so does a write or edit of one
up to its `fsync`s, which a worker thread makes: under load, a worker thread and the busy event
loop hand the GIL to each other at every system call the worker makes, which costs more CPU
than the calls themselves.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast

import anyio
import anyio.from_thread
import anyio.to_thread
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from toolbus.audit import AuditLog, Outcome
from toolbus.errors import InvalidArguments, PermissionRefused, ToolbusError
from toolbus.external import (
    ExternalServerError,
    ExternalSession,
    ExternalTool,
    connection_lease,
)
from toolbus.fileops import (
    EditResult,
    Fence,
    FileLimits,
    FileOps,
    ListResult,
    NotQuick,
    PendingWrite,
    ReadResult,
    SearchResult,
    WriteResult,
)
from toolbus.jail import Jail
from toolbus.permissions import (
    ApprovalRequest,
    CallGate,
    PermissionPolicy,
    PermissionRequest,
)
from toolbus.resources import WriteScope, normalize_path
from toolbus.terminal import CommandResult, Terminal
from toolbus.toolspec import ToolOutcome, ToolSpec

__all__ = [
    "MCP_RESOURCE_TOOL",
    "MUTATING_TOOLS",
    "SUBAGENT_TOOL_SPECS",
    "AgentBus",
    "EditFileArgs",
    "Fence",
    "FileLimits",
    "ListFilesArgs",
    "ReadFileArgs",
    "RunCommandArgs",
    "SearchArgs",
    "WriteFileArgs",
    "agent_tool_specs",
]


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReadFileArgs(_Args):
    path: str = Field(description="File path relative to the repository root.")
    offset: int | None = Field(
        default=None, ge=1, description="1-based line to start at (default 1)."
    )
    limit: int | None = Field(
        default=None, ge=1, le=100_000, description="Number of lines to return (default 2000)."
    )


class WriteFileArgs(_Args):
    path: str = Field(description="File path relative to the repository root.")
    content: str = Field(description="The complete new content of the file.")


class EditFileArgs(_Args):
    path: str = Field(description="File path relative to the repository root.")
    old: str = Field(description="The exact text to replace (whitespace and indentation count).")
    new: str = Field(description="The replacement text.")
    replace_all: bool = Field(
        default=False, description="Replace every occurrence instead of exactly one."
    )


class ListFilesArgs(_Args):
    path: str = Field(default="", description="Directory relative to the repository root.")
    pattern: str | None = Field(
        default=None,
        description="Glob such as '*.py' or 'src/**/test_*.py'; lists matching files recursively.",
    )


class SearchArgs(_Args):
    pattern: str = Field(min_length=1, description="Python regular expression, matched per line.")
    path: str = Field(default="", description="Directory or file to search (default: all).")
    glob: str | None = Field(default=None, description="Only files matching this glob ('*.py').")


class RunCommandArgs(_Args):
    command: str = Field(min_length=1, description="A bash command line.")
    timeout_s: float | None = Field(
        default=None, gt=0, description="Timeout in seconds (default 120, capped at 900)."
    )
    resources: list[str] = Field(
        default_factory=list[str],
        max_length=16,
        description="Shared resources the command uses, from your task's declared resources "
        "(e.g. 'port:8000'): no other agent's command holds them while it runs (it waits).",
    )


class ReadMcpResourceArgs(_Args):
    server: str = Field(description="The MCP server's name (as in the mcp__<server>__ tools).")
    uri: str = Field(min_length=1, max_length=4096, description="The resource's URI.")


_PATHS = (
    "Paths are relative to the repository root (your workspace); absolute paths, '..' out of "
    "the workspace, symlinks leading outside it and anything inside .git are refused."
)

_DESCRIPTIONS: dict[str, str] = {
    "read_file": (
        "Read a UTF-8 text file. Returns numbered lines ('<line>\\t<text>'), 2000 lines per page "
        "by default; when the page is cut the result says which offset to pass to read the next "
        "page. Files over 2 MiB and binary files are refused (use search, or run_command with "
        "head/sed). " + _PATHS
    ),
    "write_file": (
        "Create or overwrite a text file with the given content (atomically; parent directories "
        "are created; an existing file keeps its mode). Up to 5 MiB. Writes are allowed only "
        "inside your write scope: a path outside it is refused with an OutOfScope error naming "
        "the scope (write only there, or report the needed change in your summary). Prefer "
        "edit_file for changes to an existing file. " + _PATHS
    ),
    "edit_file": (
        "Replace an exact piece of text in a file. 'old' must occur exactly once (copy it from "
        "read_file output without the line numbers, with its whitespace); if it occurs several "
        "times include more context or set replace_all. Returns the number of replacements. "
        "Only inside your write scope (else OutOfScope). " + _PATHS
    ),
    "list_files": (
        "List the repository. Without a pattern: the direct entries of 'path' (directories end "
        "with '/'). With a glob pattern: the matching files below 'path', recursively ('*.py' "
        "matches file names; patterns with '/' match paths, '**' crosses directories). "
        "Git-ignored files and .git are not shown; at most 1000 entries. " + _PATHS
    ),
    "search": (
        "Search text files for a regular expression (Python syntax, matched line by line), "
        "optionally below 'path' and only in files matching 'glob'. Returns 'path:line: text' "
        "for up to 200 matching lines and how many lines matched in all. Binary and "
        "git-ignored files are skipped. " + _PATHS
    ),
    "run_command": (
        "Run a bash command in the repository root (your workspace) and return its exit code "
        "and output (stdout and stderr together; long output keeps its beginning and end). "
        "Commands run one at a time, without a terminal or input, with a timeout (default "
        "120 s) after which the command and everything it started is killed; background "
        "processes do not outlive the command. The network may be unavailable and files "
        "outside the workspace read-only. The command may change any file of the workspace, "
        "but changes outside your write scope will not be kept."
    ),
    "read_mcp_resource": (
        "Read a resource of one of the MCP servers whose tools you have (mcp__<server>__*), by "
        "its URI; long contents keep their beginning and end."
    ),
}

_MODELS: dict[str, type[_Args]] = {
    "read_file": ReadFileArgs,
    "write_file": WriteFileArgs,
    "edit_file": EditFileArgs,
    "list_files": ListFilesArgs,
    "search": SearchArgs,
    "run_command": RunCommandArgs,
    "read_mcp_resource": ReadMcpResourceArgs,
}

MUTATING_TOOLS = frozenset({"write_file", "edit_file", "run_command"})
_CONTENT_FIELDS = frozenset({"content", "old", "new"})


def _schema(model: type[_Args]) -> dict[str, JsonValue]:
    return cast(dict[str, JsonValue], model.model_json_schema())


SUBAGENT_TOOL_SPECS: list[ToolSpec] = [
    ToolSpec(name=name, description=_DESCRIPTIONS[name], input_schema=_schema(model))
    for name, model in _MODELS.items()
    if name != "read_mcp_resource"
]
MCP_RESOURCE_TOOL = ToolSpec(
    name="read_mcp_resource",
    description=_DESCRIPTIONS["read_mcp_resource"],
    input_schema=_schema(ReadMcpResourceArgs),
)


def _signature(name: str, model: type[_Args]) -> str:
    parts: list[str] = []
    for field_name, info in model.model_fields.items():
        annotation = info.annotation
        kind = getattr(annotation, "__name__", str(annotation)).replace("NoneType", "null")
        parts.append(f"{field_name}{'' if info.is_required() else '?'}: {kind}")
    return f"{name}({', '.join(parts)})"


def _validation_message(name: str, model: type[_Args], exc: ValidationError) -> str:
    problems: list[str] = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(arguments)"
        if err["type"] == "missing":
            problems.append(f"missing required argument {loc!r}")
        elif err["type"] == "extra_forbidden":
            problems.append(f"unknown argument {loc!r}")
        else:
            problems.append(f"argument {loc!r}: {err['msg']}")
    return (
        f"invalid arguments for {name}: {'; '.join(problems)}. Expected {_signature(name, model)}"
    )


def _args_brief(arguments: object) -> str:
    if not isinstance(arguments, Mapping):
        return f"<{type(arguments).__name__}>"
    items: list[str] = []
    for key, value in cast(Mapping[object, object], arguments).items():
        if key in _CONTENT_FIELDS and isinstance(value, str):
            items.append(f"{key}=<{len(value)} chars>")
        else:
            text = repr(value)
            items.append(f"{key}={text[:120]}{'…' if len(text) > 120 else ''}")
    return " ".join(items)


def _command_of(name: str, arguments: object) -> str | None:
    if name != "run_command" or not isinstance(arguments, Mapping):
        return None
    command = cast(Mapping[object, object], arguments).get("command")
    return command if isinstance(command, str) else None


class _LoopFence:
    """Runs the caller's fence in the event loop thread when called from a worker thread, unless
    the fence says it is thread-safe (a true `thread_safe` attribute): a write then checks it in
    its own worker thread, right before writing, without two hops through a busy event loop."""

    def __init__(self, fence: Fence) -> None:
        self._fence = fence
        self.loop_thread: int | None = None

    @property
    def token(self) -> int | None:
        return self._fence.token

    def check(self, path: str | None) -> None:
        if (
            self.loop_thread is None
            or threading.get_ident() == self.loop_thread
            or getattr(self._fence, "thread_safe", False) is True
        ):
            self._fence.check(path)
        else:
            anyio.from_thread.run_sync(self._fence.check, path)


@dataclass
class _Facts:
    """What a call did, for its audit record."""

    path: str | None = None
    exit_code: int | None = None
    timed_out: bool | None = None
    bytes_written: int | None = None
    replacements: int | None = None
    reads: list[str] | None = None
    is_error: bool = False
    permission: str | None = None


_R = TypeVar("_R")

# The worker threads of the quick writes' fsyncs (`_in_sync_thread`).
_SYNC_THREADS = concurrent.futures.ThreadPoolExecutor(
    max_workers=32, thread_name_prefix="fanout-fsync"
)


async def _in_sync_thread(func: Callable[[], _R]) -> _R:
    """`func()` in a worker thread, waited for to its end even when the caller is cancelled
    meanwhile (as `anyio.to_thread.run_sync` does). One wait on the event loop, where
    `to_thread` makes three: in a burst of agents each is a wait behind every other ready one.
    (The server runs on asyncio, anyio's default backend.)"""
    future = asyncio.get_running_loop().run_in_executor(_SYNC_THREADS, func)
    with anyio.CancelScope(shield=True):
        await future
    return future.result()  # (done: the shielded wait ends only with it)


class AgentBus:
    """The one way a subagent touches its workspace, its terminal and the downstream MCP servers
    its run allows; the calls a person may care about pass the permission policy first."""

    def __init__(
        self,
        *,
        agent_id: str,
        workspace: Path,
        write_scope: WriteScope,
        fence: Fence,
        audit: AuditLog,
        terminal: Terminal,
        limits: FileLimits | None = None,
        git_dir: Path | Callable[[], Path | None] | None = None,
        policy: PermissionPolicy | None = None,
        gate: CallGate | None = None,
        external: ExternalSession | None = None,
        external_tools: Sequence[ExternalTool] = (),
        resources: Collection[str] = (),
        held_resources: Collection[str] = (),
        network: bool = False,
        quick_files: bool = False,
    ) -> None:
        """`quick_files`: the workspace is on a local filesystem with no daemon in between
        (a view of the kernel's overlayfs), so small file calls may run in the event loop's
        thread (see the module's docstring)."""
        self.agent_id = agent_id
        self.quick_files = quick_files
        self.jail = Jail(workspace)
        self.write_scope = write_scope
        self.fence = fence
        self.audit = audit
        self.terminal = terminal
        self.limits = limits or FileLimits()
        self.policy = policy or PermissionPolicy()
        self.gate = gate
        self.external = external
        self.external_tools = {tool.name: tool for tool in external_tools}
        self.resources = frozenset(resources)
        """Named resources the agent declared: its commands may name them."""
        self.held_resources = frozenset(held_resources)
        """Declared resources it holds for its whole life (taken with its write scope)."""
        self.network_wanted = network
        self.network_decided = False
        self._loop_fence = _LoopFence(fence)
        self.files = FileOps(self.jail, write_scope, self._loop_fence, self.limits, git_dir=git_dir)
        # (taken without yielding to the event loop when free: a yield in a burst of agents is a
        # wait behind every other ready one)
        self._mutation_lock = anyio.Lock(fast_acquire=True)
        self._why = ""
        # the paths the audit's records wrote and showed, and how many records were read
        self._written: set[str] = set()
        self._read: set[str] = set()
        self._paths_taken = 0

    def tool_specs(self) -> list[ToolSpec]:
        """The tools this agent's model is offered (see `agent_tool_specs`)."""
        return agent_tool_specs(list(self.external_tools.values()))

    def written_paths(self) -> list[str]:
        """Paths written or edited through the bus (real relative paths, sorted, unique)."""
        self._take_paths()
        return sorted(self._written)

    def read_paths(self, limit: int = 500) -> list[str]:
        """Files whose contents the bus showed the agent so far (sorted, unique, at most
        `limit`)."""
        self._take_paths()
        return sorted(self._read)[:limit]

    def _take_paths(self) -> None:
        """Add the paths of the audit records not read yet to the written and read sets: both
        are asked for at every turn, and an agent may make thousands of calls."""
        new = self.audit.records_after(self._paths_taken)
        self._paths_taken += len(new)
        for r in new:
            if r.op in ("write_file", "edit_file") and r.outcome == "ok" and r.path:
                self._written.add(r.path)
            self._read.update(r.paths_read())

    async def call(self, name: str, arguments: Mapping[str, object], why: str = "") -> ToolOutcome:
        """Run one tool call; refusals and failures come back as error outcomes. `why`: what
        the model said with the call (shown to the person when the policy asks)."""
        self._why = why
        started = time.time()
        t0 = time.monotonic()
        self._loop_fence.loop_thread = threading.get_ident()
        token = self._token()
        facts = _Facts(path=self._path_hint(arguments))
        outcome: Outcome = "ok"
        detail: str | None = None
        error_type: str | None = None
        try:
            external = self.external_tools.get(name)
            if external is not None:
                text, facts = await self._external_call(external, arguments, facts)
                return ToolOutcome(content=text, is_error=facts.is_error)
            model = _MODELS.get(name)
            if model is None or (name == "read_mcp_resource" and not self.external_tools):
                names = [s.name for s in self.tool_specs()]
                raise InvalidArguments(f"unknown tool {name!r}; the tools are: {', '.join(names)}")
            if not isinstance(arguments, Mapping):  # pyright: ignore[reportUnnecessaryIsInstance]
                raise InvalidArguments(f"arguments of {name} must be a JSON object")
            try:
                args = model.model_validate(dict(arguments))
            except ValidationError as exc:
                raise InvalidArguments(_validation_message(name, model, exc)) from None
            handler = self._HANDLERS[name]
            if name in MUTATING_TOOLS:
                async with self._mutation_lock:
                    text, done = await handler(self, args)
            else:
                text, done = await handler(self, args)
            if done.path is None:
                done.path = facts.path
            facts = done
            return ToolOutcome(content=text, is_error=facts.is_error)
        except ToolbusError as exc:
            if isinstance(exc, PermissionRefused):
                facts.permission = exc.permission
            outcome, error_type, detail = "refused", type(exc).__name__, str(exc)
            return ToolOutcome(content=f"{error_type}: {exc}", is_error=True)
        except anyio.get_cancelled_exc_class():
            outcome, error_type, detail = "error", "Cancelled", "the call was cancelled"
            raise
        except Exception as exc:
            outcome, error_type, detail = "error", type(exc).__name__, str(exc)
            return ToolOutcome(
                content=f"internal error ({error_type}): {exc}; the call did not complete",
                is_error=True,
            )
        finally:
            self.audit.append(
                agent_id=self.agent_id,
                op=name,
                args_brief=_args_brief(arguments),
                outcome=outcome,
                started=started,
                duration_ms=(time.monotonic() - t0) * 1000,
                detail=detail,
                error_type=error_type,
                token=token,
                path=facts.path,
                command=_command_of(name, arguments),
                exit_code=facts.exit_code,
                timed_out=facts.timed_out,
                bytes_written=facts.bytes_written,
                replacements=facts.replacements,
                reads=facts.reads,
                permission=facts.permission,
            )

    def _token(self) -> int | None:
        try:
            return self.fence.token
        except Exception:
            return None

    @staticmethod
    def _path_hint(arguments: object) -> str | None:
        if isinstance(arguments, Mapping):
            value = cast(Mapping[str, object], arguments).get("path")
            if isinstance(value, str):
                return value[:300]
        return None

    # ---- handlers ----------------------------------------------------------------------------

    async def _read_file(self, args: ReadFileArgs) -> tuple[str, _Facts]:
        read = partial(self.files.read, args.path, args.offset, args.limit)
        result = None
        if self.quick_files:
            with contextlib.suppress(NotQuick):
                result = read(quick=True)
        if result is None:
            result = await anyio.to_thread.run_sync(read)
        return render_read(result), _Facts(path=result.path)

    async def _write_file(self, args: WriteFileArgs) -> tuple[str, _Facts]:
        permission = await self._permit_write(args.path)
        result = await self._write(partial(self.files.begin_write, args.path, args.content))
        assert isinstance(result, WriteResult)
        facts = _Facts(path=result.path, bytes_written=result.bytes_written, permission=permission)
        return render_write(result), facts

    async def _write(self, begin: Callable[..., PendingWrite]) -> WriteResult | EditResult:
        """A write or edit: with `quick_files`, made up to its durability in this thread and
        synced in a worker thread; else all in a worker thread."""
        if self.quick_files:
            try:
                pending = begin(quick=True)
            except NotQuick:
                pass
            else:
                return await _in_sync_thread(pending.finish)
        return await anyio.to_thread.run_sync(lambda: begin().finish())

    async def _edit_file(self, args: EditFileArgs) -> tuple[str, _Facts]:
        permission = await self._permit_write(args.path)
        result = await self._write(
            partial(self.files.begin_edit, args.path, args.old, args.new, args.replace_all)
        )
        assert isinstance(result, EditResult)
        facts = _Facts(
            path=result.path,
            bytes_written=result.bytes_written,
            replacements=result.replacements,
            permission=permission,
        )
        return render_edit(result), facts

    async def _list_files(self, args: ListFilesArgs) -> tuple[str, _Facts]:
        result = await anyio.to_thread.run_sync(self.files.list, args.path, args.pattern)
        return render_list(result), _Facts(path=result.path)

    async def _search(self, args: SearchArgs) -> tuple[str, _Facts]:
        result = await anyio.to_thread.run_sync(
            self.files.search, args.pattern, args.path, args.glob
        )
        shown = sorted({m.path for m in result.matches})
        return render_search(result), _Facts(path=args.path or None, reads=shown or None)

    async def _run_command(self, args: RunCommandArgs) -> tuple[str, _Facts]:
        self.fence.check(None)
        undeclared = sorted(set(args.resources) - self.resources)
        if undeclared:
            declared = ", ".join(sorted(self.resources)) or "none"
            raise InvalidArguments(
                f"resources {', '.join(undeclared)} are not declared by your task (declared: "
                f"{declared}); run the command without them, or report that the task needs them"
            )
        permission = await self._permit(PermissionRequest(kind="command", subject=args.command))
        if self.network_wanted and not self.network_decided:
            permission += "; " + await self._decide_network(args.command)
        names = sorted(set(args.resources) - self.held_resources)
        if names and self.gate is not None:
            async with self.gate.hold(names):
                self.fence.check(None)
                result = await self.terminal.run(args.command, args.timeout_s)
        else:
            result = await self.terminal.run(args.command, args.timeout_s)
        facts = _Facts(exit_code=result.exit_code, timed_out=result.timed_out)
        facts.is_error = result.timed_out
        facts.permission = permission
        return render_command(result), facts

    async def _decide_network(self, command: str) -> str:
        """The task asked for the network: the policy (and the person) decide once, at its
        first command; granted, its commands run with the network from then on."""
        try:
            permission = await self._permit(PermissionRequest(kind="network"), subject=command)
        except PermissionRefused as exc:
            self.network_decided = True
            raise PermissionRefused(
                f"{exc} The command did not run; run it again to run it without the network "
                "(every later command runs without it).",
                permission=f"network: {exc.permission}",
            ) from None
        self.network_decided = True
        self.terminal.grant_network()
        return f"network: {permission}"

    async def _read_mcp_resource(self, args: ReadMcpResourceArgs) -> tuple[str, _Facts]:
        servers = sorted({tool.server for tool in self.external_tools.values()})
        if args.server not in servers or self.external is None:
            raise InvalidArguments(
                f"no MCP server {args.server!r} here; the servers are: {', '.join(servers)}"
            )
        async with self._hold_connection(args.server, shared=True):
            outcome = await self.external.read_resource(args.server, args.uri)
        return outcome.content, _Facts(path=None, is_error=outcome.is_error)

    async def _external_call(
        self, tool: ExternalTool, arguments: Mapping[str, object], facts: _Facts
    ) -> tuple[str, _Facts]:
        if self.external is None:
            raise ExternalServerError(f"{tool.name}: no connection to the MCP servers")
        permission = await self._permit(
            PermissionRequest(
                kind="mcp",
                subject=tool.name,
                read_only=tool.read_only,
                destructive=tool.destructive,
            )
        )
        facts.permission = permission
        args = cast(Mapping[str, JsonValue], arguments)
        async with self._hold_connection(tool.server, shared=tool.read_only):
            outcome = await self.external.call_tool(tool.server, tool.tool, args)
        facts.is_error = outcome.is_error
        return outcome.content, facts

    def _hold_connection(self, server: str, *, shared: bool) -> AbstractAsyncContextManager[None]:
        """The lease on a downstream server's connection: read for read-only calls, which run
        concurrently, write for the others, which run one at a time across agents."""
        if self.gate is None:
            return nullcontext()
        return self.gate.hold([connection_lease(server)], shared=shared)

    # ---- permissions -----------------------------------------------------------------------

    async def _permit_write(self, path: str) -> str:
        """The policy's decision on a write of `path`, taken on the file it reaches: through
        a link (`notes -> .github/workflows`), that file's rules apply, and the person asked
        sees both names."""
        typed = normalize_path(path)
        try:
            real = self.files.jail.resolve(path)
        except ToolbusError:
            real = typed  # (the write itself refuses it, and says why)
        shown = None if real == typed else f"{typed} (it leads to {real})"
        return await self._permit(PermissionRequest(kind="write", subject=real), shown)

    async def _permit(self, request: PermissionRequest, subject: str | None = None) -> str:
        """The policy's decision on the call, as the audit records it; raises
        `PermissionRefused` when it denies or the person refuses (or does not answer)."""
        verdict = self.policy.decide(request)
        rule = verdict.rule if verdict.layer == "settings" else f"{verdict.rule} ({verdict.layer})"
        if verdict.decision == "allow":
            return f"allow ({rule})"
        what = _describe_request(request, subject)
        if verdict.decision == "deny":
            raise PermissionRefused(
                f"{what} is denied by the permission policy ({rule}); do the task another way, "
                "or report in your summary that it needs this",
                permission=f"deny ({rule})",
            )
        if self.gate is None:
            raise PermissionRefused(
                f"{what} needs a person's approval ({rule}) and no one can approve here; do the "
                "task another way, or report in your summary that it needs this",
                permission=f"ask ({rule}): refused, no approver",
            )
        answer = await self.gate.approve(
            ApprovalRequest(
                agent_id=self.agent_id,
                kind=request.kind,
                subject=subject or request.subject or what,
                why=self._why,
                rule=rule,
            )
        )
        if answer.allowed:
            return f"ask ({rule}): allowed by {answer.by}"
        note = f": {answer.note}" if answer.note else ""
        if answer.by == "timeout":
            refusal = f"{what} needed a person's approval ({rule}); no answer came in time"
        else:
            refusal = f"the person refused {what}{note}"
        raise PermissionRefused(
            f"{refusal}. Do the task another way, or report in your summary that it needs this",
            permission=f"ask ({rule}): refused by {answer.by}{note}",
        )

    # each tool's handler, called with the bus: a table of bound methods kept on the bus would
    # make every bus a reference cycle, freed only by the cycle collector
    _HANDLERS: ClassVar[dict[str, Callable[[AgentBus, Any], Awaitable[tuple[str, _Facts]]]]] = {
        "read_file": _read_file,
        "write_file": _write_file,
        "edit_file": _edit_file,
        "list_files": _list_files,
        "search": _search,
        "run_command": _run_command,
        "read_mcp_resource": _read_mcp_resource,
    }


def agent_tool_specs(external_tools: Sequence[ExternalTool]) -> list[ToolSpec]:
    """The tools a subagent's model is offered: the subagent tools, then the downstream
    servers' tools its run allows (and the resource reader when there are any)."""
    specs = list(SUBAGENT_TOOL_SPECS)
    if external_tools:
        specs += [tool.spec() for tool in external_tools]
        specs.append(MCP_RESOURCE_TOOL)
    return specs


def _describe_request(request: PermissionRequest, subject: str | None) -> str:
    if request.kind == "command":
        return f"the command {request.subject[:200]!r}"
    if request.kind == "write":
        return f"writing {request.subject}"
    if request.kind == "network":
        return "network access for your commands"
    return f"the MCP tool {request.subject}"


# ---- rendering for the model -------------------------------------------------------------------


def render_read(r: ReadResult) -> str:
    if r.total_lines == 0:
        return f"{r.path} is empty (0 lines)."
    if r.start_line > r.total_lines:
        return (
            f"{r.path} has {r.total_lines} lines; offset {r.start_line} is past the end "
            "(use a smaller offset)."
        )
    head = f"{r.path} — lines {r.start_line}-{r.end_line} of {r.total_lines}"
    out = f"{head}\n{r.text}"
    if r.truncated:
        out += (
            f"\n[truncated: lines {r.end_line + 1}-{r.total_lines} not shown; call read_file "
            f"with offset={r.next_offset} to read the next page]"
        )
    return out


def render_write(r: WriteResult) -> str:
    how = "new file" if r.created else f"replaced {r.previous_bytes} bytes"
    return f"Wrote {r.bytes_written} bytes to {r.path} ({how})."


def render_edit(r: EditResult) -> str:
    plural = "" if r.replacements == 1 else "s"
    return (
        f"Edited {r.path}: {r.replacements} replacement{plural}; "
        f"the file is now {r.bytes_written} bytes (was {r.previous_bytes})."
    )


def render_list(r: ListResult) -> str:
    where = r.path or "the repository root"
    what = f" matching {r.pattern!r}" if r.pattern else ""
    if not r.entries:
        return f"No files under {where}{what}."
    out = "\n".join(r.entries)
    if r.truncated:
        out += f"\n[showing {len(r.entries)} of {r.total} entries; narrow with path or pattern]"
    return out


def render_search(r: SearchResult) -> str:
    if not r.matches:
        note = " (stopped early: time budget)" if r.stopped_early else ""
        return f"No matches for /{r.pattern}/ in {r.files_searched} files searched{note}."
    lines = [f"{m.path}:{m.line}: {m.text}" for m in r.matches]
    summary = (
        f"[{r.total_matches} matching lines in {r.files_with_matches} files "
        f"({r.files_searched} files searched)"
    )
    if r.truncated:
        summary += f"; showing the first {len(r.matches)} — narrow with path, glob or pattern"
    if r.stopped_early:
        summary += "; stopped early (time budget), some files were not searched"
    return "\n".join([*lines, summary + "]"])


def render_command(r: CommandResult) -> str:
    head = f"exit code {r.exit_code} after {r.duration_ms / 1000:.1f} s"
    if r.timed_out:
        head = (
            f"TIMED OUT after {r.duration_ms / 1000:.1f} s: the command and its processes were "
            "killed (pass a larger timeout_s, or run less at once)"
        )
    parts = [head]
    if r.warning:
        parts.append(f"[warning: {r.warning}]")
    parts.append(r.output if r.output else "(no output)")
    if r.truncated:
        parts.append(f"[output was {r.output_bytes} bytes; the middle was cut]")
    return "\n".join(parts)
