"""Terminals without the sandbox: exit codes, capped output, timeouts that kill the group,
a scrubbed environment, the command policy, one command at a time, and the limits of a command
(processes, memory) with what it is told when it reaches one."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from toolbus.errors import CommandDenied
from toolbus.limits import CGROUP_PREFIX, LimitMechanism, LimitsProbe, probe_limits
from toolbus.terminal import (
    CommandLimits,
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


async def test_a_configured_home_is_made_by_the_first_command(tmp_path: Path) -> None:
    ws, home = tmp_path / "ws", tmp_path / "homes" / "a1"
    ws.mkdir()
    term = terminal(ws, home=home)
    assert not home.exists()  # an agent that runs no command costs no directory
    first = await term.run('touch "$HOME/mark" && rm -rf "$HOME"')
    assert first.exit_code == 0, first.output
    assert not home.exists()
    second = await term.run('touch "$HOME/again" && echo "$HOME"')
    assert second.exit_code == 0 and second.output == f"{home}\n", second.output
    assert (home / "again").is_file()
    term.close()
    assert home.is_dir()  # a configured home is its owner's to remove


def test_secret_passes_only_when_named_exactly() -> None:
    source = {"GITHUB_TOKEN": "t", "PATH": "/bin"}
    config = TerminalConfig(env_passthrough=("GITHUB_TOKEN",))
    assert scrubbed_env(config, Path("/h"), source)["GITHUB_TOKEN"] == "t"
    assert "GITHUB_TOKEN" not in scrubbed_env(TerminalConfig(), Path("/h"), source)


def test_a_wildcard_lets_no_secret_looking_name_or_value_through() -> None:
    secrets = {
        "SMTP_PASS": "p",
        "NPM_CONFIG__AUTH": "a",
        "BASIC_AUTH": "b",
        "SESSION_COOKIE": "c",
        "PGPASSFILE": "/f",
        "DATABASE_URL": "postgres://app:s3cret@db/app",
    }
    plain = {"GIT_AUTHOR_NAME": "A", "SITE_URL": "https://example.com/x", "MY_VAR": "v"}
    env = scrubbed_env(TerminalConfig(env_passthrough=("*",)), Path("/h"), {**secrets, **plain})
    assert not set(secrets) & set(env)
    assert {name: env[name] for name in plain} == plain
    # named whole, a name is the user's choice
    named = TerminalConfig(env_passthrough=("DATABASE_URL",))
    assert scrubbed_env(named, Path("/h"), secrets)["DATABASE_URL"] == secrets["DATABASE_URL"]


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


# --------------------------------------------------------------------------- limits

FORK_LOOP = (
    'python3 -c "import os, time\n'
    "n = 0\n"
    "try:\n"
    "    while n < 300:\n"
    "        if os.fork() == 0:\n"
    "            time.sleep(60)\n"
    "            os._exit(0)\n"
    "        n += 1\n"
    "except OSError as exc:\n"
    "    print('fork failed', exc.errno, 'after', n)\""
)


def cgroup_probe() -> LimitsProbe:
    probe = probe_limits()
    if probe.mechanism not in (LimitMechanism.CGROUP_V1, LimitMechanism.CGROUP_V2):
        pytest.skip(f"no writable cgroup here: {probe.note}")
    return probe


def command_cgroups(probe: LimitsProbe) -> list[str]:
    """The cgroups this process made for commands and has not removed."""
    mine = f"{CGROUP_PREFIX}{os.getpid()}-"
    return [e.name for parent in probe.parents for e in parent.iterdir() if e.name.startswith(mine)]


def test_the_probe_picks_a_mechanism_and_says_why() -> None:
    probe = probe_limits()
    assert probe.mechanism is not LimitMechanism.NONE and probe.note
    assert probe_limits() is probe  # once per process
    if probe.mechanism is LimitMechanism.CGROUP_V1:
        assert len(probe.parents) == 2 and all(p.is_dir() for p in probe.parents)


async def test_a_fork_loop_stops_at_the_process_limit_and_is_told(tmp_path: Path) -> None:
    probe = cgroup_probe()
    term = terminal(tmp_path, limits=CommandLimits(max_processes=40), drain_s=0.5)
    with anyio.fail_after(60):
        result = await term.run(FORK_LOOP)
    assert "fork failed 11" in result.output, result.output  # EAGAIN
    assert result.warning is not None and "limit of 40 processes" in result.warning
    assert command_cgroups(probe) == []


async def test_memory_over_the_limit_is_killed_and_told(tmp_path: Path) -> None:
    probe = cgroup_probe()
    term = terminal(tmp_path, limits=CommandLimits(max_memory_mb=64))
    with anyio.fail_after(60):
        python = await term.run("python3 -c 'x = bytearray(512 * 1024 * 1024); print(\"kept\")'")
        shell = await term.run("x=$(head -c 400000000 /dev/zero | tr '\\0' a); echo ${#x}")
        small = await term.run("python3 -c 'x = bytearray(16 * 1024 * 1024); print(\"kept\")'")
    for result in (python, shell):
        assert "kept" not in result.output and "400000000" not in result.output
        assert result.exit_code != 0
        assert result.warning is not None and "memory limit of 64 MiB" in result.warning
    assert small.exit_code == 0 and small.output == "kept\n" and small.warning is None
    assert command_cgroups(probe) == []


async def test_rlimits_bound_the_memory_of_each_process(tmp_path: Path) -> None:
    """The fallback where no cgroup is writable: the allocation fails inside the command."""
    limits = CommandLimits(max_memory_mb=64, mechanism=LimitMechanism.RLIMITS)
    term = terminal(tmp_path, limits=limits)
    with anyio.fail_after(60):
        result = await term.run("python3 -c 'x = bytearray(512 * 1024 * 1024); print(\"kept\")'")
        small = await term.run("python3 -c 'x = bytearray(16 * 1024 * 1024); print(\"kept\")'")
    assert "MemoryError" in result.output and "kept" not in result.output
    assert small.exit_code == 0 and small.output == "kept\n"


async def test_the_cgroup_catches_what_left_the_process_group(tmp_path: Path) -> None:
    """Without a sandbox, `setsid` takes a process out of the command's group; its cgroup still
    holds it, and it is killed when the command ends."""
    probe = cgroup_probe()
    marker = f"{5000 + os.getpid() % 1000}.{id(tmp_path) % 10_000}"
    term = terminal(tmp_path, drain_s=0.2)
    with anyio.fail_after(30):
        result = await term.run(f"setsid sleep {marker} > /dev/null 2>&1 < /dev/null & echo ok")
    assert result.exit_code == 0
    survivors = [
        entry for entry in os.listdir("/proc") if entry.isdigit() and _cmdline_has(entry, marker)
    ]
    for pid in survivors:  # never leave them to other tests
        os.kill(int(pid), 9)
    assert survivors == []
    assert command_cgroups(probe) == []


def _cmdline_has(pid: str, marker: str) -> bool:
    try:
        return marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
