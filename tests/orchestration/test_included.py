"""The user's ignored files (`include`) copied into a checkout an agent's commits may have
shaped: a symlink the agent committed is never written through."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestration.verify import Verifier
from orchestration.workspace import GitRepo
from orchestration.workspace.included import copy_included
from tests.orchestration.gitutil import git, make_repo
from tests.orchestration.test_orchestrator import settings


def _user_repo(tmp_path: Path) -> Path:
    root = make_repo(tmp_path / "user", {"README.md": "hi\n", ".gitignore": "conf/\n.env\n"})
    (root / "conf").mkdir()
    (root / "conf" / "secrets.env").write_text("API_TOKEN=s3cret\n")
    (root / "conf" / "pre-commit").write_text("#!/bin/sh\necho user file\n")
    os.chmod(root / "conf" / "pre-commit", 0o755)
    (root / ".env").write_text("KEY=1\n")
    return root


def test_the_users_files_are_copied_with_their_mode_and_time(tmp_path: Path) -> None:
    root = _user_repo(tmp_path)
    os.utime(
        root / "conf" / "pre-commit", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000)
    )
    dest = tmp_path / "dest"
    dest.mkdir()
    copied = copy_included(root, dest, ["conf", ".env"])
    assert copied == [".env", "conf/pre-commit", "conf/secrets.env"]
    assert (dest / "conf" / "secrets.env").read_text() == "API_TOKEN=s3cret\n"
    made = (dest / "conf" / "pre-commit").stat()
    assert made.st_mode & 0o777 == 0o755
    assert made.st_mtime_ns == 1_600_000_000_000_000_000
    # a second copy keeps what is there
    (dest / ".env").write_text("mine\n")
    assert copy_included(root, dest, [".env"]) == []
    assert (dest / ".env").read_text() == "mine\n"


@pytest.mark.parametrize("where", ["parent", "file"])
def test_a_symlink_in_the_checkout_is_not_written_through(tmp_path: Path, where: str) -> None:
    root = _user_repo(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    if where == "parent":
        (dest / "conf").symlink_to(outside)
    else:
        (dest / "conf").mkdir()
        (dest / "conf" / "secrets.env").symlink_to(outside / "secrets.env")
    copied = copy_included(root, dest, ["conf"])
    assert os.listdir(outside) == []
    assert "conf/secrets.env" not in copied
    if where == "file":  # the other file, in a real directory, is still copied
        assert copied == ["conf/pre-commit"]


def test_the_verification_checkout_does_not_follow_an_agents_symlink(tmp_path: Path) -> None:
    root = _user_repo(tmp_path)
    outside = tmp_path / "attacker-drop"
    outside.mkdir()
    # the agent's tree: `conf` a link outside, `.env` a link into the user's .git/hooks
    # (the scratch checkout is <repo>/.git/fanout/verify/<owner>/tree)
    git(root, "rm", "-q", "--cached", ".gitignore")
    (root / ".gitignore").unlink()
    os.rename(root / "conf", tmp_path / "conf-aside")
    os.rename(root / ".env", tmp_path / "env-aside")
    (root / "conf").symlink_to(outside)
    (root / ".env").symlink_to("../../../../hooks/pre-commit")
    git(root, "add", "conf", ".env")
    git(root, "commit", "-q", "-m", "agent")
    tree = git(root, "rev-parse", "HEAD^{tree}").strip()
    git(root, "reset", "-q", "--hard", "HEAD~1")
    os.rename(tmp_path / "conf-aside", root / "conf")
    os.rename(tmp_path / "env-aside", root / ".env")
    config = settings(root).model_copy(update={"include": ("conf", ".env")})
    verifier = Verifier(GitRepo(root), config, "true", 10.0, owner="srv")
    work = verifier._checkout(tree)  # pyright: ignore[reportPrivateUsage]
    assert (work / "conf").is_symlink() and (work / ".env").is_symlink()
    assert os.listdir(outside) == []
    assert not (root / ".git" / "hooks" / "pre-commit").exists()
