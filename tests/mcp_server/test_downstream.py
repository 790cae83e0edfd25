"""Downstream MCP servers through real MCP clients: the configuration's errors, listing with
annotations, calls and their bounding, a crashed or hung server, per-agent isolation, resources
and clean shutdown; against `downstream_server` over stdio (both protocol eras) and HTTP."""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

import anyio
import pytest
import uvicorn
from pydantic import BaseModel

from mcp_server.downstream import (
    DownstreamConfig,
    DownstreamConfigError,
    DownstreamServers,
    HttpServerConfig,
    StdioServerConfig,
    bound_text,
    load_downstream_config,
    parse_downstream_config,
)
from tests.mcp_server.downstream_server import build_server
from toolbus.external import ExternalServerError, ExternalTools

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 30.0


class Call(BaseModel):
    """One line of the test server's call log."""

    tool: str
    start: float
    end: float
    pid: int
    cwd: str


def _calls(log: Path) -> list[Call]:
    if not log.exists():
        return []
    return [Call.model_validate_json(line) for line in log.read_text().splitlines()]


def _pids(log: Path, tool: str | None = None) -> set[int]:
    return {c.pid for c in _calls(log) if tool is None or c.tool == tool}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _stdio_entry(log: Path, cwd: Path | None = None) -> StdioServerConfig:
    return StdioServerConfig(
        command=sys.executable,
        args=["-m", "tests.mcp_server.downstream_server", "--log", str(log)],
        env={"PYTHONPATH": str(ROOT)},
        cwd=str(cwd) if cwd else None,
    )


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "calls.jsonl"


@pytest.fixture
def config(tmp_path: Path, log: Path) -> DownstreamConfig:
    home = tmp_path / "server-home"
    home.mkdir()
    return DownstreamConfig(mcpServers={"store": _stdio_entry(log, home)})


def _workspace(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


@asynccontextmanager
async def _servers(
    config: DownstreamConfig,
    *,
    call_timeout_s: float = 60.0,
    mode: Literal["auto", "legacy"] = "auto",
) -> AsyncGenerator[DownstreamServers]:
    servers = DownstreamServers(
        config, call_timeout_s=call_timeout_s, backoff_base_s=0.1, mode=mode
    )
    with anyio.fail_after(WAIT_S):
        async with servers:
            yield servers


# --- configuration -------------------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mcp.json"
    path.write_text(text)
    return path


def test_config_reads_both_kinds_ignores_unknown_keys_and_anchors_cwd(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        json.dumps(
            {
                "mcpServers": {
                    "files": {
                        "type": "stdio",
                        "command": "npx",
                        "args": ["-y", "server-files"],
                        "env": {"TOKEN": "t"},
                        "cwd": "sub",
                        "disabled": False,
                        "autoApprove": [],
                    },
                    "web_2": {"url": "http://127.0.0.1:8000/mcp", "headers": {"X-Key": "k"}},
                },
                "globalShortcut": "",
            }
        ),
    )
    config = load_downstream_config(path)
    files = config.servers["files"]
    assert isinstance(files, StdioServerConfig)
    assert files.args == ["-y", "server-files"] and files.env == {"TOKEN": "t"}
    assert files.cwd == str(tmp_path / "sub")
    web = config.servers["web_2"]
    assert isinstance(web, HttpServerConfig) and web.headers == {"X-Key": "k"}
    tools: ExternalTools = DownstreamServers(config)  # the protocol is met (pyright checks)
    assert tools.servers() == ["files", "web_2"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"mcpServers": {', "not valid JSON"),
        ('{"servers": {}}', 'no "mcpServers"'),
        ('{"mcpServers": []}', '"mcpServers" must be an object'),
        ('{"mcpServers": {"bad name": {"command": "x"}}}', "'bad name': a server name is"),
        ('{"mcpServers": {"a__b": {"command": "x"}}}', "'a__b': a server name is"),
        ('{"mcpServers": {"ab_": {"command": "x"}}}', "'ab_': a server name is"),
        ('{"mcpServers": {"empty": {"args": []}}}', "'empty' has neither"),
        ('{"mcpServers": {"twice": {"command": "x", "url": "http://h/mcp"}}}', "'twice' has both"),
        ('{"mcpServers": {"sse": {"type": "sse", "url": "http://h/sse"}}}', "'sse': type 'sse'"),
        ('{"mcpServers": {"mixed": {"type": "http", "command": "x"}}}', "'mixed' declares"),
        ('{"mcpServers": {"args": {"command": "x", "args": "-v"}}}', "'args' is invalid (args:"),
        ('{"mcpServers": {"ftp": {"url": "ftp://h/mcp"}}}', "'ftp' is invalid (url:"),
    ],
)
def test_config_errors_name_the_entry_and_the_fix(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(DownstreamConfigError) as caught:
        load_downstream_config(_write(tmp_path, text))
    message = str(caught.value)
    assert expected in message, message
    assert str(tmp_path / "mcp.json") in message


def test_config_error_for_an_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(DownstreamConfigError, match=r"cannot read .*missing\.json.*No such file"):
        load_downstream_config(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        parse_downstream_config("nope")


def test_bound_text_keeps_both_ends() -> None:
    text = "a" * 500 + "b" * 500
    cut = bound_text(text, 200)
    assert len(cut) <= 200
    assert cut.startswith("a" * 70) and cut.endswith("b" * 70)
    assert "omitted" in cut and bound_text("short", 200) == "short"


# --- listing -------------------------------------------------------------------------------


async def test_listing_maps_annotations_and_namespaces_names(tmp_path: Path, log: Path) -> None:
    starts = tmp_path / "starts"
    counted = StdioServerConfig(
        command="sh",
        args=[
            "-c",
            'echo start >> "$0" && exec "$1" -m tests.mcp_server.downstream_server --log "$2"',
            str(starts),
            sys.executable,
            str(log),
        ],
        env={"PYTHONPATH": str(ROOT)},
    )
    config = DownstreamConfig(mcpServers={"store": counted})
    async with _servers(config) as servers:
        tools = await servers.list_tools(["store"])
        by_name = {t.name: t for t in tools}
        assert [t.tool for t in tools] == sorted(t.tool for t in tools)
        assert set(by_name) >= {f"mcp__store__{n}" for n in ("get", "put", "drop", "crash")}
        assert (by_name["mcp__store__get"].read_only, by_name["mcp__store__get"].destructive) == (
            True,
            False,
        )
        put = by_name["mcp__store__put"]
        assert (put.read_only, put.destructive) == (False, False)
        drop = by_name["mcp__store__drop"]
        assert (drop.read_only, drop.destructive) == (False, True)
        assert "key" in json.dumps(put.input_schema)
        assert "may destroy data" in drop.spec().description
        assert await servers.list_tools(["store"]) == tools
        assert starts.read_text() == "start\n", "the listing is cached: one server start"


async def test_listing_an_unknown_or_broken_server_names_it(tmp_path: Path, log: Path) -> None:
    broken = StdioServerConfig(
        command=sys.executable,
        args=["-c", "import sys; sys.stderr.write('boom: no database'); sys.exit(2)"],
    )
    config = DownstreamConfig(mcpServers={"store": _stdio_entry(log), "broken": broken})
    async with _servers(config) as servers:
        with pytest.raises(ExternalServerError, match=r"'nope'.*configured: broken, store"):
            await servers.list_tools(["nope"])
        with pytest.raises(ExternalServerError, match=r"'broken'.*boom: no database"):
            await servers.list_tools(["broken"])
        missing = DownstreamConfig(mcpServers={"gone": StdioServerConfig(command="/nonexistent")})
        async with _servers(missing) as gone:
            with pytest.raises(
                ExternalServerError,
                match=r"'gone' could not list its tools: it could not be started: FileNotFound",
            ):
                await gone.list_tools(["gone"])


# --- calls ---------------------------------------------------------------------------------


async def test_call_round_trip_protocol_error_bounding_concurrency_and_resource(
    tmp_path: Path, config: DownstreamConfig, log: Path
) -> None:
    workspace = _workspace(tmp_path, "agent-1")
    async with _servers(config) as servers:
        session = servers.session("agent-1", str(workspace))
        put = await session.call_tool("store", "put", {"key": "k", "value": "v"})
        assert (put.content, put.is_error) == ("ok", False)
        got = await session.call_tool("store", "get", {"key": "k"})
        assert (got.content, got.is_error) == ("v", False)
        assert json.loads((workspace / "store.json").read_text()) == {"k": "v"}

        missing = await session.call_tool("store", "get", {"key": "absent"})
        assert missing.is_error and "absent" in missing.content
        unknown = await session.call_tool("store", "no_such_tool", {})
        assert unknown.is_error and "no_such_tool" in unknown.content
        invalid = await session.call_tool("store", "put", {"key": 1})
        assert invalid.is_error and "value" in invalid.content

        big = await session.call_tool("store", "big", {"n": 100_000})
        assert not big.is_error and len(big.content) <= 30_000
        full = ("0123456789" * 10_000)[:100_000]
        head, _, tail = big.content.partition("\n[...")
        assert full.startswith(head) and len(head) > 10_000
        assert full.endswith(tail.partition("...]\n")[2])
        assert "of 100000 characters omitted" in big.content

        async with anyio.create_task_group() as tg:  # two read-only calls on one connection
            for _ in range(2):
                tg.start_soon(session.call_tool, "store", "slow_get", {"key": "k", "ms": 300})
        first, second = sorted(
            (c for c in _calls(log) if c.tool == "slow_get"), key=lambda c: c.start
        )
        assert first.pid == second.pid and second.start < first.end, "they overlapped in time"

        resource = await session.read_resource("store", "store://all")
        assert json.loads(resource.content) == {"k": "v"} and not resource.is_error
        absent = await session.read_resource("store", "store://none")
        assert absent.is_error and "(-32602)" in absent.content  # a JSON-RPC error, not a crash
        assert "store://none" in absent.content
        with pytest.raises(ExternalServerError, match="configured: store"):
            await session.call_tool("other", "get", {})


async def test_a_server_starts_in_the_agents_workspace_only_when_configured_to(
    tmp_path: Path, log: Path
) -> None:
    """Without a `cwd` a stdio server starts where this server runs (an agent's files never
    choose what its launcher runs), and is told the agent's workspace; `"cwd": "{workspace}"`
    starts it there, as the user asked (the loader does not take it for a relative path)."""
    workspace = _workspace(tmp_path, "agent-1")
    path = _write(
        tmp_path,
        json.dumps(
            {
                "mcpServers": {
                    "told": _stdio_entry(log).model_dump(exclude={"cwd"}),
                    "inside": _stdio_entry(log).model_dump() | {"cwd": "{workspace}"},
                }
            }
        ),
    )
    config = load_downstream_config(path)
    inside = config.servers["inside"]
    assert isinstance(inside, StdioServerConfig) and inside.cwd == "{workspace}"
    async with _servers(config) as servers:
        session = servers.session("agent-1", str(workspace))
        await session.call_tool("told", "put", {"key": "k", "value": "v"})
        assert (await session.call_tool("inside", "get", {"key": "k"})).content == "v"
    told, started_inside = _calls(log)
    assert told.cwd == os.getcwd() != str(workspace)
    assert started_inside.cwd == str(workspace)
    assert json.loads((workspace / "store.json").read_text()) == {"k": "v"}


async def test_legacy_protocol_round_trip(tmp_path: Path, config: DownstreamConfig) -> None:
    workspace = _workspace(tmp_path, "agent-1")
    async with _servers(config, mode="legacy") as servers:
        session = servers.session("agent-1", str(workspace))
        await session.call_tool("store", "put", {"key": "k", "value": "old era"})
        assert (await session.call_tool("store", "get", {"key": "k"})).content == "old era"


# --- failures ------------------------------------------------------------------------------


async def test_crash_and_hang_back_off_reconnect_and_leave_other_agents_alone(
    tmp_path: Path, config: DownstreamConfig, log: Path
) -> None:
    async with _servers(config, call_timeout_s=0.5) as servers:
        one = servers.session("agent-1", str(_workspace(tmp_path, "agent-1")))
        two = servers.session("agent-2", str(_workspace(tmp_path, "agent-2")))
        async with anyio.create_task_group() as tg:
            tg.start_soon(one.call_tool, "store", "put", {"key": "who", "value": "one"})
            tg.start_soon(two.call_tool, "store", "put", {"key": "who", "value": "two"})
        assert (await one.call_tool("store", "get", {"key": "who"})).content == "one"
        pid_one = _calls(log)[-1].pid
        (pid_two,) = _pids(log) - {pid_one}  # each session runs its own server process

        with pytest.raises(ExternalServerError, match=r"'store' failed.*retried after 0\.1 s"):
            await one.call_tool("store", "crash", {})
        with pytest.raises(ExternalServerError, match=r"retry the call after 0\.\d+ s"):
            await one.call_tool("store", "get", {"key": "who"})
        assert (await two.call_tool("store", "get", {"key": "who"})).content == "two"
        assert _calls(log)[-1].pid == pid_two, "agent-2 kept its connection and process"

        with pytest.raises(ExternalServerError, match=r"no answer within 0\.5 s"):
            await two.call_tool("store", "slow_get", {"key": "who", "ms": 20_000})
        await anyio.sleep(0.15)  # agent-1's backoff is the subject
        again = await one.call_tool("store", "get", {"key": "who"})
        assert (again.content, again.is_error) == ("one", False)
        assert _calls(log)[-1].pid not in (pid_one, pid_two), "agent-1 reconnected"
        assert not _alive(pid_one)
    assert not any(_alive(c.pid) for c in _calls(log))


async def test_aclose_leaves_no_server_process(
    tmp_path: Path, config: DownstreamConfig, log: Path
) -> None:
    async with _servers(config) as servers:
        sessions = [
            servers.session(f"agent-{i}", str(_workspace(tmp_path, f"agent-{i}"))) for i in range(2)
        ]
        async with anyio.create_task_group() as tg:
            for session in sessions:
                tg.start_soon(session.call_tool, "store", "put", {"key": "k", "value": "v"})
        pids = _pids(log)
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        await sessions[0].aclose()
        assert [_alive(c.pid) for c in _calls(log)].count(True) == 1, "only its own server"
        with pytest.raises(ExternalServerError, match="'agent-0' is closed"):
            await sessions[0].call_tool("store", "get", {"key": "k"})
        await sessions[1].call_tool("store", "get", {"key": "k"})
    assert not any(_alive(p) for p in pids)


# --- HTTP ----------------------------------------------------------------------------------


@asynccontextmanager
async def _http_server(tmp_path: Path, log: Path) -> AsyncGenerator[str]:
    """The test server in this process on a bound loopback socket; yields its endpoint URL."""
    app = build_server(str(log), str(tmp_path)).streamable_http_app()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = int(sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        try:
            yield f"http://127.0.0.1:{port}/mcp"
        finally:
            server.should_exit = True


async def test_http_server_round_trip(tmp_path: Path, log: Path) -> None:
    with anyio.fail_after(WAIT_S):
        async with _http_server(tmp_path, log) as url:
            config = DownstreamConfig(mcpServers={"web": HttpServerConfig(url=url)})
            async with _servers(config) as servers:
                tools = await servers.list_tools(["web"])
                assert "mcp__web__put" in {t.name for t in tools}
                session = servers.session("agent-1")
                await session.call_tool("web", "put", {"key": "k", "value": "over http"})
                got = await session.call_tool("web", "get", {"key": "k"})
                assert (got.content, got.is_error) == ("over http", False)
                resource = await session.read_resource("web", "store://all")
                assert json.loads(resource.content) == {"k": "over http"}
