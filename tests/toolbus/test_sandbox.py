"""The bubblewrap sandbox: only the system, the workspace and its home; no network; git works
read-only from the server's records; a sized private /tmp; and the pieces it is built from."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from toolbus.errors import SandboxUnavailable
from toolbus.sandbox import (
    filter_config,
    filter_packed_refs,
    own_branch_ref,
    private_etc_entries,
    probe_bwrap,
)
from toolbus.terminal import CommandLimits, SandboxMode, Terminal, TerminalConfig

pytestmark = pytest.mark.anyio


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
    # the real interpreter, shown as an extra read-only path (it may live in a home directory)
    connect = f'{os.path.realpath(sys.executable)} -c "{code}"'
    python = (Path(sys.base_prefix),)
    with anyio.fail_after(30):
        denied = await sandboxed(tmp_path, extra_ro_paths=python).run(connect)
        allowed = await sandboxed(tmp_path, allow_network=True, extra_ro_paths=python).run(connect)
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
    (ws / "a.txt").write_text("changed\n")
    term = sandboxed(
        ws,
        hidden_paths=(state,),
        git_admin_dir=repo / ".git" / "worktrees" / "agent1",
        git_common_dir=repo / ".git",
    )
    with anyio.fail_after(30):
        log = await term.run("git log --oneline && git status --short && git diff && echo ok")
        peek = await term.run(f"cat {state}/leases.db")
        commit = await term.run("git commit -qam x")
    assert log.exit_code == 0, log.output
    assert "init" in log.output and log.output.endswith("ok\n")
    assert " M a.txt" in log.output and "+changed" in log.output
    assert peek.exit_code != 0
    assert commit.exit_code != 0 and "Read-only file system" in commit.output  # read-only git
    term.close()
    assert not term.view_dir.exists()


async def test_a_planted_gitfile_binds_nothing(bwrap: str, tmp_path: Path) -> None:
    """The workspace's `.git` names a directory elsewhere: the sandbox binds the git dirs from
    the server's records, so the named directory stays invisible."""
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key.txt").write_text("PLANTED-GITDIR-SECRET\n")
    secret.chmod(0o700)
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / ".git").write_text(f"gitdir: {secret}\n")  # planted before the first command
    term = sandboxed(ws)
    with anyio.fail_after(30):
        result = await term.run(f"cat {secret}/key.txt; ls -la {secret}; git log")
    assert result.sandboxed and "PLANTED-GITDIR-SECRET" not in result.output
    assert "No such file or directory" in result.output
    term.close()


async def test_tmp_and_shm_are_private_and_sized(bwrap: str, tmp_path: Path) -> None:
    term = sandboxed(tmp_path, limits=CommandLimits(tmp_mb=8))
    with anyio.fail_after(30):
        tmp = await term.run("head -c 20000000 /dev/zero > /tmp/big; ls -l /tmp/big")
        shm = await term.run("head -c 20000000 /dev/zero > /dev/shm/big")
        root = await term.run("echo x > /big; echo x > /dev/big")
    assert "No space left on device" in tmp.output and " 8388608 " in tmp.output
    assert "No space left on device" in shm.output
    assert root.output.count("Read-only file system") == 2
    term.close()


async def test_system_files_only_their_owner_reads_are_hidden(bwrap: str, tmp_path: Path) -> None:
    """The server may run as the owner of `/etc/shadow` or a host key: those stay unreadable."""
    private = [p for p, is_dir in private_etc_entries() if not is_dir and os.access(p, os.R_OK)]
    if not private:
        pytest.skip("no file under /etc that only its owner reads is readable by this user")
    term = sandboxed(tmp_path)
    with anyio.fail_after(30):
        result = await term.run(" ; ".join(f"cat {p} | wc -c" for p in private[:5]))
    sizes = [line for line in result.output.splitlines() if line.strip().isdigit()]
    assert sizes and all(int(size) == 0 for size in sizes), result.output
    term.close()


async def test_the_probe_tries_the_flags_commands_get(tmp_path: Path) -> None:
    """A bubblewrap stand-in records the probe's argv: the same narrow mounts as a command's."""
    record = tmp_path / "argv"
    fake = tmp_path / "bwrap"
    fake.write_text(
        f'#!/bin/sh\nif [ "$1" = --help ]; then echo "--size BYTES"; exit 0; fi\n'
        f'printf "%s\\n" "$@" > {record}\nexit 0\n'
    )
    fake.chmod(0o755)
    assert await probe_bwrap(str(fake)) is None
    argv = record.read_text().splitlines()
    pairs = list(itertools.pairwise(argv))
    assert ("--ro-bind", "/") not in pairs  # not the whole filesystem
    assert ("--cap-drop", "ALL") in pairs and ("--remount-ro", "/") in pairs
    assert "--size" in argv and ("--ro-bind", "/usr") in pairs
    assert "--unshare-net" in argv and argv[-2:] == ["--", "true"]


def test_packed_refs_keep_only_what_a_command_sees() -> None:
    oid = "1" * 40
    text = (
        "# pack-refs with: peeled fully-peeled sorted \n"
        f"{oid} refs/fanout/r1/base\n"
        f"{oid} refs/heads/fanout/r1/a1\n"
        f"{oid} refs/heads/fanout/r1/a2\n"
        f"{oid} refs/heads/main\n"
        f"{oid} refs/stash\n"
        f"{oid} refs/tags/v1\n"
        f"^{'2' * 40}\n"
        f"{oid} refs/tags/fanout-tag\n"
        f"{oid} refs/heads/fanout/r1/a2-tag-like\n"
        f"^{'3' * 40}\n"
    )
    kept = filter_packed_refs(text, "refs/heads/fanout/r1/a1").splitlines()
    assert kept == [
        "# pack-refs with: peeled fully-peeled sorted ",
        f"{oid} refs/heads/fanout/r1/a1",
        f"{oid} refs/heads/main",
        f"{oid} refs/tags/v1",
        f"^{'2' * 40}",
        f"{oid} refs/tags/fanout-tag",
    ]


def test_config_copy_drops_credentials_and_reads_back_the_same(tmp_path: Path) -> None:
    original = tmp_path / "config"
    original.write_text(
        "[core]\n\tbare = false\n\tflag\n"
        '[remote "origin"]\n\turl = https://user:TOKEN-1@example.invalid/r.git\n'
        '[http "https://example.invalid"]\n\textraHeader = Authorization: Bearer TOKEN-2\n'
        '[credential]\n\thelper = store\n[url "https://TOKEN-3@x/"]\n\tinsteadOf = y\n'
        '[include]\n\tpath = /elsewhere\n[includeIf "gitdir:/x/"]\n\tpath = /y\n'
        "[github]\n\ttoken = TOKEN-4\n[user]\n\tname = Test\n"
        '[branch "we\\"ird.na me"]\n\tmerge = "a;b # c\\n\\td\\\\"\n'
    )
    listed = subprocess.run(
        ["git", "config", "--file", str(original), "--list", "-z"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    entries: list[tuple[str, str | None]] = []
    for item in filter(None, listed.split("\0")):
        name, newline, value = item.partition("\n")
        entries.append((name, value if newline else None))
    copy = tmp_path / "copy"
    copy.write_text(filter_config(entries))
    text = copy.read_text()
    assert "TOKEN" not in text and "/elsewhere" not in text and "helper" not in text
    reread = subprocess.run(
        ["git", "config", "--file", str(copy), "--list", "-z"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\0")
    assert reread == [
        "core.bare\nfalse",
        "core.flag",
        "user.name\nTest",
        'branch.we"ird.na me.merge\na;b # c\n\td\\',
        "",
    ]


def test_own_branch_comes_from_the_admin_dir_and_stays_a_branch(tmp_path: Path) -> None:
    (tmp_path / "HEAD").write_text("ref: refs/heads/fanout/r1/a1\n")
    assert own_branch_ref(tmp_path) == "refs/heads/fanout/r1/a1"
    for head in ("ref: refs/heads/../../config\n", "ref: refs/fanout/x\n", "1" * 40 + "\n"):
        (tmp_path / "HEAD").write_text(head)
        assert own_branch_ref(tmp_path) is None


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
