"""A sandboxed command sees only what it needs, and runs under limits (skipped without bubblewrap).

The world is laid out as the server lays it out: the user's checkout with a git-ignored `.env`,
two agents' worktrees under `<repo>/.git/fanout/worktrees/`, the sibling's committed work on its
branch (packed and loose refs both), a snapshot ref, the user's stash, credentials in the git
config; beside the repository a mode-600 secret, a home directory with a client's config and a
listening unix socket. It is built once under the system's temporary directory and once outside
it (the sandbox's own `/tmp` must hide the same). Every case is a command of the agent; a leak is
a marker of the world in its output (or a connection the socket accepted).

Then the limits: a fork loop, a thread loop, memory in Python and in a shell variable, `/tmp`
and `/dev/shm` past their size; each stops, and the command is told which limit it reached.
Then one real orchestrated run: the settings reach the terminal (the extra read-only path, the
limits), spawn's answer says so, and a second run's agent cannot read the first one's branch.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from orchestration.config import Settings
from orchestration.contracts import SpawnRequest, TaskSpec
from orchestration.model import ModelRequest, ToolResultBlock
from orchestration.orchestrator import Orchestrator
from tests.orchestration.scripts import Step, by_task, git, make_repo
from tests.reliability.conftest import Ledger
from toolbus.limits import CGROUP_PREFIX, LimitMechanism, probe_limits
from toolbus.terminal import CommandLimits, SandboxMode, Terminal, TerminalConfig

pytestmark = pytest.mark.anyio

VIEW = "G3f sandbox: a command sees the system, its worktree and home, nothing else"
LIMITS = "G3g sandbox: processes, memory and /tmp are limited; the command is told"
SIBLING_MARK = "SIBLING-BRANCH-MARK-71c2"
SNAPSHOT_MARK = "SNAPSHOT-REF-MARK-09ad"
ENV_MARK = "USER-DOTENV-MARK-5e1f"
SECRET_MARK = "MODE600-SECRET-MARK-a4b7"
HOME_MARK = "CLIENT-CONFIG-KEY-MARK-33d0"
STASH_MARK = "USER-STASH-MARK-c81e"
TOKEN_MARK = "GIT-CONFIG-TOKEN-MARK-6b52"
EXTRA_MARK = "EXTRA-RO-PATH-MARK-d90c"


@dataclass
class World:
    base: Path
    repo: Path
    common: Path
    state: Path
    ws: Path
    secret: Path
    home: Path
    socket: Path


def _commit(cwd: Path, rel: str, text: str) -> None:
    (cwd / rel).write_text(text)
    git(cwd, "add", rel)
    git(cwd, "commit", "-q", "-m", f"add {rel}")


def build_world(base: Path) -> World:
    repo = make_repo(base / "repo")
    _commit(repo, ".gitignore", ".env\n")
    (repo / ".env").write_text(f"API_KEY={ENV_MARK}\n")
    common = repo / ".git"
    state = common / "fanout"
    trees = state / "worktrees" / "r1"
    trees.mkdir(parents=True)
    ws, sibling = trees / "a1", trees / "a2"
    git(repo, "worktree", "add", "-q", "-b", "fanout/r1/a1", str(ws))
    git(repo, "worktree", "add", "-q", "-b", "fanout/r1/a2", str(sibling))
    _commit(sibling, "private.txt", SIBLING_MARK + "\n")
    (sibling / "snapshot.txt").write_text(SNAPSHOT_MARK)  # reachable from the snapshot ref only
    git(sibling, "add", "snapshot.txt")
    tree = git(sibling, "write-tree").strip()
    snapshot = git(sibling, "commit-tree", "-m", "snapshot", "-p", "HEAD", tree).strip()
    git(sibling, "rm", "-q", "--cached", "snapshot.txt")
    (sibling / "snapshot.txt").unlink()
    git(repo, "update-ref", "refs/fanout/r1/base", snapshot)
    git(repo, "pack-refs", "--all")  # the agents' branches and the snapshot ref now packed
    _commit(sibling, "private2.txt", SIBLING_MARK + "\n")  # and a newer loose ref of a2
    (repo / "README.md").write_text(f"{STASH_MARK}\n")
    git(repo, "stash", "-q")
    git(repo, "config", "remote.origin.url", f"https://user:{TOKEN_MARK}@example.invalid/r.git")
    git(repo, "config", "http.extraHeader", f"Authorization: Bearer {TOKEN_MARK}")
    git(repo, "config", "github.token", TOKEN_MARK)
    secret = base / "secret"
    secret.mkdir(mode=0o700)
    (secret / "key.txt").write_text(SECRET_MARK)
    (secret / "key.txt").chmod(0o600)
    home = base / "home"
    (home / ".config" / "client").mkdir(parents=True)
    (home / ".client.json").write_text(f'{{"apiKey": "{HOME_MARK}"}}')
    (home / ".config" / "client" / "mcp.json").write_text(HOME_MARK)
    (base / "run").mkdir()
    return World(base, repo, common, state, ws, secret, home, base / "run" / "agent.sock")


@pytest.fixture(params=["system-tmp", "outside-tmp"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    if request.param == "system-tmp":
        yield build_world(tmp_path)
        return
    if not os.access("/var/tmp", os.W_OK):
        pytest.skip("/var/tmp is not writable here")
    base = Path(tempfile.mkdtemp(prefix="fanout-view-", dir="/var/tmp"))
    try:
        yield build_world(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def terminal(world: World, **extra: object) -> Terminal:
    """Configured as the orchestrator configures an agent's terminal."""
    config = TerminalConfig.model_validate(
        {
            "sandbox": SandboxMode.BWRAP,
            "hidden_paths": (world.state,),
            "home": world.state / "homes" / "r1-a1",
            "git_admin_dir": world.common / "worktrees" / "a1",
            "git_common_dir": world.common,
            "kill_grace_s": 0.5,
            "drain_s": 0.5,
            **extra,
        }
    )
    return Terminal(world.ws, config)


def _marks(*marks: str) -> Callable[[str], list[str]]:
    return lambda output: [m for m in marks if m in output]


@dataclass
class Case:
    command: str
    leaks: Callable[[str], list[str]]


def view_cases(w: World) -> dict[str, Case]:
    dotenv = os.path.relpath(w.repo / ".env", w.ws)
    server_home = os.path.realpath(os.path.expanduser("~"))
    sibling_names = _marks("fanout/r1/a2", SIBLING_MARK, SNAPSHOT_MARK, "refs/fanout")
    unix = (
        'python3 -c "import socket, sys; s = socket.socket(socket.AF_UNIX); '
        "s.connect(sys.argv[1]); s.sendall(b'pwn'); print('CONNECTED')\" "
    )
    cases = {
        "mode-600 file outside the repository": Case(
            f"cat {w.secret}/key.txt; ls {w.secret}",
            lambda out: (
                [m for m in (SECRET_MARK,) if m in out] + [t for t in out.split() if t == "key.txt"]
            ),
        ),
        "the user's ignored .env, absolute": Case(f"cat {w.repo}/.env", _marks(ENV_MARK)),
        "the user's ignored .env, via ..": Case(f"cat {dotenv}", _marks(ENV_MARK)),
        "grep the user's checkout": Case(f"grep -rs API_KEY {w.repo} {w.base}", _marks(ENV_MARK)),
        "dot-files of a home directory": Case(
            f"cat {w.home}/.client.json {w.home}/.config/client/mcp.json", _marks(HOME_MARK)
        ),
        "the server's HOME": Case(
            f"test -e {server_home} && echo SERVER-HOME-VISIBLE", _marks("SERVER-HOME-VISIBLE")
        ),
        "another agent's branch by name": Case(
            "git show fanout/r1/a2:private.txt; git show fanout/r1/a2:private2.txt; "
            "git show refs/heads/fanout/r1/a2:private.txt",
            _marks(SIBLING_MARK),
        ),
        "all branches": Case(
            "git branch -a; git for-each-ref; git log --all --oneline; git show-ref",
            sibling_names,
        ),
        "all history": Case("git log --all -p", _marks(SIBLING_MARK, SNAPSHOT_MARK)),
        "the snapshot ref": Case(
            "git show refs/fanout/r1/base:snapshot.txt", _marks(SNAPSHOT_MARK, SIBLING_MARK)
        ),
        "refs read as files": Case(
            f"cat {w.common}/packed-refs; find {w.common}/refs {w.common}/logs -type f",
            sibling_names,
        ),
        "another agent's reflog": Case(
            f"cat {w.common}/logs/refs/heads/fanout/r1/a2; git reflog show fanout/r1/a2",
            _marks("add private2.txt"),
        ),
        "other worktrees' admin dirs": Case(
            f"ls {w.common}/worktrees; git worktree list",
            lambda out: [t for t in out.split() if t == "a2" or t.endswith("/a2")],
        ),
        "the user's stash": Case(
            "git stash list; git show refs/stash; git stash show -p", _marks(STASH_MARK)
        ),
        "credentials in the git config": Case(
            f"git config -l; git remote -v; cat {w.common}/config", _marks(TOKEN_MARK)
        ),
        "a host unix socket": Case(unix + str(w.socket), _marks("CONNECTED")),
        "the host's /run": Case(
            "ls /run /var/run; test -S /run/dbus/system_bus_socket && echo DBUS-VISIBLE",
            _marks("DBUS-VISIBLE", "systemd", "dbus"),
        ),
    }
    home = Path(server_home)
    if home == Path("/") or any(_inside(home, Path(p)) for p in ("/usr", "/etc", "/tmp")):
        del cases["the server's HOME"]  # a HOME the sandbox shows anyway says nothing
    elif _inside(w.ws, home):
        del cases["the server's HOME"]
    return cases


def _inside(path: Path, parent: Path) -> bool:
    real = Path(os.path.realpath(path))
    return real == parent or parent in real.parents


@pytest.fixture
def unix_listener(world: World) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(world.socket))
    sock.listen(8)
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


async def test_a_command_sees_only_what_it_needs(
    bwrap: str, world: World, unix_listener: socket.socket, ledger: Ledger
) -> None:
    term = terminal(world)
    tag = "tmp" if str(world.base).startswith(tempfile.gettempdir()) else "elsewhere"
    with anyio.fail_after(120):
        # the test is not vacuous: git works and shows the agent's own branch
        own = await term.run("git log -1 --format=%s && git status --short && git diff HEAD")
        assert own.exit_code == 0 and own.output.startswith("add .gitignore\n"), own.output
        branch = await term.run("git branch --show-current")
        assert branch.output == "fanout/r1/a1\n", branch.output
        for case, spec in view_cases(world).items():
            result = await term.run(spec.command, 20)
            accepted = True
            try:
                unix_listener.accept()[0].close()
            except BlockingIOError:
                accepted = False
            leaked = spec.leaks(result.output)
            ok = result.sandboxed and not leaked and not accepted
            ledger.record(VIEW, f"[{tag}] {case}", ok, f"leaked {leaked}: {result.output[:200]}")
    term.close()
    assert not term.view_dir.exists()
    failures = [f for f in ledger.failures(VIEW) if f.startswith(f"[{tag}]")]
    assert not failures, "\n".join(failures)


async def test_a_planted_gitfile_does_not_choose_what_is_bound(
    bwrap: str, world: World, ledger: Ledger
) -> None:
    """The agent pointed its `.git` at a directory elsewhere before the terminal's first
    command (an earlier server, say): git dirs come from the records, so nothing else shows."""
    real = (world.ws / ".git").read_text()
    (world.ws / ".git").write_text(f"gitdir: {world.secret}\n")
    term = terminal(world)
    with anyio.fail_after(60):
        result = await term.run(f"cat {world.secret}/key.txt; ls {world.secret}; git log")
    term.close()
    (world.ws / ".git").write_text(real)
    leaked = [m for m in (SECRET_MARK,) if m in result.output]
    leaked += [t for t in result.output.split() if t == "key.txt"]
    ledger.record(VIEW, "planted gitdir: redirect", not leaked, result.output[:200])
    assert not leaked, result.output


def _cgroups_left() -> list[str]:
    probe = probe_limits()
    mine = f"{CGROUP_PREFIX}{os.getpid()}-"
    return [e.name for p in probe.parents for e in p.iterdir() if e.name.startswith(mine)]


LOOP = (
    'python3 -c "import {module}\nn = 0\ntry:\n{body}'
    "except {error} as exc:\n    print('{label}', n)\""
)


async def test_limits_stop_a_command_and_it_is_told(
    bwrap: str, tmp_path: Path, ledger: Ledger
) -> None:
    probe = probe_limits()
    if probe.mechanism not in (LimitMechanism.CGROUP_V1, LimitMechanism.CGROUP_V2):
        pytest.skip(f"no writable cgroup here, limits are per process only: {probe.note}")
    limits = CommandLimits(max_processes=48, max_memory_mb=96, tmp_mb=16)
    term = Terminal(tmp_path, TerminalConfig(sandbox=SandboxMode.BWRAP, limits=limits, drain_s=0.5))
    fork = LOOP.format(
        module="os, time",
        body="    while n < 400:\n        if os.fork() == 0:\n            time.sleep(60)\n"
        "            os._exit(0)\n        n += 1\n",
        error="OSError",
        label="FORK-STOPPED",
    )
    threads = LOOP.format(
        module="threading, time",
        body="    while n < 400:\n        threading.Thread(target=time.sleep, args=(60,), "
        "daemon=True).start()\n        n += 1\n",
        error="RuntimeError",
        label="THREADS-STOPPED",
    )
    cases: dict[str, tuple[str, str, str]] = {
        # case: command, what its output shows, what the warning names
        "fork loop": (fork, "FORK-STOPPED", "limit of 48 processes"),
        "thread loop": (threads, "THREADS-STOPPED", "limit of 48 processes"),
        "python allocation": (
            "python3 -c 'x = bytearray(1024 ** 3); print(\"ALLOCATED\")'",
            "",
            "memory limit of 96 MiB",
        ),
        "shell variable": (
            "x=$(head -c 500000000 /dev/zero | tr '\\0' a); echo ALLOCATED ${#x}",
            "",
            "memory limit of 96 MiB",
        ),
        "/tmp past its size": (
            "head -c 64000000 /dev/zero > /tmp/big",
            "No space left on device",
            "",
        ),
        "/dev/shm past its size": (
            "head -c 64000000 /dev/zero > /dev/shm/big",
            "No space left on device",
            "",
        ),
    }
    with anyio.fail_after(180):
        for case, (command, shown, warned) in cases.items():
            result = await term.run(command, 60)
            problems: list[str] = []
            if shown and shown not in result.output:
                problems.append(f"output lacks {shown!r}")
            if "ALLOCATED" in result.output:
                problems.append("the allocation succeeded")
            if warned and warned not in (result.warning or ""):
                problems.append(f"warning {result.warning!r} lacks {warned!r}")
            if _cgroups_left():
                problems.append(f"cgroups left: {_cgroups_left()}")
            ledger.record(LIMITS, case, not problems, f"{problems}: {result.output[:200]}")
        fine = await term.run("python3 -c 'x = bytearray(32 * 1024 ** 2); print(\"OK\")'")
    term.close()
    assert fine.output == "OK\n" and fine.warning is None, (fine.output, fine.warning)
    failures = ledger.failures(LIMITS)
    assert not failures, "\n".join(failures)


async def test_an_orchestrated_agent_sees_its_settings_and_not_another_run(
    bwrap: str, tmp_path: Path, ledger: Ledger
) -> None:
    repo = make_repo(tmp_path / "repo")
    _commit(repo, ".gitignore", ".env\n")
    (repo / ".env").write_text(f"API_KEY={ENV_MARK}\n")
    extra = tmp_path / "toolchain"
    extra.mkdir()
    (extra / "tool.txt").write_text(EXTRA_MARK)
    settings = Settings.from_env(
        {
            "FANOUT_SANDBOX": "bwrap",
            "FANOUT_SANDBOX_RO_PATHS": f"{extra}, {sys.base_prefix}",
            "FANOUT_COMMAND_MAX_PROCESSES": "300",
            "FANOUT_COMMAND_MAX_MEMORY_MB": "512",
            "FANOUT_COMMAND_TMP_MB": "16",
            "FANOUT_LEASE_TTL_S": "30",
        },
        repo=repo,
    )
    assert settings.sandbox_ro_paths == (extra, Path(sys.base_prefix))
    scripts: dict[str, list[Step]] = {
        "WRITER": [("write_file", {"path": "src/app/private.txt", "content": SIBLING_MARK})],
    }
    seen: list[ModelRequest] = []
    model = by_task(scripts, seen=seen)
    async with Orchestrator(settings, lambda _name: model) as orch:
        first = await orch.spawn(
            SpawnRequest(tasks=[TaskSpec(prompt="WRITER", name="w", write_scope=["src/app"])])
        )
        await _settle(orch, first.run_id)
        writer = first.agents[0].agent_id
        branch = f"fanout/{first.run_id}/{writer}"
        assert SIBLING_MARK in git(repo, "show", f"{branch}:src/app/private.txt")
        commands = {
            "another run's branch": f"git show {branch}:src/app/private.txt",
            "all branches": "git branch -a; git log --all --oneline -p",
            "the user's .env": f"cat {repo}/.env ../../../../../.env",
            "the extra path": f"cat {extra}/tool.txt",
            "the limits": "cat /proc/self/cgroup; df -m /tmp | tail -1",
            "git inside": "git log -1 --format=%s && git branch --show-current",
        }
        scripts["READER"] = [("run_command", {"command": c}) for c in commands.values()]
        second = await orch.spawn(
            SpawnRequest(tasks=[TaskSpec(prompt="READER", name="r", write_scope=["docs"])])
        )
        await _settle(orch, second.run_id)
    line = next(w for w in second.warnings if "limits:" in w)
    assert f"extra read-only paths (FANOUT_SANDBOX_RO_PATHS): {extra}" in line, line
    assert "300 processes, 512 MiB memory, 16 MiB /tmp" in line, line
    last = max((r for r in seen if "READER" in r.system_task), key=lambda r: len(r.messages))
    results = [
        block.content
        for message in last.messages
        for block in message.content
        if isinstance(block, ToolResultBlock)
    ]
    outputs = dict(zip(commands, results, strict=True))
    seen_by_reader = "\n".join(results)
    leaked = [m for m in (SIBLING_MARK, ENV_MARK) if m in seen_by_reader]
    if writer in outputs["all branches"]:
        leaked.append(f"the writer's branch {branch}")
    ledger.record(VIEW, "orchestrated: another run's branch, .env", not leaked, str(leaked))
    assert not leaked
    assert EXTRA_MARK in outputs["the extra path"]  # the configured path is visible
    git_inside = outputs["git inside"]
    assert "add .gitignore" in git_inside and second.agents[0].agent_id in git_inside
    if probe_limits().mechanism is not LimitMechanism.RLIMITS:
        # the command ran in a cgroup of its own
        assert f"{CGROUP_PREFIX}{os.getpid()}-" in outputs["the limits"]
    assert " 16 " in outputs["the limits"]  # df: the 16 MiB /tmp


async def _settle(orch: Orchestrator, run_id: str) -> None:
    cursor: int | None = None
    with anyio.fail_after(90):
        while True:
            status = await orch.status(run_id=run_id, since=cursor, wait_s=5)
            cursor = status.cursor
            if not any(a.status.active for a in status.runs[0].agents):
                return
