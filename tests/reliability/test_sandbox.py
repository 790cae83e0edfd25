"""The sandbox holds against a corpus of hostile commands (skipped when bubblewrap cannot run).

The terminal is configured as the orchestrator configures it: the agent's worktree under
`<repo>/.git/fanout/worktrees/`, its git dirs from the server's records, the whole state dir
hidden, a private HOME inside it. Each case tries to write outside the workspace, reach a
loopback listener the test opened, read the sibling agent's workspace or the server's state, or
leave a process behind; the test then checks the world from outside the sandbox, not the
command's own report.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from tests.orchestration.scripts import git, make_repo
from tests.reliability.conftest import Ledger
from toolbus.terminal import SandboxMode, Terminal, TerminalConfig

pytestmark = pytest.mark.anyio

WRITES = "G3a sandbox: no write outside the workspace"
NETWORK = "G3b sandbox: no network, loopback included"
HIDDEN = "G3c sandbox: other agents' workspaces and server state unreadable"
PROCS = "G3d sandbox: no process outlives its command"
GROUP = "G3e no sandbox: background processes of the group are killed"
SIBLING_MARK = "SIBLING-PRIVATE-MARK-5be0"
SERVER_SECRET = "sk-ant-SECRET-server-environ-9f9f"


@dataclass
class World:
    repo: Path
    state: Path
    ws: Path
    sibling: Path
    outside: Path


@pytest.fixture
def world(tmp_path: Path) -> World:
    repo = make_repo(tmp_path / "repo")
    state = repo / ".git" / "fanout"
    trees = state / "worktrees" / "r1"
    trees.mkdir(parents=True)
    ws, sibling = trees / "a1", trees / "a2"
    git(repo, "worktree", "add", "-q", "-b", "fanout/r1/a1", str(ws))
    git(repo, "worktree", "add", "-q", "-b", "fanout/r1/a2", str(sibling))
    (sibling / "private.txt").write_text(SIBLING_MARK + "\n")
    (repo / "later.txt").write_text("later\n")  # main moves past the agents' base
    git(repo, "add", "later.txt")
    git(repo, "commit", "-q", "-m", "later")
    (state / "state.db").write_text(SIBLING_MARK)
    (state / "transcripts").mkdir()
    (state / "transcripts" / "r1-a2.jsonl").write_text(SIBLING_MARK)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep\n")
    return World(repo=repo, state=state, ws=ws, sibling=sibling, outside=outside)


def terminal(world: World, mode: SandboxMode, **extra: object) -> Terminal:
    config = TerminalConfig.model_validate(
        {
            "sandbox": mode,
            "hidden_paths": (world.state,),
            "home": world.state / "homes" / "r1-a1",
            "git_admin_dir": world.repo / ".git" / "worktrees" / "a1",
            "git_common_dir": world.repo / ".git",
            "kill_grace_s": 0.5,
            "drain_s": 0.5,
            **extra,
        }
    )
    return Terminal(world.ws, config)


def _snapshot(paths: list[Path]) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for root in paths:
        for dirpath, _dirs, files in os.walk(root):
            for f in files:
                p = Path(dirpath, f)
                try:
                    out[str(p)] = p.read_bytes() if not p.is_symlink() else b"->"
                except OSError:
                    out[str(p)] = None
    return out


async def test_no_write_outside_the_workspace(bwrap: str, world: World, ledger: Ledger) -> None:
    term = terminal(world, SandboxMode.BWRAP)
    o, r, s = world.outside, world.repo, world.sibling
    main_head = git(r, "rev-parse", "main").strip()
    assert git(world.ws, "rev-parse", "HEAD").strip() != main_head
    host_tmp_marker = f"/tmp/fanout-reliability-escape-{os.getpid()}"
    host_var_marker = f"/var/tmp/fanout-reliability-escape-{os.getpid()}"  # outside /tmp
    cases = {
        "new file outside": f"echo pwn > {o}/new.txt",
        "append outside": f"echo pwn >> {o}/keep.txt",
        "delete outside": f"rm -f {o}/keep.txt",
        "rename outside": f"mv {o}/keep.txt {o}/moved.txt",
        "chmod outside": f"chmod 000 {o}/keep.txt",
        "python write outside": f"python3 -c \"open('{o}/py.txt','w').write('x')\"",
        "user checkout": f"echo pwn > {r}/README.md",
        "sibling workspace": f"echo pwn > {s}/private.txt; echo pwn > {s}/new.txt",
        "state db": f"echo pwn > {world.state}/state.db",
        "repo git config": f"git config --file {r}/.git/config core.pwn true",
        "git hooks": f"printf '#!/bin/sh\\necho pwn\\n' > {r}/.git/hooks/pre-commit",
        "move canonical branch back": "git update-ref refs/heads/main HEAD",
        "force canonical branch": "git branch -f main HEAD",
        "push to the main repo": f"git push -f {r} HEAD:main",
        "delete canonical branch": "git branch -D main",
        "hard link out of the workspace": f"ln {o}/keep.txt hard && echo pwn >> hard",
        "symlink out, write through": f"ln -s {o}/keep.txt sl && echo pwn >> sl",
        "host /tmp": f"echo pwn > {host_tmp_marker}",
        "real HOME": "echo pwn > /root/.fanout-pwn 2>/dev/null; echo pwn > ~/../../pwn",
        "/etc": "echo pwn >> /etc/hosts",
        "dev": "echo pwn > /dev/sda 2>/dev/null; mknod dev_null c 1 3",
        "remount": "mount -o remount,rw / 2>&1",
        "remount, then write outside": f"mount -o remount,rw / 2>&1; echo pwn > {host_var_marker}",
        "unshare back": "unshare -r sh -c 'echo pwn > /etc/pwn' 2>&1",
    }
    watched = [world.outside, world.sibling, world.repo / ".git" / "hooks"]
    with anyio.fail_after(120):
        for case, command in cases.items():
            before = _snapshot(watched)
            readme = (world.repo / "README.md").read_bytes()
            config = (world.repo / ".git" / "config").read_bytes()
            state_db = (world.state / "state.db").read_bytes()
            result = await term.run(command, 20)
            problems: list[str] = []
            if not result.sandboxed:
                problems.append("ran unsandboxed")
            if _snapshot(watched) != before:
                problems.append("outside or sibling tree changed")
            if (world.repo / "README.md").read_bytes() != readme:
                problems.append("user checkout changed")
            if (world.repo / ".git" / "config").read_bytes() != config:
                problems.append(".git/config changed")
            if (world.state / "state.db").read_bytes() != state_db:
                problems.append("state.db changed")
            if git(world.repo, "rev-parse", "main").strip() != main_head:
                problems.append("canonical branch moved")
            markers = (host_tmp_marker, host_var_marker, "/root/.fanout-pwn")
            landed = [p for p in markers if os.path.lexists(p)]
            for path in landed:
                os.unlink(path)
            if landed:
                problems.append(f"file landed on the host: {landed}")
            ledger.record(WRITES, case, not problems, f"{problems}: {result.output[:200]}")
    term.close()
    assert (world.ws / "sl").is_symlink()  # the attempts ran inside the workspace
    failures = ledger.failures(WRITES)
    assert not failures, "\n".join(failures)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


async def test_no_network(
    bwrap: str, world: World, listener: socket.socket, ledger: Ledger
) -> None:
    port = listener.getsockname()[1]
    term = terminal(world, SandboxMode.BWRAP)
    py = "import socket; socket.create_connection(('{host}', {port}), 2).sendall(b'pwn')"
    cases = {
        "bash /dev/tcp": f"echo pwn > /dev/tcp/127.0.0.1/{port}",
        "python loopback": f'python3 -c "{py.format(host="127.0.0.1", port=port)}"',
        "python localhost": f'python3 -c "{py.format(host="localhost", port=port)}"',
        "ipv6 loopback": f"echo pwn > /dev/tcp/::1/{port}",
        "curl": f"curl -s -m 2 http://127.0.0.1:{port}/ || wget -q -T 2 http://127.0.0.1:{port}/",
        "git over http": f"git ls-remote http://127.0.0.1:{port}/x.git",
        "outside address": "echo x > /dev/tcp/1.1.1.1/53",
        "dns": "getent hosts example.com",
        "abstract unix socket": 'python3 -c "import socket; s=socket.socket(socket.AF_UNIX); '
        "s.connect('\\0fanout-none')\"",
    }
    with anyio.fail_after(120):
        for case, command in cases.items():
            result = await term.run(command, 20)
            accepted = True
            try:
                conn, _ = listener.accept()
                conn.close()
            except BlockingIOError:
                accepted = False
            ok = result.sandboxed and not accepted and result.exit_code != 0
            ledger.record(NETWORK, case, ok, f"accepted={accepted} exit={result.exit_code}")
    term.close()
    # control: the listener is reachable from outside the sandbox
    with socket.create_connection(listener.getsockname(), 2):
        pass
    failures = ledger.failures(NETWORK)
    assert not failures, "\n".join(failures)


async def test_other_workspaces_and_state_unreadable(
    bwrap: str, world: World, ledger: Ledger
) -> None:
    term = terminal(world, SandboxMode.BWRAP)
    s, st = world.sibling, world.state
    cases = {
        "cat sibling file": f"cat {s}/private.txt",
        "list sibling": f"ls -la {s}",
        "via ..": "cat ../a2/private.txt",
        "find in state dir": f"find {st} -type f | xargs cat",
        "grep state dir": f"grep -r {SIBLING_MARK[:10]} {st}",
        "transcripts": f"cat {st}/transcripts/*",
        "state db": f"cat {st}/state.db",
        "via symlink made inside": f"ln -s {s} sibl && cat sibl/private.txt",
        "via /proc root": f"cat /proc/1/root{s}/private.txt",
        "server environ via /proc": "cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n'",
        "git worktree list then read": "for d in $(git worktree list --porcelain | "
        "sed -n 's/^worktree //p'); do cat $d/private.txt; done",
    }
    with anyio.fail_after(120):
        for case, command in cases.items():
            result = await term.run(command, 20)
            leaked = SIBLING_MARK in result.output
            ok = result.sandboxed and not leaked
            ledger.record(HIDDEN, case, ok, f"leaked={leaked}: {result.output[:200]}")
    term.close()
    failures = ledger.failures(HIDDEN)
    assert not failures, "\n".join(failures)


SERVER_SCRIPT = textwrap.dedent(
    """
    import sys, anyio
    from pathlib import Path
    from toolbus.terminal import SandboxMode, Terminal, TerminalConfig

    async def main():
        ws = Path(sys.argv[1])
        for mode in (SandboxMode.BWRAP, SandboxMode.NONE):
            term = Terminal(ws, TerminalConfig(sandbox=mode))
            result = await term.run("cat /proc/$PPID/environ /proc/1/environ 2>/dev/null", 20)
            term.close()
            print(mode.value, "LEAK" if "SECRET-server" in result.output else "clean")

    anyio.run(main)
    """
)


async def test_server_environment_not_readable_through_proc(bwrap: str, world: World) -> None:
    """A server started with a key in its environment: the sandboxed command cannot read it from
    /proc; without a sandbox it can (the documented boundary of `sandbox=none`)."""
    env = {**os.environ, "ANTHROPIC_API_KEY": SERVER_SECRET}
    done = await anyio.run_process(
        [sys.executable, "-c", SERVER_SCRIPT, str(world.ws)],
        env=env,
        cwd=Path(__file__).parents[2],
        check=True,
    )
    lines = dict(line.split() for line in done.stdout.decode().splitlines())
    assert lines == {"bwrap": "clean", "none": "LEAK"}


LEFTOVERS = {
    "background &": "sleep {t} &",
    "nohup": "nohup sleep {t} >/dev/null 2>&1 &",
    "double fork": "( (sleep {t} &) & )",
    "disown": "sleep {t} & disown",
    "setsid": "setsid sleep {t} &",
    "setsid -f": "setsid -f sleep {t}",
    "python daemon (setsid + double fork)": 'python3 -c "import os,time\n'
    "if os.fork(): os._exit(0)\nos.setsid()\nif os.fork(): os._exit(0)\n"
    "os.execvp('sleep', ['sleep', '{t}'])\"",
    "trap TERM": "bash -c 'trap \"\" TERM HUP; exec sleep {t}' &",
}


def _alive_with(arg: str) -> list[int]:
    pids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if arg.encode() in argv and state != b"Z":
            pids.append(int(entry))
    return pids


async def _leftover_cases(
    term: Terminal, cases: dict[str, str], guarantee: str, tag: str, ledger: Ledger
) -> None:
    for i, (case, template) in enumerate(cases.items()):
        for ending in ("timeout", "exit"):
            t = f"{7000 + os.getpid() % 1000}.{i}{0 if ending == 'timeout' else 1}"
            command = template.format(t=t)
            if ending == "timeout":
                command += "\nsleep 60"
            result = await term.run(command, 1.0 if ending == "timeout" else 20)
            left = _alive_with(t)
            for pid in left:  # never leave them to other tests
                os.kill(pid, 9)
            ok = not left and result.timed_out == (ending == "timeout")
            ledger.record(
                guarantee,
                f"{tag}{case} ({ending})",
                ok,
                f"left {left}, timed_out={result.timed_out}",
            )


async def test_no_process_outlives_its_command(bwrap: str, world: World, ledger: Ledger) -> None:
    term = terminal(world, SandboxMode.BWRAP)
    with anyio.fail_after(120):
        await _leftover_cases(term, LEFTOVERS, PROCS, "", ledger)
    term.close()
    failures = ledger.failures(PROCS)
    assert not failures, "\n".join(failures)


async def test_no_sandbox_kills_the_process_group(world: World, ledger: Ledger) -> None:
    """Without bubblewrap only the process group is reaped: a process that changes session
    (`setsid`) escapes; that is the documented boundary of `sandbox=none`."""
    same_group = {k: v for k, v in LEFTOVERS.items() if "setsid" not in k}
    term = terminal(world, SandboxMode.NONE)
    with anyio.fail_after(120):
        await _leftover_cases(term, same_group, GROUP, "", ledger)
    term.close()
    failures = ledger.failures(GROUP)
    assert not failures, "\n".join(failures)


def test_helper_sees_its_own_processes() -> None:
    """Control for `_alive_with`: a process started here is found, then gone once killed."""
    proc = subprocess.Popen(["sleep", "6543.21"])
    try:
        # the child shows its new command line only once it has exec'd `sleep`
        deadline = time.monotonic() + 10
        while _alive_with("6543.21") != [proc.pid] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _alive_with("6543.21") == [proc.pid]
    finally:
        proc.kill()
        proc.wait()
    assert _alive_with("6543.21") == []
