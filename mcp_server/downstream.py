"""Downstream MCP servers for subagents: the configuration file, and `toolbus.external`'s
`ExternalTools` implemented with MCP clients.

Connections are owned by tasks: every client is an `mcp.Client` entered and exited by one owner
task (anyio cancel scopes must be exited by the task that entered them). Agents' connections run
in the task group of `DownstreamServers` (enter it with `async with`, from the server's lifespan);
the owner waits for a stop event, and callers use the client from their own tasks. A listing
connection is opened in the lister's own task group and closed once the tools are read.

Each agent's session has its own client per server, opened on its first call; a failed one is
dropped and reopened on a later call after an exponential backoff. One agent's failure (a crashed
server, a hung call) closes only that agent's connection.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import logging
import math
import os
import tempfile
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, Literal, Never, Self, TextIO, TypeVar, cast

import anyio
import anyio.abc
import httpx2
from mcp import Client, MCPError, StdioServerParameters
from mcp.client import Transport
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import (
    CONNECTION_CLOSED,
    REQUEST_TIMEOUT,
    AudioContent,
    BlobResourceContents,
    CallToolResult,
    ContentBlock,
    ImageContent,
    ReadResourceResult,
    ResourceLink,
    TextContent,
    TextResourceContents,
    Tool,
)
from pydantic import BaseModel, ConfigDict, Field, JsonValue, TypeAdapter, ValidationError

from toolbus.external import MAX_SERVER_NAME, SERVER_NAME, ExternalServerError, ExternalTool
from toolbus.toolspec import ToolOutcome

__all__ = [
    "DownstreamConfig",
    "DownstreamConfigError",
    "DownstreamServers",
    "DownstreamSession",
    "HttpServerConfig",
    "StdioServerConfig",
    "bound_text",
    "load_downstream_config",
    "parse_downstream_config",
    "render_resource",
    "render_tool_result",
]

log = logging.getLogger("fanout.mcp")

_R = TypeVar("_R")

LOCALE_ENV = ("LANG", "LC_ALL", "LC_CTYPE")
"""Variables passed to stdio servers besides the MCP SDK's safe set (HOME, PATH, USER, ...)."""

CAUSE_CHARS = 600
"""How much of a failure's cause (exception text, the server's stderr) an error message carries."""

STDERR_KEEP_BYTES = 1 << 20
"""A stdio server's stderr is kept in an unlinked file, emptied when it grows past this."""

LIST_PAGE_CAP = 100
"""Pages of `tools/list` read at most: a paginator that never ends cannot hang a listing."""


class DownstreamConfigError(ValueError):
    """The downstream server configuration is unusable; the message names the entry and the fix."""


class StdioServerConfig(BaseModel):
    """A server started as a subprocess and spoken to over its stdin/stdout."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: Literal["stdio"] = "stdio"
    command: str = Field(min_length=1)
    args: list[str] = Field(default_factory=list[str])
    env: dict[str, str] = Field(default_factory=dict[str, str])
    cwd: str | None = None


# in a stdio server's `cwd`, `args` and `env` values: the agent's workspace (for the listing of
# tools, which no agent asked for: this server's working directory)
WORKSPACE_MARK = "{workspace}"
# the variable that tells a stdio server the agent's workspace
WORKSPACE_ENV = "FANOUT_WORKSPACE"


def _with_workspace(value: str, workspace: str | None) -> str:
    return value.replace(WORKSPACE_MARK, workspace if workspace is not None else os.getcwd())


class HttpServerConfig(BaseModel):
    """A server reached over Streamable HTTP at `url`."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: Literal["http", "streamable-http"] = "http"
    url: str = Field(pattern=r"^https?://")
    headers: dict[str, str] = Field(default_factory=dict[str, str])


class DownstreamConfig(BaseModel):
    """The configured downstream servers by name (Claude Desktop's `mcpServers` shape)."""

    model_config = ConfigDict(frozen=True, validate_by_name=True, validate_by_alias=True)

    servers: dict[str, StdioServerConfig | HttpServerConfig] = Field(alias="mcpServers")


_json_object = TypeAdapter(dict[str, JsonValue])


def load_downstream_config(path: str | os.PathLike[str]) -> DownstreamConfig:
    """Read and validate a configuration file; a relative `cwd` is taken from the file's folder."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise DownstreamConfigError(
            f"cannot read the downstream MCP server configuration {str(file)!r}: {reason}; "
            "check the path and its permissions"
        ) from exc
    return parse_downstream_config(text, source=str(file), base_dir=file.parent)


def parse_downstream_config(
    text: str, *, source: str = "the configuration", base_dir: Path | None = None
) -> DownstreamConfig:
    """Validate configuration text; every error names the entry at fault and what to do."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DownstreamConfigError(
            f"{source} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "fix the syntax"
        ) from exc
    example = '{"mcpServers": {"<name>": {"command": "...", "args": []}}}'
    if not isinstance(data, dict) or "mcpServers" not in data:
        raise DownstreamConfigError(
            f'{source} has no "mcpServers" object at the top level; write it as {example}'
        )
    entries = cast(dict[str, JsonValue], data)["mcpServers"]
    if not isinstance(entries, dict):
        raise DownstreamConfigError(
            f'{source}: "mcpServers" must be an object of servers by name, as in {example}'
        )
    servers: dict[str, StdioServerConfig | HttpServerConfig] = {}
    for name, entry in entries.items():
        servers[name] = _parse_entry(source, name, entry, base_dir)
    return DownstreamConfig(mcpServers=servers)


def _parse_entry(
    source: str, name: str, entry: JsonValue, base_dir: Path | None
) -> StdioServerConfig | HttpServerConfig:
    where = f"{source}: mcpServers entry {name!r}"
    # '__' inside or '_' at the end would make mcp__<server>__<tool> split at the wrong place
    if not SERVER_NAME.fullmatch(name) or len(name) > MAX_SERVER_NAME:
        raise DownstreamConfigError(
            f"{where}: a server name is 1 to 40 letters, digits, '_' or '-', with no '__' and "
            "no '_' at the end (it becomes part of the tool names mcp__<server>__<tool>); "
            "rename the entry"
        )
    if not isinstance(entry, dict):
        raise DownstreamConfigError(f'{where} must be an object with "command" or "url"')
    fields = _json_object.validate_python(entry)
    kind = fields.get("type")
    has_command, has_url = "command" in fields, "url" in fields
    if has_command and has_url:
        raise DownstreamConfigError(
            f'{where} has both "command" (a stdio server) and "url" (an HTTP server); keep one'
        )
    if not has_command and not has_url:
        raise DownstreamConfigError(
            f'{where} has neither "command" (a stdio server) nor "url" (an HTTP server); '
            "give exactly one"
        )
    if kind is not None and kind not in ("stdio", "http", "streamable-http"):
        raise DownstreamConfigError(
            f'{where}: type {kind!r} is not supported; use a stdio server ("command") or a '
            'Streamable HTTP endpoint ("url" with "type": "http")'
        )
    if (kind == "stdio" and has_url) or (kind in ("http", "streamable-http") and has_command):
        key = "url" if has_url else "command"
        raise DownstreamConfigError(f'{where} declares "type": {kind!r} but has "{key}"; fix one')
    model = StdioServerConfig if has_command else HttpServerConfig
    try:
        parsed = model.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'entry'}: {err['msg']}"
            for err in exc.errors(include_url=False)
        )
        raise DownstreamConfigError(f"{where} is invalid ({problems}); fix it") from exc
    if (
        isinstance(parsed, StdioServerConfig)
        and parsed.cwd
        and base_dir is not None
        and not parsed.cwd.startswith(WORKSPACE_MARK)
    ):
        parsed = parsed.model_copy(update={"cwd": str(base_dir / parsed.cwd)})
    return parsed


def bound_text(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, keeping its beginning and end around a marker."""
    if len(text) <= limit:
        return text
    if limit < 120:
        return text[:limit]
    keep = limit - 60
    head, tail = keep - keep // 2, keep // 2
    omitted = len(text) - head - tail
    marker = f"\n[... {omitted} of {len(text)} characters omitted ...]\n"
    return text[:head] + marker + text[len(text) - tail :]


def _seconds(value: float) -> str:
    return f"{value:.3g}"


def _first_leaf(exc: BaseException) -> BaseException:
    if isinstance(exc, BaseExceptionGroup):
        group = cast(BaseExceptionGroup[BaseException], exc)
        return _first_leaf(group.exceptions[0]) if group.exceptions else group
    return exc


def _describe(exc: BaseException) -> str:
    """A short text of an exception, looking inside exception groups for the first cause."""
    exc = _first_leaf(exc)
    if isinstance(exc, MCPError) and exc.code == CONNECTION_CLOSED:
        return "the connection closed (the server exited or closed its output)"
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError | ValueError | RuntimeError) and type(exc).__name__ not in text:
        text = f"{type(exc).__name__}: {text}"
    return bound_text(text, CAUSE_CHARS)


class _StderrLog:
    """A stdio server's stderr in an unlinked file, for the tail a failure message quotes."""

    def __init__(self) -> None:
        # lives as long as the server process, closed by the connection's owner
        self.file: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        fd = self.file.fileno()
        # appends land at the end even after we empty the file (the child shares the descriptor)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
        self._last = ""

    def tail(self, chars: int = CAUSE_CHARS) -> str:
        """The last lines the server wrote to stderr, bounded."""
        if self.file.closed:
            return self._last
        fd = self.file.fileno()
        size = os.fstat(fd).st_size
        data = os.pread(fd, chars * 4, max(0, size - chars * 4)).decode("utf-8", "replace")
        return data.strip()[-chars:]

    def trim(self) -> None:
        """Empty the file once it holds more than `STDERR_KEEP_BYTES` (a chatty server)."""
        if not self.file.closed and os.fstat(self.file.fileno()).st_size > STDERR_KEEP_BYTES:
            os.ftruncate(self.file.fileno(), 0)

    def close(self) -> None:
        if not self.file.closed:
            self._last = self.tail()
            self.file.close()


class _Connection:
    """One MCP client to one server, entered and exited by its owner task (`run`)."""

    def __init__(
        self,
        server: str,
        config: StdioServerConfig | HttpServerConfig,
        *,
        workspace: str | None,
        connect_timeout_s: float,
        mode: Literal["auto", "legacy"],
    ) -> None:
        self.server = server
        self._config = config
        self._workspace = workspace
        self._connect_timeout_s = connect_timeout_s
        self._mode: Literal["auto", "legacy"] = mode
        self._stop = anyio.Event()
        self.done = anyio.Event()
        self.client: Client | None = None
        self._stderr: _StderrLog | None = None

    @property
    def usable(self) -> bool:
        return self.client is not None and not self._stop.is_set()

    def stop(self) -> None:
        """Ask the owner task to close the client (it does so in the background)."""
        self._stop.set()

    async def aclose(self) -> None:
        self._stop.set()
        await self.done.wait()

    def stderr_tail(self) -> str:
        return self._stderr.tail() if self._stderr is not None else ""

    def trim_stderr(self) -> None:
        if self._stderr is not None:
            self._stderr.trim()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Own the client: open it, report started, hold it until stopped, close it.

        A failure before start is raised to the starter (as `_StartFailed`); after start it only
        ends the connection, never the task group."""
        started = False
        try:
            deadline = anyio.current_time() + self._connect_timeout_s
            with anyio.CancelScope(deadline=deadline) as scope:
                async with self._open() as client:
                    scope.deadline = math.inf
                    self.client = client
                    started = True
                    task_status.started()
                    await self._stop.wait()
            if scope.cancelled_caught and not started:
                raise TimeoutError(
                    f"no answer to the MCP handshake within {_seconds(self._connect_timeout_s)} s"
                )
        except Exception as exc:
            if not started:
                raise _StartFailed(self.failure_text(exc)) from exc
            log.info("downstream MCP server %r: connection ended: %s", self.server, _describe(exc))
        finally:
            self.client = None
            self._stop.set()
            if self._stderr is not None:
                self._stderr.close()
            self.done.set()

    def failure_text(self, exc: BaseException) -> str:
        text = _describe(exc)
        tail = self.stderr_tail()
        return f"{text}; its stderr ends with: {tail}" if tail else text

    @asynccontextmanager
    async def _open(self) -> AsyncGenerator[Client]:
        config = self._config
        async with AsyncExitStack() as stack:
            transport: Transport
            if isinstance(config, StdioServerConfig):
                self._stderr = _StderrLog()
                locale = {k: v for k in LOCALE_ENV if (v := os.environ.get(k)) is not None}
                # It runs outside the sandbox, so it never starts in the agent's workspace
                # unless the configuration says so: a launcher reads what it finds in its
                # working directory (npx runs a package an agent planted in `node_modules`,
                # with this server's environment; `python -m x` imports an `x` found there
                # first, which PYTHONSAFEPATH stops; its own env may say otherwise)
                safe = {"PYTHONSAFEPATH": "1"} if "-m" in config.args else {}
                workspace = self._workspace
                told = {WORKSPACE_ENV: workspace} if workspace is not None else {}
                params = StdioServerParameters(
                    command=config.command,
                    args=[_with_workspace(a, workspace) for a in config.args],
                    env=locale
                    | safe
                    | told
                    | {k: _with_workspace(v, workspace) for k, v in config.env.items()},
                    cwd=_with_workspace(config.cwd, workspace) if config.cwd else None,
                )
                errlog = cast(TextIO, self._stderr.file)
                transport = stdio_client(params, errlog=errlog)
            else:
                http = await stack.enter_async_context(
                    httpx2.AsyncClient(
                        headers=config.headers, timeout=httpx2.Timeout(30.0, read=300.0)
                    )
                )
                transport = streamable_http_client(config.url, http_client=http)
            # no sampling, elicitation or roots callbacks: those capabilities are not advertised
            # and a downstream request for them is declined; no response cache (reads are live)
            client = Client(transport, mode=self._mode, cache=None)
            yield await stack.enter_async_context(client)


class _StartFailed(Exception):
    """A connection could not be opened; the message is the cause, stderr tail included."""


class _Link:
    """A session's state for one server: its live connection and its backoff."""

    def __init__(self) -> None:
        self.lock = anyio.Lock()
        self.conn: _Connection | None = None
        self.failures = 0
        self.retry_at = -math.inf


class DownstreamServers:
    """The configured downstream servers: tool listings (cached) and per-agent sessions.

    Enter it (`async with`) in the task that owns the server's lifespan: its task group holds
    the agents' connections."""

    def __init__(
        self,
        config: DownstreamConfig,
        *,
        call_timeout_s: float = 60.0,
        max_result_chars: int = 30_000,
        connect_timeout_s: float = 60.0,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        mode: Literal["auto", "legacy"] = "auto",
    ) -> None:
        self.config = config
        self.call_timeout_s = call_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_result_chars = max_result_chars
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.mode: Literal["auto", "legacy"] = mode
        self._tools: dict[str, list[ExternalTool]] = {}
        self._list_locks: dict[str, anyio.Lock] = {}
        self._sessions: set[DownstreamSession] = set()
        self._stack: AsyncExitStack | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._closed = False

    async def __aenter__(self) -> Self:
        async with AsyncExitStack() as stack:
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.aclose()
        finally:
            stack, self._stack, self._tg = self._stack, None, None
            if stack is not None and isinstance(exc, Exception):
                # the body's own error propagates as it is, not wrapped in an exception group
                await stack.__aexit__(None, None, None)
            elif stack is not None:
                await stack.__aexit__(exc_type, exc, tb)

    def servers(self) -> list[str]:
        """The configured server names, sorted."""
        return sorted(self.config.servers)

    def _server(self, server: str) -> StdioServerConfig | HttpServerConfig:
        config = self.config.servers.get(server)
        if config is None:
            known = ", ".join(self.servers()) or "none"
            raise ExternalServerError(
                f"no downstream MCP server is configured as {server!r} (configured: {known})"
            )
        return config

    def _connection(self, server: str, workspace: str | None) -> _Connection:
        return _Connection(
            server,
            self._server(server),
            workspace=workspace,
            connect_timeout_s=self.connect_timeout_s,
            mode=self.mode,
        )

    async def list_tools(self, servers: Sequence[str]) -> list[ExternalTool]:
        """The servers' tools by (server, tool), each server listed once (concurrently) and
        cached; raises `ExternalServerError` naming every server that is unknown or failed."""
        wanted = sorted(set(servers))
        for server in wanted:
            self._server(server)
        failures: dict[str, str] = {}

        async def one(server: str) -> None:
            try:
                await self._list_server(server)
            except ExternalServerError as exc:
                failures[server] = str(exc)

        async with anyio.create_task_group() as tg:
            for server in wanted:
                tg.start_soon(one, server)
        if failures:
            raise ExternalServerError("; ".join(failures[s] for s in sorted(failures)))
        return [tool for server in wanted for tool in self._tools[server]]

    async def _list_server(self, server: str) -> None:
        lock = self._list_locks.setdefault(server, anyio.Lock())
        async with lock:
            if server in self._tools:
                return
            listed = await self._read_listing(server)
            tools = [_external_tool(server, tool) for tool in listed]
            self._tools[server] = sorted(tools, key=lambda t: t.tool)

    async def _read_listing(self, server: str) -> list[Tool]:
        """Every tool of `server`, through a connection opened for it and closed after."""
        conn = self._connection(server, None)
        listed: list[Tool] = []
        failure: str | None = None
        async with anyio.create_task_group() as tg:
            try:
                await tg.start(conn.run)
            except _StartFailed as exc:
                failure = f"it could not be started: {exc}"
            else:
                try:
                    failure = await self._read_pages(conn, listed)
                finally:
                    conn.stop()
        if failure is not None:
            raise ExternalServerError(
                f"downstream MCP server {server!r} could not list its tools: {failure}"
            )
        return listed

    async def _read_pages(self, conn: _Connection, listed: list[Tool]) -> str | None:
        """Read the listing into `listed`; the failure's text, or None."""
        client = conn.client
        try:
            if client is None:
                raise ConnectionError("the connection closed")
            with anyio.move_on_after(self.call_timeout_s) as scope:
                cursor: str | None = None
                for _ in range(LIST_PAGE_CAP):
                    page = await client.list_tools(cursor=cursor)
                    listed.extend(page.tools)
                    cursor = page.next_cursor
                    if cursor is None:
                        break
            if scope.cancelled_caught:
                raise TimeoutError(f"no tool list within {_seconds(self.call_timeout_s)} s")
        except Exception as exc:
            return conn.failure_text(exc)
        return None

    def session(self, agent_id: str, workspace: str | None = None) -> DownstreamSession:
        """A new session of one agent whose workspace is `workspace`: its stdio servers are
        told it (`FANOUT_WORKSPACE`, `{workspace}` in their configuration), and start in the
        configuration's `cwd`, else in this server's own working directory."""
        session = DownstreamSession(self, agent_id, workspace)
        self._sessions.add(session)
        return session

    async def _start(self, conn: _Connection) -> None:
        if self._closed:
            raise ExternalServerError("the downstream MCP servers are closed (the server stops)")
        if self._tg is None:
            raise RuntimeError(
                "DownstreamServers must be entered (async with) before agents' sessions connect"
            )
        await self._tg.start(conn.run)

    def _forget(self, session: DownstreamSession) -> None:
        self._sessions.discard(session)

    async def aclose(self) -> None:
        """Close every session made; later connections are refused."""
        self._closed = True
        sessions = list(self._sessions)
        async with anyio.create_task_group() as tg:
            for session in sessions:
                tg.start_soon(session.aclose)


class DownstreamSession:
    """One agent's own connections to the downstream servers, opened on first use."""

    def __init__(self, owner: DownstreamServers, agent_id: str, workspace: str | None) -> None:
        self._owner = owner
        self.agent_id = agent_id
        self.workspace = workspace
        self._links: dict[str, _Link] = {}
        self._closed = False

    async def call_tool(
        self, server: str, tool: str, arguments: Mapping[str, JsonValue]
    ) -> ToolOutcome:
        """Call the tool on this agent's connection; the result's text, bounded."""
        args = dict(arguments)
        result = await self._ask(server, lambda client: client.call_tool(tool, args))
        if isinstance(result, ToolOutcome):
            return result
        text = bound_text(render_tool_result(result), self._owner.max_result_chars)
        return ToolOutcome(content=text, is_error=result.is_error)

    async def read_resource(self, server: str, uri: str) -> ToolOutcome:
        """Read the resource on this agent's connection; its text, bounded."""
        result = await self._ask(server, lambda client: client.read_resource(uri))
        if isinstance(result, ToolOutcome):
            return result
        return ToolOutcome(
            content=bound_text(render_resource(result), self._owner.max_result_chars)
        )

    async def _ask(self, server: str, send: Callable[[Client], Awaitable[_R]]) -> _R | ToolOutcome:
        """One request on this session's connection: the answer, an error outcome for a request
        the server refused, or `ExternalServerError` when the connection failed (it is dropped)."""
        conn = await self._connected(server)
        client = conn.client
        timeout = self._owner.call_timeout_s
        try:
            if client is None:
                raise ConnectionError("the connection closed")
            answers: list[_R] = []
            with anyio.move_on_after(timeout):
                answers.append(await send(client))
            if not answers:
                self._fail(server, conn, f"no answer within {_seconds(timeout)} s")
        except MCPError as exc:
            if exc.code in (CONNECTION_CLOSED, REQUEST_TIMEOUT) or not conn.usable:
                self._fail(server, conn, _describe(exc))
            text = f"the MCP server {server!r} refused the request ({exc.code}): {exc.message}"
            return ToolOutcome(content=bound_text(text, CAUSE_CHARS), is_error=True)
        except (RuntimeError, ValidationError) as exc:
            if not conn.usable:
                self._fail(server, conn, _describe(exc))
            text = f"the MCP server {server!r} gave an invalid answer: {_describe(exc)}"
            return ToolOutcome(content=text, is_error=True)
        except (OSError, anyio.ClosedResourceError, anyio.BrokenResourceError) as exc:
            self._fail(server, conn, _describe(exc))
        self._links[server].failures = 0
        conn.trim_stderr()
        return answers[0]

    async def _connected(self, server: str) -> _Connection:
        """This session's live connection to `server`, opened now if there is none (or raises)."""
        self._owner._server(server)  # pyright: ignore[reportPrivateUsage]
        if self._closed:
            raise ExternalServerError(
                f"the MCP session of agent {self.agent_id!r} is closed; {server!r} cannot be used"
            )
        link = self._links.setdefault(server, _Link())
        async with link.lock:
            if link.conn is not None and link.conn.usable:
                return link.conn
            link.conn = None
            wait = link.retry_at - anyio.current_time()
            if wait > 0:
                raise ExternalServerError(
                    f"downstream MCP server {server!r} failed recently and is not reconnected yet; "
                    f"retry the call after {_seconds(wait)} s"
                )
            conn = self._owner._connection(server, self.workspace)  # pyright: ignore[reportPrivateUsage]
            try:
                await self._owner._start(conn)  # pyright: ignore[reportPrivateUsage]
            except _StartFailed as exc:
                delay = self._backoff(link)
                raise ExternalServerError(
                    f"downstream MCP server {server!r} could not be started: {exc}; the call can "
                    f"be retried after {_seconds(delay)} s"
                ) from exc
            if self._closed:  # closed while connecting
                conn.stop()
                raise ExternalServerError(f"the MCP session of agent {self.agent_id!r} is closed")
            link.conn = conn
            return conn

    def _backoff(self, link: _Link) -> float:
        owner = self._owner
        delay = min(owner.backoff_base_s * 2**link.failures, owner.backoff_max_s)
        link.failures += 1
        link.retry_at = anyio.current_time() + delay
        return delay

    def _fail(self, server: str, conn: _Connection, reason: str) -> Never:
        """Drop the failed connection (once, whoever saw it first) and raise for the caller."""
        link = self._links[server]
        tail = conn.stderr_tail()
        if self._closed:
            conn.stop()
            raise ExternalServerError(f"the MCP session of agent {self.agent_id!r} was closed")
        if link.conn is conn:
            link.conn = None
            delay = self._backoff(link)
        else:
            delay = max(link.retry_at - anyio.current_time(), 0.0)
        conn.stop()
        detail = f"{reason}; its stderr ends with: {tail}" if tail else reason
        raise ExternalServerError(
            f"downstream MCP server {server!r} failed: {bound_text(detail, CAUSE_CHARS)}; "
            f"its connection is closed and the call can be retried after {_seconds(delay)} s "
            "(a call that changes state may or may not have taken effect)"
        )

    async def aclose(self) -> None:
        """Close this agent's connections and wait until their servers are stopped."""
        self._closed = True
        conns = [link.conn for link in self._links.values() if link.conn is not None]
        for link in self._links.values():
            link.conn = None
        async with anyio.create_task_group() as tg:
            for conn in conns:
                tg.start_soon(conn.aclose)
        self._owner._forget(self)  # pyright: ignore[reportPrivateUsage]


def _external_tool(server: str, tool: Tool) -> ExternalTool:
    hints = tool.annotations
    read_only = hints is not None and hints.read_only_hint is True
    destructive = not read_only and (hints is None or hints.destructive_hint is not False)
    return ExternalTool(
        server=server,
        tool=tool.name,
        description=tool.description or tool.title or "",
        input_schema=tool.input_schema,
        read_only=read_only,
        destructive=destructive,
    )


def _decoded_size(data: str) -> int:
    try:
        return len(base64.b64decode(data, validate=False))
    except (binascii.Error, ValueError):
        return len(data) * 3 // 4


def _render_block(block: ContentBlock) -> str:
    if isinstance(block, TextContent):
        return block.text
    if isinstance(block, ImageContent | AudioContent):
        return f"[{block.type}: {block.mime_type}, {_decoded_size(block.data)} bytes]"
    if isinstance(block, ResourceLink):
        return f"[resource link: {block.uri} ({block.name})]"
    return f"[resource {block.resource.uri}]\n{_render_contents(block.resource)}"


def _render_contents(contents: TextResourceContents | BlobResourceContents) -> str:
    if isinstance(contents, TextResourceContents):
        return contents.text
    mime = contents.mime_type or "application/octet-stream"
    return f"[blob: {contents.uri}, {mime}, {_decoded_size(contents.blob)} bytes]"


def render_tool_result(result: CallToolResult) -> str:
    """A tool result as text: its content blocks, or compact JSON of structured content alone."""
    if not result.content and result.structured_content is not None:
        return json.dumps(result.structured_content, separators=(",", ":"), ensure_ascii=False)
    return "\n".join(_render_block(block) for block in result.content)


def render_resource(result: ReadResourceResult) -> str:
    """A resource read as text; several contents each under a header naming its URI."""
    if len(result.contents) == 1:
        return _render_contents(result.contents[0])
    return "\n".join(f"[{c.uri}]\n{_render_contents(c)}" for c in result.contents)
