"""Streamable HTTP: `fanout-mcp --http` as a subprocess on a free loopback port, a real MCP client
over HTTP in both protocol eras, the bearer token, and the DNS-rebinding (Host/Origin) checks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import AsyncGenerator, Generator
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from mcp_server.demo import make_sample_repo, structured, text_of
from tests.mcp_server.servers import spawn_demo_settled

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
TOKEN = "s3cret-token-for-tests"
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"},
    },
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def _free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _command(repo: Path, port: int, *extra: str, host: str = HOST) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mcp_server.cli",
        "--http",
        "--host",
        host,
        "--port",
        str(port),
        "--repo",
        str(repo),
        "--model-provider",
        "demo",
        *extra,
    ]


def _env() -> dict[str, str]:
    env = {**os.environ, "FANOUT_SANDBOX": "none", "PYTHONPATH": str(ROOT)}
    env.pop("FANOUT_HTTP_TOKEN", None)
    return env


@contextmanager
def _serving(
    repo: Path, *extra: str, env: dict[str, str] | None = None, host: str = HOST
) -> Generator[str]:
    """The server on a free loopback port, until the block ends; yields its MCP endpoint URL."""
    port = _free_port(host)
    # a wildcard bind answers on loopback too; tests only ever connect to loopback
    reach = HOST if host == "0.0.0.0" else host
    proc = subprocess.Popen(
        _command(repo, port, *extra, host=host),
        env={**_env(), **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_listening(proc, reach, port)
        yield f"http://{reach}:{port}/mcp"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def _wait_listening(proc: subprocess.Popen[str], host: str, port: int) -> None:
    """Until the port accepts connections (the server is up), or the server exits."""
    deadline = 60.0
    waited = 0.0
    while True:
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr is not None else ""
            raise AssertionError(f"the server exited with {proc.returncode}: {err}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if waited > deadline:
                raise AssertionError("the HTTP server did not start listening") from None
            # Readiness of another process: no event to wait on but its listening socket.
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.05)
            waited += 0.05


@asynccontextmanager
async def _client(url: str, mode: str, token: str | None = None) -> AsyncGenerator[Client]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=60) as http,
        Client(streamable_http_client(url, http_client=http), mode=mode) as client,
    ):
        yield client


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_sample_repo(tmp_path)


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_tools_over_http_in_both_eras(repo: Path, mode: str) -> None:
    with _serving(repo) as url:
        async with Client(url, mode=mode) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            assert {"spawn_subagents", "get_status", "merge_results", "ping"} <= names
            ping = structured(await client.call_tool("ping", {}))
            assert ping == {"ok": True, "server": "fanout", "version": "0.1.0"}
            run_id = str((await spawn_demo_settled(client, "mathx"))["run_id"])
            status = structured(await client.call_tool("get_status", {"run_id": run_id}))
            agent = status["runs"][0]["agents"][0]
            assert agent["status"] == "succeeded"
            assert agent["files"] == 1 and agent["added"] > 0
            merged = await client.call_tool("merge_results", {"run_id": run_id})
            assert structured(merged)["agents"][0]["outcome"] == "merged", text_of(merged)
    assert "def mul" in (repo / "src/mathx.py").read_text()


def test_refuses_a_non_loopback_address_without_a_token(repo: Path) -> None:
    # 192.0.2.1 (TEST-NET-1) is never bound: the server must refuse before it tries.
    command = _command(repo, 8765, host="192.0.2.1")
    proc = subprocess.run(
        command, env=_env(), capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 2
    assert "refusing to serve HTTP on 192.0.2.1 without a bearer token" in proc.stderr
    assert proc.stdout == ""


async def test_bearer_token_is_enforced_when_given(repo: Path) -> None:
    with _serving(repo, "--token", TOKEN) as url:
        async with httpx2.AsyncClient(timeout=30) as http:
            for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                answer = await http.post(url, json=INIT, headers={**MCP_HEADERS, **auth})
                assert answer.status_code == 401, (auth, answer.text)
                assert answer.headers["www-authenticate"] == "Bearer"
            right = {"Authorization": f"Bearer {TOKEN}"}
            answer = await http.post(url, json=INIT, headers={**MCP_HEADERS, **right})
            assert answer.status_code == 200, answer.text
        for mode in ("legacy", "auto"):
            async with _client(url, mode, TOKEN) as client:
                assert structured(await client.call_tool("ping", {}))["ok"] is True
                status = structured(await client.call_tool("get_status", {}))
                assert status["runs"] == []


async def test_other_address_with_a_token_is_served_and_guarded(repo: Path) -> None:
    # 127.0.0.2 is loopback to the kernel but not one of the CLI's loopback names: it takes the
    # path of any other address (token required, the address added to the allowed hosts).
    with _serving(repo, "--token", TOKEN, host="127.0.0.2") as url:
        assert url.startswith("http://127.0.0.2:")
        async with httpx2.AsyncClient(timeout=30) as http:
            answer = await http.post(url, json=INIT, headers=MCP_HEADERS)
            assert answer.status_code == 401
        async with _client(url, "auto", TOKEN) as client:
            assert structured(await client.call_tool("ping", {}))["ok"] is True


async def test_token_from_the_environment(repo: Path) -> None:
    with _serving(repo, env={"FANOUT_HTTP_TOKEN": TOKEN}) as url:
        async with httpx2.AsyncClient(timeout=30) as http:
            answer = await http.post(url, json=INIT, headers=MCP_HEADERS)
            assert answer.status_code == 401
        async with _client(url, "legacy", TOKEN) as client:
            assert structured(await client.call_tool("ping", {}))["ok"] is True


async def test_foreign_origin_or_host_is_refused(repo: Path) -> None:
    with _serving(repo, "--token", TOKEN) as url:
        here = url.split("/")[2]  # 127.0.0.1:<port>
        auth = {**MCP_HEADERS, "Authorization": f"Bearer {TOKEN}"}
        async with httpx2.AsyncClient(timeout=30) as http:
            for header, value, status in [
                ("Origin", "http://evil.example", 403),
                ("Origin", f"http://127.0.0.1.evil.example:{here.split(':')[1]}", 403),
                ("Host", "evil.example", 421),
                ("Host", f"evil.example:{here.split(':')[1]}", 421),
            ]:
                refused = await http.post(url, json=INIT, headers={**auth, header: value})
                assert refused.status_code == status, (header, value, refused.text)
            for header, value in [("Origin", f"http://{here}"), ("Host", here)]:
                accepted = await http.post(url, json=INIT, headers={**auth, header: value})
                assert accepted.status_code == 200, (header, value, accepted.text)


def test_a_wildcard_bind_needs_the_names_clients_use(repo: Path) -> None:
    command = _command(repo, 8765, "--token", TOKEN, host="0.0.0.0")
    proc = subprocess.run(
        command, env=_env(), capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 2
    assert "--allowed-host" in proc.stderr


async def test_a_wildcard_bind_admits_the_allowed_host_names(repo: Path) -> None:
    with _serving(repo, "--token", TOKEN, "--allowed-host", "fanout.test", host="0.0.0.0") as url:
        port = url.split(":")[2].split("/")[0]
        auth = {**MCP_HEADERS, "Authorization": f"Bearer {TOKEN}"}
        async with httpx2.AsyncClient(timeout=30) as http:
            named = await http.post(url, json=INIT, headers={**auth, "Host": f"fanout.test:{port}"})
            assert named.status_code == 200, named.text
            other = await http.post(url, json=INIT, headers={**auth, "Host": f"other.test:{port}"})
            assert other.status_code == 421
            origin = {**auth, "Origin": f"https://fanout.test:{port}"}
            assert (await http.post(url, json=INIT, headers=origin)).status_code == 200
