"""Spawn latency: 16 agents on a 10,000-file repository, from `spawn` until `get_status`
shows every agent running, against 16 x `git worktree add` by hand (one after the other, the
same repository, the same run); then 1 and 64 agents on a 100,000-file repository.

Figures: `spawn_s_16` (seconds, the median of the rounds), `spawn_over_git_16` (the median of the
per-round ratios; target <= 1.2), and the parts beside them. On the large repository:
`spawn_s_1_100k`, `spawn_s_64_100k` and `spawn_64_over_1_100k` (target <= 2), measured once the
run's base is checked out (`spawn_cold_s_1_100k` is the first run, which checks it out), with the
machine's floor beside them (`views_floor_s_64`: the inodes and mounts of 64 views, made bare);
each the median over `LARGE_ROUNDS` rounds (1 agent, 64 agents, the floor), a ratio the
median of the rounds' ratios;
`disk_mb_per_agent` (target <= 1: what one more agent that changed one file adds under `.git`,
its work committed); and the worktree fallback's figures. The agents' model blocks until the
measurement is over (`FunctionModel`), so no turn competes with the workspaces being created.
The two phases of the first part alternate which goes first (creating files gets slower as the
disk fills), over four rounds. `--quick`: 1,000 and 10,000 files, one round.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import anyio

from benchmarks.common import (
    bench_settings,
    build_repo,
    drive,
    scratch,
    table,
    tasks,
)
from orchestration.contracts import SpawnRequest
from orchestration.model import ModelRequest, ModelResponse, ToolUseBlock, Usage
from orchestration.orchestrator import Orchestrator
from orchestration.providers.function import FunctionModel
from orchestration.workspace import (
    GitRepo,
    commit_workspace,
    create_workspace,
    run_git,
    view_support,
)
from orchestration.workspace.overlay import mount_overlay, unmount
from toolbus.resources import WriteScope

AGENTS = 16
LARGE_ROUNDS = 3
"""Rounds of 1 and then 64 agents on the large repository (each a single spawn, so one slow
moment of the disk would decide the ratio): its figures are the medians."""
# 160,000 files per phase: on a slow disk (a heavily churned one) a phase can take minutes, by
# hand as by the product; allow far more
PHASE_TIMEOUT_S = 1800.0


def _by_hand(repo: Path, base: str, round_no: int, count: int = AGENTS) -> float:
    """`count` x `git worktree add -b` one after the other. They are left in place: deleting
    thousands of files just before the next round creates as many would slow that round down
    (ext4 skips recently freed inodes when it allocates), so nothing is deleted until the end."""
    root = repo.parent / f"by-hand-{round_no}"
    started = time.perf_counter()
    for i in range(count):
        run_git(
            repo,
            "worktree",
            "add",
            "--quiet",
            "-b",
            f"hand/{round_no}/{i}",
            str(root / str(i)),
            base,
        )
    return time.perf_counter() - started


def _gated_model(gate: anyio.Event) -> FunctionModel:
    async def reply(request: ModelRequest) -> ModelResponse:
        await gate.wait()
        return ModelResponse(
            content=[ToolUseBlock(id="toolu_finish", name="finish", input={"summary": "done"})],
            stop_reason="tool_use",
            usage=Usage(input_tokens=10, output_tokens=5),
            model="bench",
        )

    return FunctionModel(reply)


async def _orchestrated(repo: Path, round_no: int, count: int = AGENTS) -> tuple[float, float, int]:
    """(until all running, spawn() alone, failed agents) for one run of `count`. Each round's
    agents write scopes of their own: the previous round's agents are not merged, so they still
    hold their scopes, and agents on the same scopes would wait for them (as designed)."""
    gate = anyio.Event()
    model = _gated_model(gate)
    async with Orchestrator(bench_settings(repo, count), lambda _name: model) as orch:
        await orch.status()  # the repository is open, as in a running server
        timing = await drive(
            orch,
            [SpawnRequest(tasks=tasks(count, start=100 * round_no), max_concurrency=count)],
            until_running=True,
            timeout_s=PHASE_TIMEOUT_S,
        )
        gate.set()
        final = await drive_rest(orch, timing.spawned[0].run_id)
    return timing.all_running_s, timing.spawn_s, final


async def drive_rest(orch: Orchestrator, run_id: str) -> int:
    """Wait for the run's agents to end; the number that did not succeed."""
    cursor: int | None = None
    with anyio.fail_after(PHASE_TIMEOUT_S):
        while True:
            status = await orch.status(run_id=run_id, since=cursor, wait_s=10)
            cursor = status.cursor
            agents = status.runs[0].agents
            if not any(a.status.active for a in agents):
                return sum(1 for a in agents if a.status.value != "succeeded")


def _blocks(root: Path) -> int:
    """Bytes of disk blocks under `root`: mounted views not entered, a hard-linked file once."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not os.path.ismount(os.path.join(dirpath, d))]
        for name in (*filenames, *dirnames):
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def _disk_one_change(repo: Path, base: str, run_id: str) -> float:
    """MB that one more agent adds under `.git` (its workspace, its branch's objects) when it
    changes one file and its work is committed."""
    git_repo = GitRepo(repo)
    before = _blocks(git_repo.git_dir)
    ws = create_workspace(git_repo, base_commit=base, run_id=run_id, agent_id="one-change")
    target = ws.path / "mod" / "changed_by_agent.py"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("value = 1\n", encoding="utf-8")
    done = commit_workspace(ws, message="one change", write_scope=WriteScope.of(None))
    assert done.commit is not None
    return (_blocks(git_repo.git_dir) - before) / 1e6


def _inodes(root: Path) -> int:
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not os.path.ismount(os.path.join(dirpath, d))]
        count += len(dirnames) + len(filenames)
    return count


def _view_floor_s(repo: Path, base: str, agents: int, round_no: int) -> tuple[float, int]:
    """The machine's floor for `agents` views, in this run: one view's inodes counted, then
    as many empty files created and as many trivial overlays mounted and unmounted, with
    nothing else (no git, no state, no orchestration). Returns (seconds, inodes per view)."""
    git_repo = GitRepo(repo)
    before = _inodes(git_repo.git_dir)
    create_workspace(git_repo, base_commit=base, run_id=f"floor{round_no}", agent_id="probe")
    per_view = _inodes(git_repo.git_dir) - before
    scratch_dir = repo.parent / f"floor{round_no}"
    lower = scratch_dir / "lower"
    lower.mkdir(parents=True)
    started = time.perf_counter()
    for i in range(agents):
        mine = scratch_dir / str(i)
        mine.mkdir()
        for j in range(per_view - 3):
            (mine / str(j)).touch()
        upper, work, view = mine / "u", mine / "w", mine / "v"
        for d in (upper, work, view):
            d.mkdir()
        if view_support(git_repo).kind != "worktree":
            mount_overlay([lower], upper, work, view)
    elapsed = time.perf_counter() - started
    for i in range(agents):
        unmount(scratch_dir / str(i) / "v")
    return elapsed, per_view


def _large(quick: bool) -> tuple[dict[str, float | int], list[tuple[str, object, str]]]:
    """Spawn to all running for 1 and 64 agents on a large repository, each kind of workspace."""
    files = 10_000 if quick else 100_000
    few = 2 if quick else 4
    tag = "10k (quick)" if quick else "100k"
    with scratch("bench-spawn-large-") as tmp:
        repo = Path(tmp) / "repo"
        base = build_repo(repo, files)
        run_git(repo, "status", "--porcelain")
        kind = view_support(GitRepo(repo))
        hand_1 = _by_hand(repo, base, 90, count=1)
        cold, _, bad = anyio.run(_orchestrated, repo, 1, 1)  # checks the base out once
        ones: list[float] = []
        manys: list[float] = []
        floors: list[float] = []
        per_view = 0
        for n in range(1 if quick else LARGE_ROUNDS):
            one, _, bad_1 = anyio.run(_orchestrated, repo, 10 + 2 * n, 1)
            many, _, bad_64 = anyio.run(_orchestrated, repo, 11 + 2 * n, 64)
            floor_64, per_view = _view_floor_s(repo, base, 64, n)
            ones.append(one)
            manys.append(many)
            floors.append(floor_64)
            bad += bad_1 + bad_64
        disk = _disk_one_change(repo, base, "disk-view")
        os.environ["FANOUT_WORKSPACES"] = "worktree"
        try:
            wt_1, _, bad_w1 = anyio.run(_orchestrated, repo, 4, 1)
            wt_few, _, bad_wf = anyio.run(_orchestrated, repo, 5, few)
            wt_disk = _disk_one_change(repo, base, "disk-worktree")
        finally:
            os.environ.pop("FANOUT_WORKSPACES", None)
    ratios = [m / o for m, o in zip(manys, ones, strict=True)]
    floor_ratios = [(o + f) / o for o, f in zip(ones, floors, strict=True)]
    figures: dict[str, float | int] = {
        "spawn_s_1_100k": round(statistics.median(ones), 3),
        "spawn_s_64_100k": round(statistics.median(manys), 3),
        "spawn_64_over_1_100k": round(statistics.median(ratios), 3),
        "views_floor_s_64": round(statistics.median(floors), 3),
        "floor_64_over_1_100k": round(statistics.median(floor_ratios), 3),
        "disk_mb_per_agent": round(disk, 3),
        "spawn_cold_s_1_100k": round(cold, 3),
        "worktree_spawn_s_1_100k": round(wt_1, 3),
        f"worktree_spawn_s_{few}_100k": round(wt_few, 3),
        "worktree_disk_mb_per_agent": round(wt_disk, 3),
        "spawn_failed_100k": bad + bad_w1 + bad_wf,
    }

    def each(values: list[float]) -> str:
        return "; per round: " + ", ".join(f"{v:.2f}" for v in values) if len(values) > 1 else ""

    rows: list[tuple[str, object, str]] = [
        (
            "spawn_s_1_100k",
            figures["spawn_s_1_100k"],
            f"{tag} files, 1 agent: {kind.note}{each(ones)}",
        ),
        ("spawn_s_64_100k", figures["spawn_s_64_100k"], f"64 agents, the same base{each(manys)}"),
        ("spawn_64_over_1_100k", figures["spawn_64_over_1_100k"], f"target <= 2{each(ratios)}"),
        (
            "views_floor_s_64",
            figures["views_floor_s_64"],
            f"floor: 64 x ({per_view} inodes a view makes + a mount), nothing else{each(floors)}",
        ),
        (
            "floor_64_over_1_100k",
            figures["floor_64_over_1_100k"],
            f"the ratio's floor on this disk: (1 agent + that floor) / 1 agent{each(floor_ratios)}",
        ),
        (
            "disk_mb_per_agent",
            figures["disk_mb_per_agent"],
            "target <= 1: an agent that changed one file, its work committed",
        ),
        (
            "spawn_cold_s_1_100k",
            figures["spawn_cold_s_1_100k"],
            f"the first run on a commit checks its base out once; git worktree add by hand: "
            f"{hand_1:.2f} s",
        ),
        ("worktree_spawn_s_1_100k", figures["worktree_spawn_s_1_100k"], "the worktree fallback"),
        (
            f"worktree_spawn_s_{few}_100k",
            figures[f"worktree_spawn_s_{few}_100k"],
            f"the fallback, {few} agents (64 full checkouts would not fit this disk)",
        ),
        ("worktree_disk_mb_per_agent", figures["worktree_disk_mb_per_agent"], "the fallback"),
        ("spawn_failed_100k", figures["spawn_failed_100k"], "agents not succeeded"),
    ]
    return figures, rows


def run(quick: bool) -> dict[str, float | int]:
    large, large_rows = _large(quick)
    files, rounds = (1_000, 1) if quick else (10_000, 4)
    note = f"{files} files, {AGENTS} agents" + (" (quick)" if quick else "")
    hand: list[float] = []
    orch: list[float] = []
    spawn_only: list[float] = []
    failed = 0
    with scratch("bench-spawn-") as tmp:
        repo = Path(tmp) / "repo"
        base = build_repo(repo, files)
        run_git(repo, "status", "--porcelain")  # warm the index and the page cache
        _by_hand(repo, base, 0, count=1)  # warm-up (git, the object store), not counted
        for round_no in range(1, rounds + 1):
            # the two alternate which goes first, so neither always meets a fuller disk
            if round_no % 2:
                hand.append(_by_hand(repo, base, round_no))
            all_running, spawn_s, bad = anyio.run(_orchestrated, repo, round_no)
            if not round_no % 2:
                hand.append(_by_hand(repo, base, round_no))
            orch.append(all_running)
            spawn_only.append(spawn_s)
            failed += bad
    ratios = [o / h for o, h in zip(orch, hand, strict=True)]
    figures: dict[str, float | int] = {
        "spawn_s_16": round(statistics.median(orch), 3),
        "spawn_over_git_16": round(statistics.median(ratios), 3),
        "spawn_git_by_hand_s_16": round(statistics.median(hand), 3),
        "spawn_call_s_16": round(statistics.median(spawn_only), 3),
        "spawn_failed_16": failed,
    }
    table(
        [
            (
                "spawn_s_16",
                figures["spawn_s_16"],
                f"{note}: spawn -> all running, median of {rounds}",
            ),
            (
                "spawn_over_git_16",
                figures["spawn_over_git_16"],
                "target <= 1.2; per round: " + ", ".join(f"{r:.2f}" for r in ratios),
            ),
            (
                "spawn_git_by_hand_s_16",
                figures["spawn_git_by_hand_s_16"],
                "16 x git worktree add, sequential; per round: "
                + ", ".join(f"{h:.2f}" for h in hand),
            ),
            (
                "spawn_call_s_16",
                figures["spawn_call_s_16"],
                "spawn() alone (returns before the worktrees)",
            ),
            ("spawn_failed_16", failed, f"agents not succeeded, over {rounds} round(s)"),
            *large_rows,
        ]
    )
    return figures | large
