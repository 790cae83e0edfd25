"""Terminals without the sandbox: exit codes, capped output, timeouts that kill the group,
a scrubbed environment, the command policy, one command at a time."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from toolbus.errors import CommandDenied
from toolbus.terminal import (
    CommandPolicy,
    SandboxMode,
    Terminal,
    TerminalConfig,
    scrubbed_env,
)

pytestmark = pytest.mark.anyio


def terminal(ws: Path, **config: object) -> Terminal:
    return Terminal(ws, TerminalConfig.model_validate({"sandbox": SandboxMode.NONE, **config}))


def group_members(pgid: int) -> list[tuple[int, str]]:
    """(pid, state) of processes in the process group `pgid`."""
    found: list[tuple[int, str]] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if int(fields[2]) == pgid:
            found.append((int(entry), fields[0]))
    return found


async def test_exit_code_output_and_cwd(tmp_path: Path) -> None:
    term = terminal(tmp_path)
    result = await term.run("pwd; echo out; echo err >&2; exit 3")
    assert result.exit_code == 3
    assert result.output == f"{tmp_path}\nout\nerr\n"
    assert not result.timed_out and not result.truncated and not result.sandboxed
    term.close()


async def test_output_is_capped_head_and_tail(tmp_path: Path) -> None:
    term = terminal(tmp_path, max_output_bytes=1000)
    result = await term.run("echo START; head -c 200000 /dev/zero | tr '\\0' x; echo; echo END")
    assert result.truncated and result.output_bytes == 6 + 200000 + 1 + 4
    assert result.output.startswith("START\n") and result.output.endswith("END\n")
    assert "bytes of output omitted" in result.output
    assert len(result.output) < 1200


async def test_timeout_kills_the_whole_group(tmp_path: Path) -> None:
    term = terminal(tmp_path, kill_grace_s=0.5)
    with anyio.fail_after(20):
        result = await term.run(
            "sleep 1000 & echo $! > child.pid; echo $$ > shell.pid; echo started; sleep 1000",
            timeout_s=0.5,
        )
    assert result.timed_out and result.exit_code is not None and result.exit_code >= 128
    assert "started" in result.output
    pgid = int((tmp_path / "shell.pid").read_text())
    child = int((tmp_path / "child.pid").read_text())
    live = [(pid, state) for pid, state in group_members(pgid) if state != "Z"]
    assert live == [], f"processes of the command's group survived: {live}"
    assert child not in {pid for pid, state in group_members(pgid) if state != "Z"}


async def test_background_leftovers_of_a_finished_command_are_killed(tmp_path: Path) -> None:
    term = terminal(tmp_path, drain_s=0.2)
    with anyio.fail_after(20):
        result = await term.run("(sleep 1000 >/dev/null 2>&1 &) ; echo $$ > shell.pid; echo done")
    assert result.exit_code == 0 and result.output == "done\n"
    pgid = int((tmp_path / "shell.pid").read_text())
    assert [p for p in group_members(pgid) if p[1] != "Z"] == []


async def test_environment_is_scrubbed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-secret")
    monkeypatch.setenv("GITHUB_TOKEN", "ghp-secret")
    monkeypatch.setenv("DB_PASSWORD", "hunter2")
    monkeypatch.setenv("MY_SECRET_THING", "s")
    monkeypatch.setenv("RANDOM_SETTING", "r")
    monkeypatch.setenv("CI_FLAG", "1")
    monkeypatch.setenv("CI_DEPLOY_KEY", "k")
    term = terminal(tmp_path, env_passthrough=("CI_*",), env_set={"EXTRA": "yes"})
    result = await term.run("env")
    env = dict(line.split("=", 1) for line in result.output.splitlines() if "=" in line)
    for name in ("ANTHROPIC_API_KEY", "GITHUB_TOKEN", "DB_PASSWORD", "MY_SECRET_THING"):
        assert name not in env
    assert "RANDOM_SETTING" not in env
    assert "CI_DEPLOY_KEY" not in env  # a wildcard never passes a secret-looking name
    assert env["CI_FLAG"] == "1" and env["EXTRA"] == "yes"
    assert env["HOME"] == str(term.home) and env["HOME"] != os.environ.get("HOME")
    assert env["PATH"] == os.environ["PATH"]
    term.close()
    assert not term.home.exists()


def test_secret_passes_only_when_named_exactly() -> None:
    source = {"GITHUB_TOKEN": "t", "PATH": "/bin"}
    config = TerminalConfig(env_passthrough=("GITHUB_TOKEN",))
    assert scrubbed_env(config, Path("/h"), source)["GITHUB_TOKEN"] == "t"
    assert "GITHUB_TOKEN" not in scrubbed_env(TerminalConfig(), Path("/h"), source)


async def test_policy_deny_wins_and_allow_restricts(tmp_path: Path) -> None:
    policy = CommandPolicy(deny=(r"\brm\s+-rf\b",), allow=(r"^(rm|ls|echo)\b",))
    term = terminal(tmp_path, policy=policy)
    with pytest.raises(CommandDenied, match=r"deny pattern '\\\\brm"):
        await term.run("rm -rf /")
    with pytest.raises(CommandDenied, match="none of the allowed patterns"):
        await term.run("curl example.com")
    assert (await term.run("echo ok")).exit_code == 0


async def test_commands_are_serialized(tmp_path: Path) -> None:
    term = terminal(tmp_path)
    script = "echo start-{0} >> log; sleep 0.2; echo end-{0} >> log"
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(term.run, script.format(1))
            tg.start_soon(term.run, script.format(2))
    lines = (tmp_path / "log").read_text().split()
    assert lines in (
        ["start-1", "end-1", "start-2", "end-2"],
        ["start-2", "end-2", "start-1", "end-1"],
    )


async def test_cancellation_kills_the_command(tmp_path: Path) -> None:
    term = terminal(tmp_path)
    with anyio.move_on_after(0.5):
        await term.run("echo $$ > shell.pid; sleep 1000")
    pgid = int((tmp_path / "shell.pid").read_text())
    assert [p for p in group_members(pgid) if p[1] != "Z"] == []
