"""Test-wide fixtures: the anyio backend and the guard against reaching a real model API."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from orchestration.workspace.overlay import enter_private_mounts
from toolbus.sandbox import probe_bwrap

# As the server does first thing: a private mount namespace, so that agents' workspaces can be
# copy-on-write views (before any thread starts; without it they are git worktrees).
PRIVATE_MOUNTS = enter_private_mounts()

# Any client built without an explicit base URL points at a closed loopback port, and the key is a
# dummy: an accidental real call fails at once, in this process and in every subprocess.
GUARD_BASE_URL = "http://127.0.0.1:9"
os.environ["ANTHROPIC_BASE_URL"] = GUARD_BASE_URL
os.environ["ANTHROPIC_API_KEY"] = "sk-test-guard-not-a-real-key"
os.environ.pop("ANTHROPIC_AUTH_TOKEN", None)


class RealNetworkBlocked(RuntimeError):
    """Raised when a test tries to connect anywhere but loopback or a local socket."""


def _is_loopback(address: Any) -> bool:
    if isinstance(address, str | bytes):  # AF_UNIX path
        return True
    host = str(address[0]) if isinstance(address, tuple) else str(address)  # pyright: ignore[reportUnknownArgumentType]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _guarded_connect(self: socket.socket, address: Any) -> None:
    if not _is_loopback(address):
        raise RealNetworkBlocked(
            f"tests may not reach {address!r}: only loopback is allowed (the real model API is "
            "never called from tests; point the client at fakeapi instead)"
        )
    _real_connect(self, address)


def _guarded_connect_ex(self: socket.socket, address: Any) -> int:
    if not _is_loopback(address):
        raise RealNetworkBlocked(f"tests may not reach {address!r}: only loopback is allowed")
    return _real_connect_ex(self, address)


@pytest.fixture(autouse=True)
def _block_real_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:  # pyright: ignore[reportUnusedFunction]
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", _guarded_connect_ex)
    yield


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def bwrap() -> str:
    """The bubblewrap executable, once the probe finds it usable; skips the test otherwise."""
    exe = shutil.which("bwrap")
    if exe is None:
        pytest.skip("bubblewrap not installed: apt-get install -y bubblewrap")
    reason = await probe_bwrap(exe)
    if reason is not None:
        pytest.skip(f"bubblewrap cannot run here: {reason}")
    return exe


@pytest.fixture
def listener() -> Iterator[int]:
    """A TCP port on loopback that accepts connections (for network checks from sandboxes)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()
