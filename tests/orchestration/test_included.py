"""The user's ignored files (`include`) copied into a checkout an agent's commits may have
shaped: a symlink the agent committed is never written through."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestration.verify import Verifier
from orchestration.workspace import (
    GitRepo,
    Workspace,
    commit_workspace,
    create_workspace,
    remove_workspace,
)
from orchestration.workspace.included import copy_included
from orchestration.workspace.layered import layer_of, unmount_view
from tests.orchestration.gitutil import (
    git,
    head,
    isolated_git,  # pyright: ignore[reportUnusedImport]  # noqa: F401  (autouse fixture)
    make_repo,
    needs_views,
    workspace_kind,  # pyright: ignore[reportUnusedImport]  # noqa: F401  (fixture)
    write,
)
from tests.orchestration.test_orchestrator import settings
from toolbus.resources import WriteScope


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


def _base_with_a_link(root: Path, name: str, target: str) -> str:
    """A commit (an agent's, merged; not checked out by the user) holding `name` as a link to
    `target`, where the user's checkout has their ignored `name`."""
    git(root, "checkout", "-q", "-b", "agent")
    aside = root.parent / "aside"
    os.rename(root / name, aside)
    os.symlink(target, root / name)
    git(root, "add", "-f", name)
    git(root, "commit", "-q", "-m", "a link")
    commit = git(root, "rev-parse", "HEAD").strip()
    os.unlink(root / name)
    git(root, "checkout", "-q", "main")
    os.rename(aside, root / name)
    return commit


@needs_views()
@pytest.mark.parametrize("what", ["file", "directory"])
def test_a_view_lays_nothing_in_through_a_link_of_its_base(tmp_path: Path, what: str) -> None:
    root = make_repo(tmp_path / "user", {"README.md": "hi\n", ".gitignore": "conf/\n.venv/\n"})
    (root / "conf").mkdir()
    (root / "conf" / ".env").write_text("API_TOKEN=s3cret\n")
    (root / ".venv").mkdir()
    (root / ".venv" / "site.py").write_text("the user's venv\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    name, include = ("conf", "conf/.env") if what == "file" else (".venv", ".venv")
    base = _base_with_a_link(root, name, str(outside))
    repo = GitRepo(root)
    ws = create_workspace(repo, base_commit=base, run_id="r1", agent_id="a", include=[include])
    try:
        assert ws.included == []
        assert not os.path.ismount(outside) and os.listdir(outside) == []
        assert (ws.path / name).is_symlink()
    finally:
        remove_workspace(repo, ws, delete_branch=True)


@pytest.mark.usefixtures("workspace_kind")
def test_the_users_included_file_is_never_committed(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "user", {"README.md": "hi\n"})
    # ignored in the user's checkout only (not committed): the agent's view does not ignore it
    (root / ".gitignore").write_text(".env\n")
    (root / ".env").write_text("API_TOKEN=s3cret\n")
    repo = GitRepo(root)
    ws = create_workspace(repo, base_commit=head(root), run_id="r1", agent_id="a", include=[".env"])
    assert ws.included == [".env"]
    write(ws.path, "src/x.py", "x = 1\n")
    # as the runner commits it: from the agent's record (`workspace_of`)
    again = ws.model_copy(update={"included": list(ws.included)})
    done = commit_workspace(again, message="work", write_scope=WriteScope.of(None))
    assert [c.path for c in done.changes] == ["src/x.py"]
    assert done.dropped == [".env"]
    assert ".env" not in git(root, "ls-tree", "--name-only", str(done.commit)).split()


@needs_views()
def test_a_remount_lays_nothing_in_through_the_agents_link(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "user", {"README.md": "hi\n", ".gitignore": ".venv/\n"})
    (root / "tools" / ".venv").mkdir(parents=True)
    (root / "tools" / ".venv" / "site.py").write_text("the user's venv\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    repo = GitRepo(root)
    ws = create_workspace(
        repo, base_commit=head(root), run_id="r1", agent_id="a", include=["tools/.venv"]
    )
    assert ws.included == ["tools/.venv"]
    layers = layer_of(ws)
    assert layers is not None
    unmount_view(ws.path)  # the server is killed: its namespace's mounts go with it
    # what the agent left in its upper layer: `tools` moved aside, a link in its place
    upper = layers / "upper"
    os.rename(upper / "tools", upper / "tools.old")
    os.symlink(outside, upper / "tools")
    # a new server commits the work left, mounting the view again
    again = Workspace(
        path=ws.path, branch=ws.branch, base_commit=ws.base_commit, run_id="r1", agent_id="a"
    )
    try:
        commit_workspace(again, message="recovered", write_scope=WriteScope.of(None))
        assert os.listdir(outside) == []
        assert not os.path.ismount(outside)
    finally:
        remove_workspace(repo, again, delete_branch=True)
