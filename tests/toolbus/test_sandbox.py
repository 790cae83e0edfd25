"""The bubblewrap sandbox: read-only outside the workspace, no network, hidden state, git works."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from toolbus.errors import SandboxUnavailable
from toolbus.sandbox import probe_bwrap
from toolbus.terminal import SandboxMode, Terminal, TerminalConfig

pytestmark = pytest.mark.anyio


@pytest.fixture
async def bwrap() -> str:
    exe = shutil.which("bwrap")
    if exe is None:
        pytest.skip("bubblewrap not installed: apt-get install -y bubblewrap")
    reason = await probe_bwrap(exe)
    if reason is not None:
        pytest.skip(f"bubblewrap cannot run here: {reason}")
    return exe


@pytest.fixture
def listener() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def sandboxed(ws: Path, **config: object) -> Terminal:
    return Terminal(ws, TerminalConfig.model_validate({"sandbox": SandboxMode.BWRAP, **config}))


async def test_writes_inside_work_outside_do_not(bwrap: str, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    term = sandboxed(ws)
    with anyio.fail_after(30):
        inside = await term.run("echo hi > inside.txt && cat inside.txt")
        outside = await term.run(f"echo x > {tmp_path}/escaped.txt; echo x > /usr/escaped.txt")
    assert inside.sandboxed and inside.exit_code == 0 and (ws / "inside.txt").read_text() == "hi\n"
    assert outside.exit_code != 0 and "Read-only file system" in outside.output
    assert not (tmp_path / "escaped.txt").exists()  # /tmp is private inside the sandbox
    assert not Path("/usr/escaped.txt").exists()
    term.close()


async def test_network_is_unreachable_unless_allowed(
    bwrap: str, tmp_path: Path, listener: int
) -> None:
    code = (
        f"import socket; socket.create_connection(('127.0.0.1', {listener}), timeout=5); "
        "print('connected')"
    )
    # the real interpreter: a virtualenv under /tmp is hidden by the sandbox's private /tmp
    connect = f'{os.path.realpath(sys.executable)} -c "{code}"'
    with anyio.fail_after(30):
        denied = await sandboxed(tmp_path).run(connect)
        allowed = await sandboxed(tmp_path, allow_network=True).run(connect)
    assert denied.exit_code != 0 and "connected" not in denied.output
    assert allowed.exit_code == 0 and "connected" in allowed.output


async def test_hidden_paths_are_unreadable_but_own_workspace_is_rebound(
    bwrap: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    other = state / "worktrees" / "other"
    mine = state / "worktrees" / "mine"
    other.mkdir(parents=True)
    mine.mkdir(parents=True)
    (other / "secret.txt").write_text("other agent's work")
    (state / "leases.db").write_text("db")
    term = sandboxed(mine, hidden_paths=(state,))
    with anyio.fail_after(30):
        peek = await term.run(f"cat {other}/secret.txt; cat {state}/leases.db")
        own = await term.run("echo mine > file.txt && ls")
    assert peek.exit_code != 0 and "other agent's work" not in peek.output
    assert own.exit_code == 0 and (mine / "file.txt").read_text() == "mine\n"


async def test_git_works_in_a_worktree_under_the_hidden_state_dir(
    bwrap: str, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.txt").write_text("a\n")
    git(repo, "add", "a.txt")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    state = repo / ".git" / "fanout"
    ws = state / "worktrees" / "run1" / "agent1"
    git(repo, "worktree", "add", "-q", "-b", "fanout/run1/agent1", str(ws))
    (state / "leases.db").write_text("db")
    term = sandboxed(ws, hidden_paths=(state,))
    with anyio.fail_after(30):
        log = await term.run("git log --oneline && git status --short && echo ok")
        peek = await term.run(f"cat {state}/leases.db")
    assert log.exit_code == 0, log.output
    assert "init" in log.output and log.output.endswith("ok\n")
    assert peek.exit_code != 0


async def test_timeout_inside_the_sandbox_kills_everything(bwrap: str, tmp_path: Path) -> None:
    marker = f"1000.{os.getpid()}{id(tmp_path) % 10_000}"  # a sleep argument no one else uses
    term = sandboxed(tmp_path, kill_grace_s=0.5)
    with anyio.fail_after(30):
        result = await term.run(f"sleep {marker} & sleep {marker}", timeout_s=0.5)
    assert result.timed_out
    survivors: list[str] = []
    for entry in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            survivors.append(entry)
    assert survivors == []


async def test_auto_falls_back_with_a_warning(tmp_path: Path) -> None:
    config = TerminalConfig(sandbox=SandboxMode.AUTO, bwrap_path=str(tmp_path / "no-bwrap"))
    result = await Terminal(tmp_path, config).run("echo hi")
    assert result.exit_code == 0 and not result.sandboxed
    assert result.warning is not None and "WITHOUT a sandbox" in result.warning


async def test_required_sandbox_raises_when_unavailable(tmp_path: Path) -> None:
    config = TerminalConfig(sandbox=SandboxMode.BWRAP, bwrap_path=str(tmp_path / "no-bwrap"))
    with pytest.raises(SandboxUnavailable, match="FANOUT_SANDBOX=bwrap"):
        await Terminal(tmp_path, config).run("echo hi")
