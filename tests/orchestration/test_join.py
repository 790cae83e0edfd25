"""The join step: ordered merges, conflicts, the user's dirty work, CAS races, dry runs."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Mapping
from pathlib import Path

import filelock
import pygit2
import pytest

from orchestration import join as join_module
from orchestration.errors import MergeError
from orchestration.join import (
    JoinCandidate,
    Joiner,
    JoinOutcome,
    _write_merged_tree,  # pyright: ignore[reportPrivateUsage]
    conflict_diff,
)
from orchestration.workspace import (
    GitRepo,
    commit_workspace,
    create_workspace,
    snapshot,
)
from tests.orchestration.gitutil import (
    assert_fsck,
    commit_files,
    git,
    head,
    isolated_git,  # pyright: ignore[reportUnusedImport]  # noqa: F401  (autouse fixture)
    make_repo,
    user_state,
    workspace_kind,  # pyright: ignore[reportUnusedImport]  # noqa: F401  (fixture)
    write,
)
from toolbus.resources import WriteScope

BASE_FILES = {
    "shared.txt": "".join(f"line {i}\n" for i in range(1, 11)),
    "src/app.py": "print('app')\n",
    "README.md": "readme\n",
}

pytestmark = pytest.mark.usefixtures("workspace_kind")


def agent(
    repo: GitRepo,
    base: str,
    agent_id: str,
    files: Mapping[str, str | None],
    *,
    run_id: str = "run1",
    summary: str = "",
) -> JoinCandidate:
    """An agent's workspace at `base` with `files` written (None deletes) and committed."""
    ws = create_workspace(repo, base_commit=base, run_id=run_id, agent_id=agent_id)
    for rel, content in files.items():
        if content is None:
            (ws.path / rel).unlink()
        else:
            write(ws.path, rel, content)
    work = commit_workspace(ws, message=f"{agent_id} work", write_scope=WriteScope.of(None))
    assert work.commit is not None
    return JoinCandidate(
        agent_id=agent_id,
        name=f"agent {agent_id}",
        task_summary=f"task of {agent_id}",
        model_summary=summary or f"{agent_id} did its job",
        base_commit=base,
        branch=ws.branch,
        commit=work.commit,
    )


@pytest.fixture
def repo(tmp_path: Path) -> GitRepo:
    return GitRepo(make_repo(tmp_path / "user", BASE_FILES))


def test_clean_agents_merge_in_order(repo: GitRepo) -> None:
    root = repo.root
    base = head(root)
    cands = [agent(repo, base, f"a{i}", {f"pkg{i}/mod.py": f"x = {i}\n"}) for i in range(3)]
    seen: list[JoinOutcome] = []

    joiner = Joiner(repo)
    outcomes = joiner.merge(cands, dry_run=False, on_progress=seen.append)

    assert [o.outcome for o in outcomes] == ["merged"] * 3
    assert seen == outcomes
    log = git(root, "log", "--format=%H %s", f"{base}..HEAD").splitlines()
    assert [line.split(" ", 1)[1] for line in log] == [
        "fanout: agent a2: task of a2",
        "fanout: agent a1: task of a1",
        "fanout: agent a0: task of a0",
    ]
    assert [line.split(" ")[0] for line in reversed(log)] == [o.commit for o in outcomes]
    assert joiner.final_head == head(root) == outcomes[-1].commit
    body = git(root, "log", "-1", "--format=%B")
    assert "a2 did its job" in body
    assert "Fanout-Agent: a2" in body and f"Fanout-Base: {base}" in body
    trailers = git(root, "log", "-1", "--format=%(trailers:key=Fanout-Agent,valueonly)")
    assert trailers.strip() == "a2"
    for i in range(3):
        assert (root / f"pkg{i}" / "mod.py").read_text() == f"x = {i}\n"
    assert outcomes[0].diffstat.files == 1 and outcomes[0].diffstat.insertions == 1
    assert git(root, "status", "--porcelain", "-uall") == ""
    assert git(root, "rev-parse", "--abbrev-ref", "HEAD").strip() == "main"
    assert_fsck(root)


def test_same_lines_conflict_applies_nothing(repo: GitRepo) -> None:
    root = repo.root
    base = head(root)
    lines = BASE_FILES["shared.txt"].splitlines(keepends=True)
    first = agent(repo, base, "a1", {"shared.txt": "".join(["ONE\n", *lines[1:]])})
    second = agent(
        repo, base, "a2", {"shared.txt": "".join(["TWO\n", *lines[1:]]), "other.txt": "o\n"}
    )
    joiner = Joiner(repo)
    [merged] = joiner.merge([first], dry_run=False)
    assert merged.outcome == "merged"
    before = user_state(root)

    [out] = joiner.merge([second], dry_run=False)

    assert out.outcome == "conflicted"
    assert out.conflicts == ["shared.txt"]
    assert out.commit is None
    assert out.diffstat.files == 2  # the agent's own change
    assert user_state(root) == before
    assert not (root / "other.txt").exists()
    assert head(root, "refs/heads/fanout/run1/a2") == second.commit  # the agent's work is kept
    text = conflict_diff(repo, second)
    assert "=== conflict in shared.txt" in text
    assert "<<<<<<< canonical" in text and ">>>>>>> agent agent a2" in text
    assert "ONE" in text and "TWO" in text and "||||||| base" in text
    assert joiner.conflict_diff(second) == text
    assert_fsck(root)


def test_dirty_overlapping_agent_is_skipped_and_others_merge(repo: GitRepo) -> None:
    root = repo.root
    base = head(root)
    overlapping = agent(repo, base, "a1", {"src/app.py": "print('agent')\n"})
    disjoint = agent(repo, base, "a2", {"docs/guide.md": "guide\n"})
    untracked_clash = agent(repo, base, "a3", {"notes/todo.txt": "agent todo\n"})
    write(root, "src/app.py", "print('mine, uncommitted')\n")
    write(root, "README.md", "readme staged\n")
    git(root, "add", "README.md")
    write(root, "notes/todo.txt", "my untracked todo\n")
    write(root, "scratch.txt", "untracked, unrelated\n")
    staged_before = git(root, "diff", "--cached", "--", "README.md")

    outcomes = Joiner(repo).merge([overlapping, disjoint, untracked_clash], dry_run=False)

    assert [o.outcome for o in outcomes] == ["skipped", "merged", "skipped"]
    assert outcomes[0].reason is not None
    assert "your uncommitted changes to src/app.py overlap" in outcomes[0].reason
    assert "commit or stash them" in outcomes[0].reason
    assert outcomes[0].diffstat.files == 1
    assert outcomes[2].reason is not None and "notes/todo.txt" in outcomes[2].reason
    assert (root / "src" / "app.py").read_text() == "print('mine, uncommitted')\n"
    assert (root / "notes" / "todo.txt").read_text() == "my untracked todo\n"
    assert (root / "scratch.txt").read_text() == "untracked, unrelated\n"
    assert (root / "README.md").read_text() == "readme staged\n"
    assert git(root, "diff", "--cached", "--", "README.md") == staged_before
    assert (root / "docs" / "guide.md").read_text() == "guide\n"
    status = git(root, "status", "--porcelain", "-uall").splitlines()
    assert sorted(status) == sorted(
        ["?? notes/todo.txt", "?? scratch.txt", "M  README.md", " M src/app.py"]
    )
    assert head(root) == outcomes[1].commit
    assert_fsck(root)


def test_concurrent_joiners_serialize_and_both_land(repo: GitRepo) -> None:
    root = repo.root
    base = head(root)
    batches = [
        [agent(repo, base, f"t{t}a{i}", {f"t{t}/f{i}.txt": f"{t}{i}\n"}) for i in range(3)]
        for t in range(2)
    ]
    results: dict[int, list[JoinOutcome]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def work(t: int) -> None:
        try:
            joiner = Joiner(GitRepo(root))  # separate objects, like two server processes
            barrier.wait()
            results[t] = joiner.merge(batches[t], dry_run=False)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors, errors
    assert all(o.outcome == "merged" for t in range(2) for o in results[t])
    landed = {o.commit for t in range(2) for o in results[t]}
    history = set(git(root, "rev-list", f"{base}..HEAD").split())
    assert landed == history and len(history) == 6
    for t in range(2):
        for i in range(3):
            assert (root / f"t{t}" / f"f{i}.txt").read_text() == f"{t}{i}\n"
    assert git(root, "status", "--porcelain", "-uall") == ""
    assert_fsck(root)


def test_lock_timeout_is_a_merge_error(repo: GitRepo) -> None:
    base = head(repo.root)
    cand = agent(repo, base, "a1", {"x.txt": "x\n"})
    joiner = Joiner(repo, lock_timeout_s=0.1)
    with filelock.FileLock(str(joiner.lock_path)), pytest.raises(MergeError, match="another merge"):
        joiner.merge([cand], dry_run=False)
    # a dry run needs no lock
    with filelock.FileLock(str(joiner.lock_path)):
        assert joiner.merge([cand], dry_run=True)[0].outcome == "clean"


def test_branch_moved_underneath_is_recomputed_on_the_new_head(repo: GitRepo) -> None:
    root = repo.root
    base = head(root)
    cand = agent(repo, base, "a1", {"feature.txt": "agent feature\n"})
    user_commits: list[str] = []
    calls: list[str] = []

    def user_commits_meanwhile(agent_id: str) -> str | None:
        calls.append(agent_id)
        if not user_commits:
            user_commits.append(commit_files(root, {"user.txt": "user work\n"}, "user commit"))
        return None

    [out] = Joiner(repo).merge([cand], dry_run=False, can_land=user_commits_meanwhile)

    assert out.outcome == "merged"
    assert calls == ["a1", "a1"]  # asked again before the second landing attempt
    assert head(root, "HEAD^") == user_commits[0]
    assert head(root, "HEAD^^") == base
    assert (root / "user.txt").read_text() == "user work\n"
    assert (root / "feature.txt").read_text() == "agent feature\n"
    assert git(root, "status", "--porcelain", "-uall") == ""
    assert_fsck(root)


def test_snapshot_base_that_is_not_an_ancestor_merges_correctly(repo: GitRepo) -> None:
    """git 2.39's merge-tree would compute the base itself (HEAD) and see spurious conflicts."""
    root = repo.root
    lines = BASE_FILES["shared.txt"].splitlines(keepends=True)
    # the user's uncommitted edit at the top of shared.txt becomes the run's base
    dirty = "".join(["line 1 (user, uncommitted)\n", *lines[1:]])
    write(root, "shared.txt", dirty)
    snap = snapshot(repo, "run1")
    assert snap.dirty
    # the agent edits the bottom, on top of the snapshot
    agent_text = "".join(["line 1 (user, uncommitted)\n", *lines[1:-1], "line 10 (agent)\n"])
    cand = agent(repo, snap.base_commit, "a1", {"shared.txt": agent_text})
    # the user then rewrites line 1 in other words and edits line 5, and commits
    final = "".join(["line 1 (user, final)\n", *lines[1:4], "line 5 (user)\n", *lines[5:]])
    user_head = commit_files(root, {"shared.txt": final}, "user commit")
    merge_base = git(root, "merge-base", user_head, cand.commit).strip()
    assert merge_base == snap.head_commit != snap.base_commit
    # git's own merge-tree (2.39: no --merge-base) picks the old HEAD as base and conflicts
    plain = subprocess.run(
        ["git", "merge-tree", "--write-tree", "--name-only", user_head, cand.commit],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    assert plain.returncode == 1 and "shared.txt" in plain.stdout

    [out] = Joiner(repo).merge([cand], dry_run=False)

    assert out.outcome == "merged", out
    expected = "".join(
        [
            "line 1 (user, final)\n",
            *lines[1:4],
            "line 5 (user)\n",
            *lines[5:-1],
            "line 10 (agent)\n",
        ]
    )
    assert (root / "shared.txt").read_text() == expected
    assert git(root, "show", "HEAD:shared.txt") == expected
    assert out.diffstat.files == 1 and out.diffstat.insertions == 1
    assert git(root, "status", "--porcelain", "-uall") == ""
    assert_fsck(root)


def test_dry_run_changes_nothing_and_chains_clean_candidates(repo: GitRepo) -> None:
    root = repo.root
    base = head(root)
    lines = BASE_FILES["shared.txt"].splitlines(keepends=True)
    a1 = agent(repo, base, "a1", {"shared.txt": "".join(["ONE\n", *lines[1:]])})
    a2 = agent(repo, base, "a2", {"shared.txt": "".join(["TWO\n", *lines[1:]])})
    a3 = agent(repo, base, "a3", {"new.txt": "n\n"})
    a4 = agent(repo, base, "a4", {"src/app.py": "print('a4')\n"})
    write(root, "src/app.py", "dirty\n")
    before = user_state(root)
    refs_before = git(root, "for-each-ref")

    joiner = Joiner(repo)
    outcomes = joiner.merge([a1, a2, a3, a4], dry_run=True)

    assert [o.outcome for o in outcomes] == ["clean", "conflicted", "clean", "skipped"]
    assert outcomes[1].conflicts == ["shared.txt"]
    assert outcomes[0].diffstat.files == 1 and outcomes[0].commit is None
    assert outcomes[2].diffstat.insertions == 1
    assert user_state(root) == before
    assert git(root, "for-each-ref") == refs_before
    assert joiner.final_head == head(root) == base
    assert_fsck(root)


def test_dry_run_leaves_the_index_file_alone(repo: GitRepo) -> None:
    root = repo.root
    base = head(root)
    cand = agent(repo, base, "a1", {"x.txt": "x\n"})
    write(root, "README.md", "dirty\n")
    index = root / ".git" / "index"
    stamp = index.stat().st_mtime_ns, index.read_bytes()
    assert Joiner(repo).merge([cand], dry_run=True)[0].outcome == "clean"
    assert (index.stat().st_mtime_ns, index.read_bytes()) == stamp


def test_lost_lease_candidate_is_skipped(repo: GitRepo) -> None:
    root = repo.root
    base = head(root)
    fenced = agent(repo, base, "a1", {"a.txt": "a\n"})
    fine = agent(repo, base, "a2", {"b.txt": "b\n"})

    def can_land(agent_id: str) -> str | None:
        return "its write lease was lost (fencing token 7 is stale)" if agent_id == "a1" else None

    outcomes = Joiner(repo).merge([fenced, fine], dry_run=False, can_land=can_land)

    assert [o.outcome for o in outcomes] == ["skipped", "merged"]
    assert outcomes[0].reason == "its write lease was lost (fencing token 7 is stale)"
    assert not (root / "a.txt").exists() and (root / "b.txt").exists()
    assert head(root, "refs/heads/fanout/run1/a1") == fenced.commit
    assert_fsck(root)


def test_detached_head_is_the_canonical_target(repo: GitRepo) -> None:
    root = repo.root
    base = head(root)
    git(root, "checkout", "-q", "--detach", "HEAD")
    cand = agent(repo, base, "a1", {"x.txt": "x\n"})
    [out] = Joiner(repo).merge([cand], dry_run=False)
    assert out.outcome == "merged"
    assert head(root) == out.commit
    assert head(root, "refs/heads/main") == base  # the branch did not move
    assert (root / "x.txt").read_text() == "x\n"
    assert git(root, "status", "--porcelain", "-uall") == ""
    assert_fsck(root)


def test_deletions_renames_and_stat_dirty_files(repo: GitRepo) -> None:
    root = repo.root
    base = head(root)
    cand = agent(repo, base, "a1", {"README.md": None, "src/app.py": "print('moved')\n"})
    # touch a file without changing it: only its stat data differs from the index
    (root / "src" / "app.py").write_text(BASE_FILES["src/app.py"])
    [out] = Joiner(repo).merge([cand], dry_run=False)
    assert out.outcome == "merged", out
    assert not (root / "README.md").exists()
    assert (root / "src" / "app.py").read_text() == "print('moved')\n"
    assert git(root, "status", "--porcelain", "-uall") == ""
    assert_fsck(root)


def test_agent_with_missing_commit_or_no_changes_is_skipped(repo: GitRepo) -> None:
    base = head(repo.root)
    ghost = JoinCandidate(
        agent_id="g",
        name="ghost",
        task_summary="t",
        base_commit=base,
        branch="fanout/run1/g",
        commit="1" * 40,
    )
    idle = ghost.model_copy(update={"agent_id": "i", "commit": base})
    outcomes = Joiner(repo).merge([ghost, idle], dry_run=False)
    assert [o.outcome for o in outcomes] == ["skipped", "skipped"]
    assert outcomes[0].reason is not None and "not in the repository" in outcomes[0].reason
    assert outcomes[1].reason == "the agent changed nothing"
    assert head(repo.root) == base


def test_pinned_branch_that_is_not_checked_out_is_refused(repo: GitRepo) -> None:
    root = repo.root
    base = head(root)
    git(root, "branch", "other")
    cand = agent(repo, base, "a1", {"x.txt": "x\n"})
    with pytest.raises(MergeError, match="check out other"):
        Joiner(repo, branch_ref="refs/heads/other").merge([cand], dry_run=False)
    assert head(root) == base and not (root / "x.txt").exists()


def test_incremental_merged_tree_equals_a_full_index_write(repo: GitRepo) -> None:
    """The merged tree is built by editing the head's tree; it must equal libgit2's full write."""
    root = repo.root
    base = commit_files(
        root,
        {"dir/a.txt": "a\n", "dir/sub/b.txt": "b\n", "flip": "file\n", "gone/x.txt": "x\n"},
        "more structure",
    )
    ours = commit_files(root, {"README.md": "ours\n", "dir/sub/c.txt": "c\n"}, "ours")
    agent(
        repo,
        base,
        "a1",
        {
            "flip": None,
            "flip/inside.txt": "now a directory\n",  # file -> directory
            "gone/x.txt": None,  # the whole directory goes
            "dir/sub/b.txt": "b changed\n",
            "deep/new/tree/n.txt": "n\n",
            "tool.sh": "#!/bin/sh\n",
        },
    )
    ws_path = repo.worktrees_dir / "run1" / "a1"
    os.chmod(ws_path / "tool.sh", 0o755)
    os.symlink("dir/a.txt", ws_path / "link")
    work = commit_workspace(
        create_workspace(repo, base_commit=base, run_id="run1", agent_id="a1"),
        message="exec bit and link",
        write_scope=WriteScope.of(None),
    )
    assert work.commit is not None
    pyrepo = pygit2.Repository(str(root))
    try:
        trees = [pyrepo.revparse_single(c).peel(pygit2.Tree) for c in (base, ours, work.commit)]
        index = pyrepo.merge_trees(trees[0], trees[1], trees[2])
        assert index.conflicts is None
        tree_id, changed = _write_merged_tree(pyrepo, index, trees[1])
        assert tree_id == index.write_tree(pyrepo)
        assert "flip" in changed and "flip/inside.txt" in changed and "link" in changed
        # and the reverse direction: directory -> file, and a merge that empties nothing
        back = pyrepo.merge_trees(trees[2], trees[2], trees[0])
        assert _write_merged_tree(pyrepo, back, trees[2])[0] == back.write_tree(pyrepo)
        same = pyrepo.merge_trees(trees[0], trees[1], trees[0])
        assert _write_merged_tree(pyrepo, same, trees[1]) == (trees[1].id, [])
    finally:
        pyrepo.free()


def test_consecutive_agents_editing_one_file_in_the_same_second(repo: GitRepo) -> None:
    """The second merge finds the file just written by the first (racily clean in the index)."""
    root = repo.root
    base = head(root)
    lines = BASE_FILES["shared.txt"].splitlines(keepends=True)
    top = agent(repo, base, "a1", {"shared.txt": "".join(["TOP\n", *lines[1:]])})
    bottom = agent(repo, base, "a2", {"shared.txt": "".join([*lines[:-1], "BOTTOM\n"])})
    outcomes = Joiner(repo).merge([top, bottom], dry_run=False)
    assert [o.outcome for o in outcomes] == ["merged", "merged"], outcomes
    assert (root / "shared.txt").read_text() == "".join(["TOP\n", *lines[1:-1], "BOTTOM\n"])
    assert git(root, "status", "--porcelain", "-uall") == ""
    assert_fsck(root)


def test_large_merges_check_dirty_work_by_directory(
    repo: GitRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(join_module, "MAX_PATHSPECS", 1)
    root = repo.root
    base = head(root)
    cand = agent(repo, base, "a1", {"src/app.py": "agent\n", "src/extra.py": "e\n"})
    write(root, "src/app.py", "mine\n")
    [out] = Joiner(repo).merge([cand], dry_run=False)
    assert out.outcome == "skipped" and out.reason is not None and "src/app.py" in out.reason
    (root / "src" / "app.py").write_text(BASE_FILES["src/app.py"])
    [out] = Joiner(repo).merge([cand], dry_run=False)
    assert out.outcome == "merged"
    assert git(root, "status", "--porcelain", "-uall") == ""
    assert_fsck(root)


def test_checkout_that_cannot_move_forward_undoes_the_landing(repo: GitRepo) -> None:
    """A change status cannot see (assume-unchanged) makes read-tree refuse: the CAS is undone."""
    root = repo.root
    base = head(root)
    cand = agent(repo, base, "a1", {"src/app.py": "print('agent')\n"})
    git(root, "update-index", "--assume-unchanged", "src/app.py")
    write(root, "src/app.py", "hidden local edit\n")
    assert git(root, "status", "--porcelain", "-uall") == ""

    [out] = Joiner(repo).merge([cand], dry_run=False)

    assert out.outcome == "skipped", out
    assert out.reason is not None and "merge was undone" in out.reason
    assert head(root) == base
    assert (root / "src" / "app.py").read_text() == "hidden local edit\n"
    assert head(root, "refs/heads/fanout/run1/a1") == cand.commit
    assert_fsck(root)


def test_a_name_that_is_not_utf8_lands_byte_for_byte(repo: GitRepo) -> None:
    root = repo.root
    base = head(root)
    odd = os.fsdecode(b"caf\xe9.txt")  # latin-1: a name git takes, but not UTF-8
    first = agent(repo, base, "a1", {"one.txt": "1\n"})
    # (a view's own commit reports such a name and leaves it out: the commit is made here)
    middle = JoinCandidate.model_validate(
        {
            **agent(repo, base, "a2", {"two.txt": "2\n"}).model_dump(),
            "commit": _plumbed_commit(
                root, base, {b"caf\xe9.txt": ("100644", b"latin\n"), b"two.txt": ("100644", b"2\n")}
            ),
        }
    )
    last = agent(repo, base, "a3", {"three.txt": "3\n"})
    joiner = Joiner(repo)
    outcomes = joiner.merge([first, middle, last], dry_run=False)
    assert [o.outcome for o in outcomes] == ["merged"] * 3
    # the report shows the byte it cannot carry; the records and JSON take it
    assert outcomes[1].diffstat.paths == ["caf\\xe9.txt", "two.txt"]
    for outcome in outcomes:
        JoinOutcome.model_validate_json(outcome.model_dump_json())
    names = subprocess.run(
        ["git", "ls-tree", "-z", "--name-only", "HEAD"], cwd=root, capture_output=True, check=True
    ).stdout.split(b"\0")
    assert b"caf\xe9.txt" in names
    assert (root / odd).read_bytes() == b"latin\n"
    assert git(root, "status", "--porcelain", "-uall") == ""
    assert_fsck(root)


def _plumbed_commit(
    root: Path, base: str, entries: Mapping[bytes, tuple[str, bytes] | None]
) -> str:
    """A commit on `base` with `entries` (raw path -> (mode, content), None deletes) set, made
    by git's plumbing: any name and link target git takes, which a checkout may not."""
    env = {**os.environ, "GIT_INDEX_FILE": str(root / ".git" / "plumbed-index")}

    def plumb(*args: str, data: bytes | None = None) -> bytes:
        return subprocess.run(
            ["git", *args], cwd=root, env=env, input=data, capture_output=True, check=True
        ).stdout

    plumb("read-tree", base)
    info = b""
    for path, entry in entries.items():
        if entry is None:
            info += b"0 " + b"0" * 40 + b"\t" + path + b"\0"
            continue
        blob = plumb("hash-object", "-w", "--stdin", data=entry[1]).strip()
        info += entry[0].encode() + b" " + blob + b"\t" + path + b"\0"
    plumb("update-index", "-z", "--index-info", data=info)
    tree = plumb("write-tree").strip().decode()
    os.unlink(env["GIT_INDEX_FILE"])
    ident = ("-c", "user.name=Agent", "-c", "user.email=agent@example.invalid")
    return plumb(*ident, "commit-tree", tree, "-p", base, "-m", "agent").strip().decode()


# a link target longer than the file system takes (PATH_MAX): git writes the files before it
# in path order, then fails on this one
_TOO_LONG_LINK = (b"zz", ("120000", b"t" * 5000))


def test_a_checkout_that_fails_midway_is_put_back(repo: GitRepo) -> None:
    root = repo.root
    base = head(root)
    commit = _plumbed_commit(
        root,
        base,
        {
            b"README.md": None,
            b"a.txt": ("100644", b"agent\n"),
            b"shared.txt/inside": ("100644", b"a file where a file was\n"),
            b"src/new/deep.py": ("100644", b"x = 1\n"),
            **dict([_TOO_LONG_LINK]),
        },
    )
    cand = JoinCandidate(
        agent_id="a1",
        name="agent a1",
        task_summary="task of a1",
        base_commit=base,
        branch="fanout/run1/a1",
        commit=commit,
    )
    write(root, "notes.txt", "the user's own\n")  # untracked, not the agent's
    [out] = Joiner(repo).merge([cand], dry_run=False)
    assert out.outcome == "skipped"
    assert out.reason is not None and "(nothing changed)" in out.reason
    assert head(root) == base
    assert git(root, "status", "--porcelain", "-uall") == "?? notes.txt\n"
    assert (root / "README.md").read_text() == BASE_FILES["README.md"]
    assert (root / "shared.txt").read_text() == BASE_FILES["shared.txt"]
    assert not (root / "a.txt").exists() and not (root / "src" / "new").exists()


def test_putting_back_leaves_what_git_did_not_write(repo: GitRepo) -> None:
    root = repo.root
    base = head(root)
    commit = _plumbed_commit(
        root, base, {b"a.txt": ("100644", b"agent\n"), b"src/app.py": ("100644", b"agent\n")}
    )
    # what the user made meanwhile, where git would have written: theirs, not git's
    write(root, "a.txt", "the user's\n")
    write(root, "src/app.py", "the user's edit\n")
    joiner = Joiner(repo)
    pyrepo = repo.open()
    try:
        clean = joiner._put_back(  # pyright: ignore[reportPrivateUsage]
            pyrepo, pygit2.Oid(hex=base), pygit2.Oid(hex=commit), ["a.txt", "src/app.py"]
        )
    finally:
        pyrepo.free()
    assert not clean
    assert (root / "a.txt").read_text() == "the user's\n"
    assert (root / "src" / "app.py").read_text() == "the user's edit\n"
