"""Test helpers: throw-away git repositories with a fixed identity and no global config."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestration.workspace.overlay import enter_private_mounts

TEST_NAME = "Test User"
TEST_EMAIL = "test@example.invalid"


@pytest.fixture(autouse=True)
def isolated_git(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No global or system git config and no identity in the environment: code must not need one."""
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "no-global-gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in (
        "GIT_AUTHOR_NAME",
        "GIT_AUTHOR_EMAIL",
        "GIT_COMMITTER_NAME",
        "GIT_COMMITTER_EMAIL",
        "EMAIL",
        "GIT_DIR",
        "GIT_WORK_TREE",
        "GIT_INDEX_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    yield


def git(
    cwd: Path, *args: str, input: str | None = None, env: Mapping[str, str] | None = None
) -> str:
    """Run git as the test user (identity given on the command line); return stdout."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    proc = subprocess.run(
        ["git", "-c", f"user.name={TEST_NAME}", "-c", f"user.email={TEST_EMAIL}", *args],
        cwd=cwd,
        input=input,
        capture_output=True,
        text=True,
        env=full_env,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {proc.stderr}")
    return proc.stdout


def write(root: Path, rel: str, content: str) -> None:
    """Write a file below root, creating its directories."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content, encoding="utf-8")


def commit_files(root: Path, files: Mapping[str, str | None], message: str) -> str:
    """Write (or delete, for None) files in root's checkout and commit them; the new HEAD."""
    for rel, content in files.items():
        if content is None:
            (root / rel).unlink()
        else:
            write(root, rel, content)
    git(root, "add", "-A", "--", *files)
    git(root, "commit", "-q", "-m", message)
    return head(root)


def make_repo(path: Path, files: Mapping[str, str] | None = None) -> Path:
    """A new repository on branch main with one commit of `files`."""
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    commit_files(path, files or {"README.md": "hello\n"}, "initial")
    return path


def head(root: Path, rev: str = "HEAD") -> str:
    """The commit id of `rev`."""
    return git(root, "rev-parse", rev).strip()


def assert_fsck(root: Path) -> None:
    """`git fsck --strict` finds nothing wrong."""
    proc = subprocess.run(
        ["git", "fsck", "--strict", "--no-progress"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bad = [ln for ln in proc.stdout.splitlines() + proc.stderr.splitlines() if ln.strip()]
    bad = [ln for ln in bad if not ln.startswith(("dangling", "Checking"))]
    assert not bad, "\n".join(bad)


@dataclass(frozen=True)
class UserState:
    """Everything the user can see of their checkout: branch, HEAD, index, status, file bytes."""

    branch: str
    head: str
    staged_diff: str
    unstaged_diff: str
    status: str
    index_listing: str
    files: dict[str, str]


def user_state(root: Path) -> UserState:
    """Capture the user's visible state of the checkout (ignoring .git)."""
    files: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if ".git" in dirnames:
            dirnames.remove(".git")
        for name in filenames:
            full = Path(dirpath) / name
            files[full.relative_to(root).as_posix()] = hashlib.sha1(full.read_bytes()).hexdigest()
    return UserState(
        branch=git(root, "symbolic-ref", "-q", "HEAD").strip()
        if subprocess.run(
            ["git", "symbolic-ref", "-q", "HEAD"], cwd=root, capture_output=True, check=False
        ).returncode
        == 0
        else "(detached)",
        head=head(root),
        staged_diff=git(root, "diff", "--cached", "--binary"),
        unstaged_diff=git(root, "diff", "--binary"),
        status=git(root, "status", "--porcelain=v1", "-uall", "--ignored"),
        index_listing=git(root, "ls-files", "-s"),
        files=files,
    )


@pytest.fixture
def worktrees_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Agents' workspaces as git worktrees, for tests of the worktree implementation."""
    monkeypatch.setenv("FANOUT_WORKSPACES", "worktree")


def needs_views() -> pytest.MarkDecorator:
    """A mark that skips a test, with the reason, where this process cannot make copy-on-write
    views (`enter_private_mounts`, done once per process)."""
    reason = enter_private_mounts()
    return pytest.mark.skipif(reason is not None, reason=f"no copy-on-write views: {reason}")


@pytest.fixture(params=["worktree", "view"])
def workspace_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each kind of workspace in turn: git worktrees, and copy-on-write views where this
    process can mount them (skipped, with the reason, where it cannot)."""
    kind = str(request.param)
    if kind == "worktree":
        monkeypatch.setenv("FANOUT_WORKSPACES", "worktree")
    else:
        monkeypatch.delenv("FANOUT_WORKSPACES", raising=False)
        reason = enter_private_mounts()
        if reason is not None:
            pytest.skip(f"no copy-on-write views here: {reason}")
    return kind
