"""Join-step throughput: merge many agents' branches into a large repository's checkout."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import anyio
import pygit2

from benchmarks.common import build_repo, scratch, self_cpu_s
from orchestration.config import Settings
from orchestration.join import JoinCandidate, Joiner
from orchestration.verify import Verifier
from orchestration.workspace import GitRepo, Identity, run_git

IDENTITY = Identity("fanout bench", "bench@localhost")
FILES_PER_DIR = 100
FILES_PER_AGENT = 3


def _text_file(n: int) -> tuple[str, str]:
    """The `n`th file of the merge repository: 21 lines of text, 100 to a directory."""
    body = f"file {n}\n" + "".join(f"line {k} of file {n}\n" for k in range(20))
    return f"d{n // FILES_PER_DIR:03d}/f{n:05d}.txt", body


def _agent_commits(root: Path, base: str, agents: int) -> list[JoinCandidate]:
    """One branch per agent, each changing 3 files of its own directory (plumbing, in memory)."""
    pyrepo = pygit2.Repository(str(root))
    try:
        base_commit = pyrepo[base].peel(pygit2.Commit)
        signature = IDENTITY.signature()
        candidates: list[JoinCandidate] = []
        for a in range(agents):
            index = pygit2.Index()
            index.read_tree(base_commit.tree)
            for k in range(FILES_PER_AGENT):
                n = a * FILES_PER_DIR + k
                path = f"d{a:03d}/f{n:05d}.txt"
                old = pyrepo[index[path].id].peel(pygit2.Blob).data.decode()
                blob = pyrepo.create_blob(old.replace("line 3 ", f"line 3 (agent {a}) ", 1))
                index.add(pygit2.IndexEntry(path, blob, pygit2.enums.FileMode.BLOB))
            tree = index.write_tree(pyrepo)
            branch = f"fanout/bench/agent{a:02d}"
            commit = pyrepo.create_commit(
                f"refs/heads/{branch}", signature, signature, "agent work", tree, [base_commit.id]
            )
            candidates.append(
                JoinCandidate(
                    agent_id=f"agent{a:02d}",
                    name=f"agent {a}",
                    task_summary=f"edit directory d{a:03d}",
                    model_summary="changed three files",
                    base_commit=base,
                    branch=branch,
                    commit=str(commit),
                )
            )
        return candidates
    finally:
        pyrepo.free()


def _checkout_and_remove(root: Path, tree_id: str, dest: Path) -> None:
    pyrepo = pygit2.Repository(str(root))
    try:
        dest.mkdir()
        pyrepo.checkout_tree(  # pyright: ignore[reportUnknownMemberType]
            pyrepo[pygit2.Oid(hex=tree_id)].peel(pygit2.Tree),
            strategy=pygit2.enums.CheckoutStrategy.FORCE
            | pygit2.enums.CheckoutStrategy.DONT_UPDATE_INDEX,
            directory=str(dest),
        )
    finally:
        pyrepo.free()
    shutil.rmtree(dest)


def run(quick: bool) -> dict[str, float | int]:
    """Time `Joiner.merge` (dry and real) of many disjoint agents; figures per agent."""
    files = 1_000 if quick else 10_000
    agents = 8 if quick else 32
    with scratch("fanout-bench-merge-") as tmp:
        root = Path(tmp) / "repo"
        root.mkdir()
        t0 = time.perf_counter()
        base = build_repo(root, files, file=_text_file)
        candidates = _agent_commits(root, base, agents)
        setup_s = time.perf_counter() - t0

        repo = GitRepo(root)
        joiner = Joiner(repo, identity=IDENTITY)
        t1 = time.perf_counter()
        dry = joiner.merge(candidates, dry_run=True)
        dry_s = time.perf_counter() - t1
        # what `merge_results` with a verification command adds: that dry run (the batch's
        # tree) and one run of the command on the server's scratch checkout, moved there from
        # the tree it held (the head, as an earlier merge left it); the first verification of a
        # server checks out the whole tree (`verify_first`)
        verifier = Verifier(repo, Settings(repo=root), "true", 60.0, owner="bench")
        final_tree = joiner.preview_trees[-1]
        head_tree = joiner.preview_head_tree
        if final_tree is None or head_tree is None:
            raise RuntimeError("the dry run left no tree to verify")
        t_first = time.perf_counter()
        first = anyio.run(verifier.verify, head_tree)
        first_s = time.perf_counter() - t_first
        t_verify = time.perf_counter()
        verdict = anyio.run(verifier.verify, final_tree)
        verify_s = time.perf_counter() - t_verify
        if not (verdict.passed and first.passed):
            raise RuntimeError(f"verification with `true` failed: {verdict.describe()}")
        # the floor: writing the same tree's files and removing them, nothing else
        t_floor = time.perf_counter()
        _checkout_and_remove(root, final_tree, Path(tmp) / "floor")
        floor_s = time.perf_counter() - t_floor
        cpu0 = self_cpu_s()
        t2 = time.perf_counter()
        outcomes = joiner.merge(candidates, dry_run=False)
        merge_s = time.perf_counter() - t2
        merge_cpu_s = self_cpu_s() - cpu0

        merged = sum(o.outcome == "merged" for o in outcomes)
        if merged != agents or any(o.outcome != "clean" for o in dry):
            raise RuntimeError(f"benchmark merge failed: {[o.outcome for o in outcomes]}")
        status = run_git(root, "status", "--porcelain").stdout
        if status:
            raise RuntimeError(f"the checkout is not clean after the merge:\n{status}")

    per_agent_ms = merge_s * 1000 / agents
    cpu_per_agent_ms = merge_cpu_s * 1000 / agents
    dry_per_agent_ms = dry_s * 1000 / agents
    verify_per_agent_ms = (dry_s + verify_s) * 1000 / agents
    rows = [
        ("files in repository", f"{files}"),
        ("agents (3 files each)", f"{agents}"),
        ("setup", f"{setup_s:.2f} s"),
        ("dry run total", f"{dry_s * 1000:.0f} ms"),
        ("dry run per agent", f"{dry_per_agent_ms:.1f} ms"),
        ("merge total", f"{merge_s * 1000:.0f} ms"),
        ("merge per agent", f"{per_agent_ms:.1f} ms  (target <= 100 ms)"),
        ("merge CPU per agent", f"{cpu_per_agent_ms:.1f} ms  (this process + git children)"),
        (
            "verification (`true`)",
            f"{verify_s * 1000:.0f} ms  (scratch checkout moved to the merged tree, sandbox, run)",
        ),
        (
            "  a server's first",
            f"{first_s * 1000:.0f} ms  (the whole tree checked out; floor: writing and "
            f"removing the same files {floor_s * 1000:.0f} ms)",
        ),
        (
            "verify per agent",
            f"{verify_per_agent_ms:.1f} ms  (dry run + verification, beyond the merge; "
            "target <= 60 ms)",
        ),
        ("load average (1 min)", f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    return {
        "merge_ms_per_agent": round(per_agent_ms, 2),
        "merge_dry_run_ms_per_agent": round(dry_per_agent_ms, 2),
        "verify_ms_per_agent": round(verify_per_agent_ms, 2),
        "verify_first_ms": round(first_s * 1000, 1),
        "merge_cpu_ms_per_agent": round(cpu_per_agent_ms, 2),
        "merge_agents": agents,
        "merge_repo_files": files,
    }
