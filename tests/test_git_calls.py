"""Every git the server runs goes through the pinned path (`toolbus.gitcmd`).

An agent can plant a `.git` in its workspace; git or libgit2 discovering it would run what its
config names, outside the sandbox. So no product module starts a git process itself, and every
libgit2 repository is opened either at the user's repository root or at a recorded git dir with
discovery off (`NO_SEARCH`). A new call that does neither fails here.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
from pathlib import Path

import pygit2
import pytest

from tests.orchestration.scripts import include_behind_hasconfig
from toolbus import gitcmd

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("toolbus", "orchestration", "mcp_server", "fakeapi")
GIT_HOME = "toolbus/gitcmd.py"
PROCESS_CALLS = {
    "run",
    "Popen",
    "call",
    "check_call",
    "check_output",
    "run_process",
    "open_process",
    "create_subprocess_exec",
    "create_subprocess_shell",
    "system",
    "popen",
    "execv",
    "execvp",
    "spawnv",
}


def _mentions_git(node: ast.AST) -> bool:
    """Whether an argv expression starts with, or a command string begins with, `git`."""
    if isinstance(node, ast.List | ast.Tuple) and node.elts:
        first = node.elts[0]
        return isinstance(first, ast.Constant) and first.value == "git"
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value == "git" or node.value.startswith("git ")
    return False


def _violations(source: str, rel: str) -> list[str]:
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.List | ast.Tuple) and rel != GIT_HOME and _mentions_git(node):
            found.append(f"{rel}:{node.lineno} builds a git command line: use toolbus.gitcmd")
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in PROCESS_CALLS and rel != GIT_HOME and node.args and _mentions_git(node.args[0]):
            found.append(f"{rel}:{node.lineno} starts git itself: use toolbus.gitcmd")
        if name == "Repository" and isinstance(func, ast.Attribute):
            text = ast.unparse(node)
            if "NO_SEARCH" not in text and "root" not in text:
                found.append(
                    f"{rel}:{node.lineno} opens a libgit2 repository by discovery: open the "
                    "user's repository root, or a recorded git dir with NO_SEARCH"
                )
    return found


def test_no_git_call_outside_the_pinned_path() -> None:
    found: list[str] = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            found += _violations(path.read_text(encoding="utf-8"), rel)
    assert found == []


@pytest.mark.parametrize(
    "source",
    [
        'import subprocess\nsubprocess.run(["git", "status"], cwd=ws)\n',
        'import anyio\nawait anyio.run_process(("git", "ls-files"))\n',
        'import os\nos.system("git add -A")\n',
        "import pygit2\npygit2.Repository(str(ws.path))\n",
        'import subprocess\ncommand = ["git", "ls-files"]\nsubprocess.run(command, cwd=ws)\n',
    ],
)
def test_the_check_catches_a_direct_call(source: str) -> None:
    assert _violations(source, "orchestration/new.py") != []


def test_git_refuses_an_unpinned_command_in_a_workspace(tmp_path: Path) -> None:
    ws = tmp_path / "repo" / ".git" / "fanout" / "worktrees" / "r1" / "a1"
    ws.mkdir(parents=True)
    with pytest.raises(gitcmd.UnpinnedWorkspaceGit):
        gitcmd.run(ws, ["status"])
    with pytest.raises(ValueError, match="GIT_DIR"):
        gitcmd.git_env({"GIT_DIR": "/elsewhere"}, pinned=True)


def test_pinned_git_waiting_on_a_named_pipe_is_stopped(tmp_path: Path) -> None:
    """A pipe where git reads rules holds git in `open` until a writer comes; a pinned git
    (on an agent's files) is stopped there instead of waiting out its timeout."""
    ws = tmp_path / "ws"
    ws.mkdir()
    gitcmd.run(ws, ["init", "-q"])
    os.mkfifo(ws / ".gitignore")
    pinned = gitcmd.Pinned(ws / ".git", ws)
    listing = ["ls-files", "--others", "--exclude-standard"]
    with pytest.raises(gitcmd.GitStalled, match="named pipe"):
        gitcmd.run_bytes(ws, listing, pinned=pinned, timeout=120)
    with pytest.raises(gitcmd.GitStalled):
        gitcmd.run(ws, listing, pinned=pinned)  # without a timeout it would wait for ever
    os.unlink(ws / ".gitignore")
    (ws / "a\r\nb.txt").write_text("")
    done = gitcmd.run(ws, [*listing, "-z"], pinned=pinned, input="unused\n")
    assert (done.returncode, done.stdout) == (0, "a\nb.txt\0")  # as `text=True` reads it


def test_pinned_argv_turns_off_command_running_configuration(tmp_path: Path) -> None:
    argv = gitcmd.git_argv(["add", "-A"], gitcmd.Pinned(tmp_path / "admin", tmp_path / "ws"))
    assert argv[:3] == ["git", f"--git-dir={tmp_path / 'admin'}", f"--work-tree={tmp_path / 'ws'}"]
    pairs = {argv[i + 1] for i, a in enumerate(argv) if a == "-c"}
    for key in ("core.fsmonitor=false", "core.hooksPath=/dev/null", "diff.external="):
        assert key in pairs
    assert gitcmd.filter_overrides(["filter.lfs.clean", "filter.lfs.smudge", "core.bare"]) == (
        ("filter.lfs.clean", ""),
        ("filter.lfs.smudge", ""),
        ("filter.lfs.process", ""),
        ("filter.lfs.required", "false"),
    )


def _libgit2_keys(git_dir: Path) -> list[str]:
    """The repository's configuration keys as libgit2 lists them (what the server pins from)."""
    repo = pygit2.Repository(str(git_dir))
    try:
        return [entry.name for entry in repo.config]
    finally:
        repo.free()


def test_a_driver_named_with_an_equals_sign_stays_off(tmp_path: Path) -> None:
    """A filter driver's name is the user's to choose and may hold `=`; the agent's attributes
    can select it (`filter=a=b`). Given as `-c filter.a=b.clean=`, git splits the override at
    its first `=` into another key, and the driver runs on the agent's file."""
    ws = tmp_path / "ws"
    ws.mkdir()
    gitcmd.run(ws, ["init", "-q"])
    marker = tmp_path / "filter-ran"
    gitcmd.run(ws, ["config", "filter.a=b.clean", f"touch {marker}; cat"])
    gitcmd.run(ws, ["config", "filter.a=b.required", "true"])
    (ws / ".gitattributes").write_text("* filter=a=b\n")
    (ws / "work.txt").write_text("agent data\n")
    names = _libgit2_keys(ws / ".git")
    assert "filter.a=b.clean" in names
    pinned = gitcmd.pin_named(ws / ".git", ws, names)
    assert gitcmd.config_env(pinned)["GIT_CONFIG_KEY_0"] == "filter.a=b.clean"
    hashing = ["hash-object", "-w", "--stdin-paths"]
    done = gitcmd.run(ws, hashing, pinned=pinned, input="work.txt\n")
    assert done.returncode == 0, done.stderr
    assert not marker.exists()
    stored = gitcmd.run(ws, ["cat-file", "-p", done.stdout.strip()], pinned=pinned).stdout
    assert stored == "agent data\n"

    # the same overrides as `-c` pairs (what the server gave git before) let the driver run
    argv = gitcmd.git_argv(hashing, pinned)
    assert not any("a=b" in a for a in argv)
    split = [a for key, value in pinned.config for a in ("-c", f"{key}={value}")]
    env = gitcmd.git_env(pinned=True)
    subprocess.run([*argv[:3], *split, *argv[3:]], cwd=ws, env=env, input=b"work.txt\n", check=True)
    assert marker.exists()


def test_overrides_go_as_c_pairs_but_where_a_name_holds_an_equals_sign(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`-c` works with every git; only a key that holds `=` goes in the environment, which
    git reads since 2.31: older git is not run with that driver on."""
    names = ["filter.lfs.clean", "filter.a=b.smudge"]
    pinned = gitcmd.Pinned(tmp_path / "admin", tmp_path / "ws", gitcmd.named_overrides(names))
    argv = gitcmd.git_argv(["add", "-A"], pinned)
    pairs = [argv[i + 1] for i, a in enumerate(argv) if a == "-c"]
    assert "filter.lfs.clean=" in pairs and "filter.lfs.required=false" in pairs
    assert not any("a=b" in p for p in pairs)
    env = gitcmd.config_env(pinned)
    assert env["GIT_CONFIG_COUNT"] == "4"
    assert [env[f"GIT_CONFIG_KEY_{n}"] for n in range(4)] == [
        "filter.a=b.clean",
        "filter.a=b.smudge",
        "filter.a=b.process",
        "filter.a=b.required",
    ]
    assert gitcmd.config_env(gitcmd.Pinned(tmp_path, tmp_path, (("filter.x.clean", ""),))) == {}
    monkeypatch.setattr(gitcmd, "git_version", lambda: (2, 30))
    with pytest.raises(gitcmd.GitTooOld, match=re.escape("filter.a=b, which git 2.30 cannot")):
        gitcmd.run(tmp_path, ["status"], pinned=pinned)


def test_filters_libgit2_cannot_list_are_turned_off_as_git_lists_them(tmp_path: Path) -> None:
    """libgit2 lists the keys of an `includeIf "hasconfig:..."` section but not what it
    includes, where git reads a filter driver; pinned on libgit2's list alone, git would run
    that driver on files whose attributes the agent wrote."""
    ws = tmp_path / "ws"
    ws.mkdir()
    gitcmd.run(ws, ["init", "-q"])
    marker = tmp_path / "filter-ran"
    driver = f'[filter "user"]\n\tclean = touch {marker}; cat\n\trequired = true\n'
    include_behind_hasconfig(ws, tmp_path / "work.gitconfig", driver)
    (ws / ".gitattributes").write_text("* filter=user\n")
    (ws / "work.txt").write_text("agent data\n")
    names = _libgit2_keys(ws / ".git")
    assert not any(n.startswith("filter.") for n in names)  # libgit2 did not list the driver
    hashing = ["hash-object", "-w", "--stdin-paths"]

    pinned = gitcmd.pin_named(ws / ".git", ws, names)
    assert pinned.lists_keys
    done = gitcmd.run(ws, hashing, pinned=pinned, input="work.txt\n")
    assert done.returncode == 0, done.stderr
    assert not marker.exists()
    assert ("filter.user.clean", "") in pinned.listed[0].config  # listed once, kept for the pin
    stored = gitcmd.run(ws, ["cat-file", "-p", done.stdout.strip()], pinned=pinned).stdout
    assert stored == "agent data\n"

    # the pin made from libgit2's list alone (what the server did before) runs the driver
    partial = gitcmd.Pinned(ws / ".git", ws, gitcmd.filter_overrides(names))
    assert gitcmd.run(ws, hashing, pinned=partial, input="work.txt\n").returncode == 0
    assert marker.exists()


def test_hooks_configured_by_name_are_turned_off_with_the_filters() -> None:
    names = ["core.bare", "hook.Spy.command", "hook.Spy.event", "hook.other.event"]
    pairs = gitcmd.named_overrides([*names, "filter.lfs.clean"])
    assert ("hook.Spy.enabled", "false") in pairs and ("hook.other.enabled", "false") in pairs
    assert ("filter.lfs.clean", "") in pairs
    assert gitcmd.named_overrides(["core.hookspath", "hooks.x"]) == ()


@pytest.mark.skipif(
    gitcmd.git_version() < (2, 54), reason="git reads hooks from its configuration since 2.54"
)
def test_a_hook_configured_by_name_does_not_run_in_a_workspace(tmp_path: Path) -> None:
    """`core.hooksPath` turns off the hooks directory only; a hook the user configured by
    name would run in the workspace, among the agent's files, at the server's git."""
    ws = tmp_path / "ws"
    ws.mkdir()
    gitcmd.run(ws, ["init", "-q"])
    marker = tmp_path / "hook-ran"
    gitcmd.run(ws, ["config", "hook.spy.event", "post-index-change"])
    gitcmd.run(ws, ["config", "hook.spy.command", f"touch {marker}"])
    (ws / "work.txt").write_text("agent data\n")
    names = _libgit2_keys(ws / ".git")

    pinned = gitcmd.pin_named(ws / ".git", ws, names)
    assert gitcmd.run(ws, ["add", "-A"], pinned=pinned).returncode == 0
    assert not marker.exists()

    # `SAFE_CONFIG` alone (its `core.hooksPath=/dev/null`) lets the configured hook run
    (ws / "more.txt").write_text("more\n")
    assert gitcmd.run(ws, ["add", "-A"], pinned=gitcmd.Pinned(ws / ".git", ws)).returncode == 0
    assert marker.exists()
