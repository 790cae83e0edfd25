"""A view is registered as a git worktree only when git is to work inside it.

Most agents only read and write files: their view is never registered, and their work is
committed through the repository's git dir with the view as its work tree. The first command,
listing or search registers it: then git inside sees the agent's branch and an index of its
tree, as in a worktree. Nothing of the user's (their index, their configuration) is touched by
either path, and a `.git` the agent made never becomes the server's."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import anyio

from orchestration.workspace import (
    GitRepo,
    Workspace,
    commit_workspace,
    create_workspace,
    layered,
    list_workspaces,
    remove_workspace,
)
from orchestration.workspace.layered import ensure_registered, layer_of, view_admin_dir
from tests.orchestration.gitutil import (
    assert_fsck,
    git,
    head,
    isolated_git,  # pyright: ignore[reportUnusedImport]  # noqa: F401  (autouse fixture)
    make_repo,
    needs_views,
    write,
)
from tests.orchestration.threads import race
from toolbus.resources import WriteScope
from toolbus.terminal import SandboxMode, Terminal, TerminalConfig

pytestmark = needs_views()

FILES = {"src/a.py": "a = 1\n", "docs/d.md": "d\n", ".gitignore": "*.log\n"}
SCOPE = WriteScope.of(["src"])


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _view(repo: GitRepo, agent: str = "a") -> Workspace:
    ws = create_workspace(repo, base_commit=head(repo.root), run_id="run", agent_id=agent)
    assert layer_of(ws) is not None
    return ws


def test_a_view_git_never_worked_in_is_committed_without_a_registration(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r", FILES)
    repo = GitRepo(root)
    config, index = _digest(repo.git_dir / "config"), _digest(repo.git_dir / "index")
    ws = _view(repo)
    assert head(root, f"refs/heads/{ws.branch}") == ws.base_commit
    assert not (repo.git_dir / "worktrees").exists()
    assert not os.path.lexists(ws.path / ".git")
    assert [w.agent_id for w in list_workspaces(repo)] == ["a"]
    write(ws.path, "src/a.py", "a = 2\n")
    write(ws.path, "src/new.py", "n\n")
    write(ws.path, "docs/d.md", "out of scope\n")
    write(ws.path, "debug.log", "ignored\n")
    done = commit_workspace(ws, message="work", write_scope=SCOPE)
    assert done.commit is not None and done.dropped == ["docs/d.md"]
    assert head(root, f"refs/heads/{ws.branch}") == done.commit
    assert git(root, "diff", "--name-only", ws.base_commit, done.commit).split() == [
        "src/a.py",
        "src/new.py",
    ]
    assert git(root, "show", f"{done.commit}:src/a.py") == "a = 2\n"
    # nothing registered, nothing of the user's changed
    assert view_admin_dir(ws) is None and not (repo.git_dir / "worktrees").exists()
    assert not os.path.lexists(ws.path / ".git")
    assert _digest(repo.git_dir / "config") == config
    assert _digest(repo.git_dir / "index") == index
    assert git(root, "status", "--porcelain") == ""
    assert_fsck(root)
    # a checkpoint as well, and git then sees the branch's tree as the view's index
    write(ws.path, "src/a.py", "a = 3\n")
    again = commit_workspace(ws, message="more", write_scope=SCOPE, keep_working=True)
    assert again.commit is not None and view_admin_dir(ws) is None
    admin = ensure_registered(ws)
    assert admin == view_admin_dir(ws)
    assert git(ws.path, "rev-parse", "HEAD").strip() == again.commit
    assert git(ws.path, "status", "--porcelain") == " M docs/d.md\n"
    remove_workspace(repo, ws, delete_branch=True)
    assert not (repo.git_dir / "worktrees" / "a").exists()
    assert git(root, "worktree", "list", "--porcelain").count("worktree ") == 1
    assert_fsck(root)


def test_registration_is_made_once_and_puts_a_planted_git_aside(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r", FILES)
    repo = GitRepo(root)
    ws = _view(repo)
    # a `.git` directory at the view's root before it is registered (a file tool cannot make
    # one; the server treats it as the agent's all the same)
    write(ws.path, ".git/config", "[core]\n\tfsmonitor = touch /tmp/pwned\n")
    admins = race(lambda _n: ensure_registered(ws), 4)  # (an error of any is raised)
    assert len(set(admins)) == 1
    assert sorted(p.name for p in (repo.git_dir / "worktrees").iterdir()) == ["a"]
    assert (ws.path / ".git").read_text(encoding="utf-8") == f"gitdir: {admins[0]}\n"
    quarantined = list((repo.state_dir / "quarantine" / "a").glob("planted-*/.git/config"))
    assert len(quarantined) == 1
    assert git(ws.path, "rev-parse", "--abbrev-ref", "HEAD").strip() == ws.branch
    assert git(ws.path, "status", "--porcelain") == ""
    assert_fsck(root)


def test_a_planted_git_in_a_view_not_registered_is_moved_out_at_its_commit(
    tmp_path: Path,
) -> None:
    root = make_repo(tmp_path / "r", FILES)
    repo = GitRepo(root)
    ws = _view(repo)
    write(ws.path, ".git", f"gitdir: {repo.git_dir}\n")  # pointing at the user's repository
    write(ws.path, "src/a.py", "a = 2\n")
    done = commit_workspace(ws, message="work", write_scope=SCOPE)
    assert [p.split(" ")[0] for p in done.planted] == [".git"]
    assert not os.path.lexists(ws.path / ".git")  # the server's gitfile is not put in
    assert git(root, "diff", "--name-only", ws.base_commit, done.commit or "").split() == [
        "src/a.py"
    ]
    assert git(root, "status", "--porcelain") == ""
    assert_fsck(root)


def test_a_registration_cut_short_is_finished_by_the_next(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r", FILES)
    repo = GitRepo(root)
    ws = _view(repo)
    admin = ensure_registered(ws)
    # killed after the admin dir was renamed into place, before the view's `.git` was written
    os.unlink(ws.path / ".git")
    # and another view's registration killed while its admin dir was being made
    other = _view(repo, "b")
    staging = repo.state_dir / "staging" / "admin-run-b"
    staging.mkdir(parents=True)
    (staging / "HEAD").write_text("ref: refs/heads/elsewhere\n", encoding="utf-8")
    assert ensure_registered(ws) == admin
    assert git(ws.path, "status", "--porcelain") == ""
    other_admin = ensure_registered(other)
    assert (other_admin / "HEAD").read_text(encoding="utf-8") == f"ref: refs/heads/{other.branch}\n"
    assert not staging.exists()
    assert git(other.path, "status", "--porcelain") == ""
    assert_fsck(root)


def test_the_first_command_registers_the_view(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "r", FILES)
    repo = GitRepo(root)
    ws = _view(repo)
    calls: list[Path] = []

    def register() -> Path:
        calls.append(ensure_registered(ws))
        return calls[-1]

    terminal = Terminal(
        ws.path,
        TerminalConfig(sandbox=SandboxMode.NONE, git_common_dir=repo.git_dir),
        register_git=register,
    )

    async def commands() -> list[str]:
        out: list[str] = []
        for command in ("git rev-parse --abbrev-ref HEAD", "git status --porcelain"):
            result = await terminal.run(command)
            assert result.exit_code == 0, result
            out.append(result.output)
        return out

    try:
        assert calls == [] and view_admin_dir(ws) is None
        branch, status = anyio.run(commands)
    finally:
        terminal.close()
    assert branch.strip() == ws.branch and status == ""
    assert len(calls) == 1 and calls[0] == view_admin_dir(ws)


def test_a_torn_record_is_no_record_and_the_view_is_made_again(tmp_path: Path) -> None:
    """The view's record is written in place, last: torn by a kill, it lists nothing, and
    making the workspace again completes it on the same branch and layers."""
    root = make_repo(tmp_path / "r", FILES)
    repo = GitRepo(root)
    ws = _view(repo)
    write(ws.path, "src/a.py", "a = 2\n")
    record = repo.state_dir / "layers" / "run" / "a" / "lower"  # its base, then the record
    base, view = record.read_text(encoding="utf-8").splitlines()
    assert base == ws.base_commit and Workspace.model_validate_json(view).branch == ws.branch
    record.write_text(f"{base}\n{view[:20]}", encoding="utf-8")
    assert list_workspaces(repo) == []
    again = _view(repo)
    assert again == ws and (ws.path / "src/a.py").read_text() == "a = 2\n"
    assert [w.agent_id for w in list_workspaces(repo)] == ["a"]
    done = commit_workspace(again, message="work", write_scope=SCOPE)
    assert git(root, "show", f"{done.commit}:src/a.py") == "a = 2\n"
    assert_fsck(root)


def test_a_view_recorded_by_an_earlier_version_is_still_found(tmp_path: Path) -> None:
    """Views made by a server before the record joined `lower` kept it in a file of its own:
    they are listed, and their work committed, as before."""
    root = make_repo(tmp_path / "r", FILES)
    repo = GitRepo(root)
    ws = _view(repo)
    write(ws.path, "src/a.py", "a = 3\n")
    layers = repo.state_dir / "layers" / "run" / "a"
    base, view = (layers / "lower").read_text(encoding="utf-8").splitlines()
    (layers / "lower").write_text(base + "\n", encoding="ascii")
    (layers / "fanout-workspace.json").write_text(view, encoding="utf-8")
    assert list_workspaces(repo) == [ws]
    done = commit_workspace(_view(repo), message="work", write_scope=SCOPE)
    assert git(root, "show", f"{done.commit}:src/a.py") == "a = 3\n"


def test_a_registration_made_meanwhile_elsewhere_is_taken_not_doubled(tmp_path: Path) -> None:
    """Another process registered the view between this one's look and its rename: its admin
    dir is used, and no second one (under the other name) is made."""
    root = make_repo(tmp_path / "r", FILES)
    repo = GitRepo(root)
    ws = _view(repo)
    admin = ensure_registered(ws)
    layers = layer_of(ws)
    assert layers is not None
    assert layered._register(ws, layers) == admin  # pyright: ignore[reportPrivateUsage]
    assert sorted(p.name for p in (repo.git_dir / "worktrees").iterdir()) == ["a"]
    assert not (repo.state_dir / "staging" / "admin-run-a").exists()
    assert git(root, "worktree", "list", "--porcelain").count("worktree ") == 2
