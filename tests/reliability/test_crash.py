"""Crash recovery: a real server process killed with SIGKILL at chosen points, then reopened.

A child (`server_proc.py crash`) runs an `Orchestrator` with a scripted model on a fresh repo and
marks the point it reached; the test kills its whole process group after a seeded random delay:
right after spawn, mid-turn (agents blocked inside a model call after a write), mid-write (during
a 4 MB write through the bus) or mid-merge (during `merge_results` of many agents, after a random
number of them landed). Then, from outside: `git fsck --strict`, `PRAGMA integrity_check`, the
canonical history, the agents' branches, the dead server's leases (not re-granted before their
expiry + lock-delay, re-granted after). A fresh process (`server_proc.py recover`) reopens the
repository: agents that were running must be `interrupted` with their work committed, finished
ones mergeable, and a rerun, a new spawn and a merge must work.

Test-only timing: lease TTL 1 s, lock-delay 0.3 s, server heartbeat 0.2 s, staleness 0.8 s (the
module constants `SERVER_HEARTBEAT_S`/`SERVER_STALE_S` are set in the child processes).
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestration.state import StateStore
from orchestration.workspace.overlay import enter_private_mounts, probe_overlay
from tests.orchestration.scripts import git, make_repo
from tests.reliability.conftest import FULL, Ledger
from tests.reliability.procs import (
    Child,
    blob,
    fanout_refs,
    fsck,
    integrity,
    is_ancestor,
    merge_chain_problems,
    tree_paths,
    wait_for,
)
from tests.reliability.server_proc import (
    CrashConfig,
    RecoverConfig,
    RecoverReport,
    Scenario,
    Timing,
)
from toolbus.leases import Lease, LeaseRequest, LeaseStore

SCENARIOS: tuple[Scenario, ...] = (
    "after_spawn",
    "mid_turn",
    "mid_write",
    "mid_merge",
    "mid_verify",
)
ACTIVE = {"queued", "waiting", "running"}

G_STORE = "G5a crash: git objects and stores intact (fsck --strict, integrity_check)"
G_HEAD = "G5b crash: canonical branch at old head or whole merges only"
G_CHECKOUT = "G5c crash: user's checkout matches the canonical head"
G_WORK = "G5d crash: no agent's committed work lost, no torn file committed"
G_STATUS = "G5e crash: running agents become interrupted, finished ones keep their status"
G_LEASE = "G5f crash: dead server's leases held until TTL + lock-delay, then re-granted"
G_AFTER = "G5g crash: after recovery, merge, rerun and a new run work"
G_VERIFY = "G5j crash: a verification cut short applied nothing and left nothing behind"
G_VIEWS = "G5k crash: views' layers kept for recovery, gone once merged; no view without a base"


@dataclass(frozen=True)
class KillCase:
    scenario: Scenario
    seed: int
    probe: bool  # take the dead server's leases from outside once they lapse
    group: bool = True  # kill the process group (git children too), else the server alone
    workspaces: str = ""  # "worktree": git worktrees; "": copy-on-write views where possible

    @property
    def id(self) -> str:
        kill = "group" if self.group else "proc"
        layout = f"-{self.workspaces}" if self.workspaces else ""
        return f"{self.scenario}-{self.seed}-{kill}{'-probe' if self.probe else ''}{layout}"


def _cases() -> list[KillCase]:
    if not FULL:
        return [
            KillCase("after_spawn", 1, False),
            KillCase("mid_turn", 2, True),
            KillCase("mid_write", 3, True),
            # the server alone: a git command it started finishes (a group kill can leave a stale
            # .git/HEAD.lock: test_kill_inside_a_git_command pins that case deterministically)
            KillCase("mid_merge", 4, False, group=False),
            KillCase("mid_verify", 5, False),
            KillCase("mid_write", 6, False, workspaces="worktree"),
            KillCase("mid_turn", 7, False, workspaces="fuse-overlayfs"),
        ]
    rng = random.Random(20240611)
    return [
        KillCase(
            rng.choice(SCENARIOS),
            100 + i,
            i % 2 == 0,
            group=i % 4 < 2,
            workspaces="worktree" if i % 3 == 0 else "",
        )
        for i in range(24)
    ]


CASES = _cases()


def _views_work(workspaces: str, scratch: Path) -> bool:
    """Whether a server with this FANOUT_WORKSPACES makes copy-on-write views here."""
    if workspaces == "worktree" or enter_private_mounts() is not None:
        return False
    probe = scratch / "probe"
    probe.mkdir(exist_ok=True)
    driver = "fuse-overlayfs" if workspaces == "fuse-overlayfs" else None
    return probe_overlay(probe, driver).kind != "worktree"


def _fuse_daemons(repo: Path) -> list[int]:
    """The fuse-overlayfs processes serving a view of `repo`."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"fuse-overlayfs") and str(repo).encode() in b" ".join(argv):
            found.append(int(entry.name))
    return found


def _kill_at_point(case: KillCase, child: Child, markers: Path, agents: int) -> str:
    """Wait for the scenario's point, sleep a seeded random delay, SIGKILL; describe the point."""
    rng = random.Random(case.seed)
    point = ""
    if case.scenario == "after_spawn":
        wait_for(child, (markers / "spawned").exists)
        delay = rng.uniform(0.0, 0.5)
        point = f"{delay:.3f} s after spawn returned"
    elif case.scenario == "mid_turn":
        slow = [f"w{i:02d}" for i in range(3, agents + 1)]
        wait_for(
            child,
            lambda: (
                (markers / "quick-done").exists()
                and all((markers / f"blocked-{k}").exists() for k in slow)
            ),
        )
        delay = rng.uniform(0.0, 0.1)
        point = f"{delay:.3f} s into a model call of {len(slow)} agents"
    elif case.scenario == "mid_write":
        wait_for(child, lambda: any(markers.glob("writing-*")))
        delay = rng.uniform(0.0, 0.08)
        point = f"{delay:.3f} s after a 4 MB write was handed to the bus"
    elif case.scenario == "mid_verify":
        wait_for(child, (markers / "verifying").exists, timeout_s=60)
        delay = rng.uniform(0.0, 0.2)
        point = f"{delay:.3f} s into the verification command"
    else:
        k = rng.randint(0, agents - 1)
        name = "merging" if k == 0 else f"merged-{k}"
        wait_for(
            child,
            lambda: (markers / name).exists() or (markers / "merge-done").exists(),
            timeout_s=120,
        )
        delay = rng.uniform(0.0, 0.04)
        point = f"{delay:.3f} s after {k} of {agents} agents merged"
    time.sleep(delay)
    child.kill(group=case.group)
    return point


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_sigkill_then_a_fresh_process_recovers(
    case: KillCase, tmp_path: Path, ledger: Ledger
) -> None:
    repo = make_repo(tmp_path / "repo")
    head0 = git(repo, "rev-parse", "HEAD").strip()
    state_dir = repo / ".git" / "fanout"
    markers = tmp_path / "markers"
    timing = Timing()
    agents = 12 if case.scenario == "mid_merge" else 4
    config = CrashConfig(
        repo=str(repo),
        markers=str(markers),
        scenario=case.scenario,
        agents=agents,
        timing=timing,
        workspaces=case.workspaces,
    )
    child = Child("crash", config, tmp_path / "logs")
    point = _kill_at_point(case, child, markers, agents)
    killed_at = time.time()
    label = f"{case.id} ({point})"

    # --- from outside, right after the kill -------------------------------------------------
    head_killed = _check_store_and_history(ledger, label, "after kill", repo, head0)
    # right after the kill the checkout may sit at the previous canonical head (a merge cut
    # between its ref update and the checkout update; the next merge brings it forward, checked
    # after recovery below); anything else is a failure
    status_killed = git(repo, "status", "--porcelain", "--untracked-files=all")
    at_head_or_earlier = status_killed == "" or _at_earlier_head(repo, head0, head_killed)
    ledger.record(
        G_CHECKOUT,
        f"{label}: checkout after kill at the head or the previous head",
        at_head_or_earlier,
        status_killed[:300],
    )
    if case.scenario == "mid_verify":
        ledger.record(
            G_VERIFY,
            f"{label}: the branch did not move",
            head_killed == head0,
            f"head {head_killed[:12]}, was {head0[:12]}",
        )
        scratch_at_kill = state_dir / "verify"
        ledger.record(
            G_VERIFY,
            f"{label}: the kill left a scratch checkout (what recovery must remove)",
            scratch_at_kill.is_dir() and any(scratch_at_kill.iterdir()),
            "no scratch checkout under verify/ at the kill",
        )
    views_used = _views_work(case.workspaces, tmp_path)
    if case.workspaces == "fuse-overlayfs" and views_used:
        # the daemons serving the dead server's views end with it (their shell sees its pipe
        # close)
        deadline = time.time() + 5
        while _fuse_daemons(repo) and time.time() < deadline:
            time.sleep(0.05)
        ledger.record(
            G_VIEWS,
            f"{label}: no fuse-overlayfs daemon outlives its server",
            not _fuse_daemons(repo),
            f"still running: {_fuse_daemons(repo)}",
        )
    if views_used:
        layers_at_kill = sorted(state_dir.glob("layers/*/*"))
        ledger.record(
            G_VIEWS,
            f"{label}: the agents worked in copy-on-write views",
            bool(layers_at_kill) or case.scenario == "after_spawn",
            "no layers under layers/ at the kill",
        )
        if case.workspaces == "fuse-overlayfs":
            drivers = {(p / "driver").read_text().strip() for p in layers_at_kill}
            ledger.record(
                G_VIEWS,
                f"{label}: the views were fuse-overlayfs's",
                drivers <= {"fuse-overlayfs"},
                f"drivers: {drivers}",
            )
    refs_killed = fanout_refs(repo)
    store = StateStore(state_dir)
    try:
        at_kill = {a.agent_id: a for a in store.all_agents()}
    finally:
        store.close()
    leases = LeaseStore(state_dir, ttl_s=timing.lease_ttl_s, lock_delay_s=timing.lease_lock_delay_s)
    try:
        held = leases.table()
        if case.probe:
            _probe_leases(leases, held, timing, label, ledger)
    finally:
        leases.close()

    # --- a fresh process, once the dead server is stale -------------------------------------
    time.sleep(max(0.0, killed_at + timing.stale_s + 0.1 - time.time()))
    recover = Child("recover", RecoverConfig(repo=str(repo), timing=timing), tmp_path / "logs")
    code = recover.wait(180)
    assert code == 0, recover.stderr()
    report = RecoverReport.model_validate_json(recover.stdout())
    recovered = {a.agent_id: a for a in report.recovered}
    merges = {m.agent_id: m for m in report.merges}

    # statuses
    for agent_id, before in at_kill.items():
        after = recovered[agent_id]
        want = "interrupted" if before.status.value in ACTIVE else before.status.value
        ledger.record(
            G_STATUS,
            f"{label}: {agent_id} {before.status.value} at kill",
            after.status == want,
            f"recovered as {after.status} ({after.status_reason}), expected {want}",
        )

    # work: every branch keeps its commits; every write that returned is in a commit; no torn
    # or temporary file in any commit
    refs_now = fanout_refs(repo)
    for ref, sha in refs_killed.items():
        now = refs_now.get(ref)
        ledger.record(
            G_WORK,
            f"{label}: {ref} kept",
            now is not None and is_ancestor(repo, sha, now),
            f"was {sha[:12]}, now {now}",
        )
    for agent_id, before in at_kill.items():
        key = before.name
        after = recovered[agent_id]
        # the agent's branch holds its work (an agent interrupted by a crash has no result, so
        # its commit is read from its branch)
        branch_head = refs_now.get(f"refs/heads/{after.branch}") if after.branch else None
        commit = after.commit or branch_head
        if (markers / f"wrote-{key}").exists():
            found = commit is not None and blob(repo, commit, f"{key}/a.txt") is not None
            ledger.record(
                G_WORK,
                f"{label}: {agent_id}'s finished write committed",
                found,
                f"{key}/a.txt not in the agent's commit {commit} ({after.status})",
            )
        if commit is not None:
            paths = tree_paths(repo, commit)
            odd = [p for p in paths if ".fanout-" in p or p.endswith(".tmp")]
            ledger.record(
                G_WORK, f"{label}: {agent_id} commit holds no temp file", not odd, f"{odd}"
            )
            big = f"{key}/big.txt"
            if big in paths:
                size = len(git(repo, "cat-file", "blob", f"{commit}:{big}"))
                ledger.record(
                    G_WORK,
                    f"{label}: {agent_id} big write whole",
                    size == config.write_bytes,
                    f"{big} committed with {size} of {config.write_bytes} bytes",
                )

    # leases: finished agents of the dead server stay mergeable; nothing of merged agents held
    for agent_id in at_kill:
        after = recovered[agent_id]
        if after.status != "succeeded":
            continue
        merge = merges.get(agent_id)
        ok = merge is not None and merge.outcome == "merged"
        ledger.record(
            G_AFTER,
            f"{label}: {agent_id} (succeeded before the crash) merges after recovery",
            ok,
            f"lease_lost={after.lease_lost}; merge: {merge}",
        )
    merged_ids = {m.agent_id for m in report.merges if m.outcome == "merged"}
    lingering = [entry for entry in report.leases_left if entry.split(":")[0] in merged_ids]
    ledger.record(G_LEASE, f"{label}: merged agents hold no lease", not lingering, f"{lingering}")

    # reruns and a new run
    for rerun in report.reruns:
        merge = next((m for m in report.rerun_merges if m.agent_id == rerun.agent_id), None)
        ok = rerun.status == "succeeded" and merge is not None and merge.outcome == "merged"
        ledger.record(G_AFTER, f"{label}: rerun {rerun.agent_id}", ok, f"{rerun}; {merge}")
    fresh_ok = (
        bool(report.fresh)
        and all(m.outcome == "merged" for m in report.fresh_merges)
        and len(report.fresh_merges) == len(report.fresh)
    )
    ledger.record(
        G_AFTER,
        f"{label}: new spawn + merge",
        fresh_ok,
        f"{[(a.name, a.status) for a in report.fresh]}; {report.fresh_merges}",
    )

    # --- from outside, after recovery ------------------------------------------------------
    if case.scenario == "mid_verify":
        scratch = state_dir / "verify"
        left = sorted(p.name for p in scratch.iterdir()) if scratch.is_dir() else []
        ledger.record(
            G_VERIFY,
            f"{label}: the dead server's scratch checkout is gone",
            not left,
            f"left under verify/: {left}",
        )
    landed = merged_ids | {m.agent_id for m in (*report.rerun_merges, *report.fresh_merges)}
    left_layers = {p.name: p for p in state_dir.glob("layers/*/*")}
    ledger.record(
        G_VIEWS,
        f"{label}: merged agents' layers removed",
        not (set(left_layers) & landed),
        f"left: {sorted(set(left_layers) & landed)}",
    )
    orphans = [
        name
        for name, layers in left_layers.items()
        # (`lower`: the base's commit, then the view's record)
        if not (state_dir / "bases" / (layers / "lower").read_text()[:40] / "tree").is_dir()
    ]
    ledger.record(G_VIEWS, f"{label}: every view left has its base", not orphans, f"{orphans}")
    _check_store_and_history(ledger, label, "after recovery", repo, head0)
    status_now = git(repo, "status", "--porcelain", "--untracked-files=all")
    ledger.record(
        G_CHECKOUT, f"{label}: git status after recovery", status_now == "", status_now[:300]
    )

    failures = [
        (g, f)
        for g in (G_STORE, G_HEAD, G_CHECKOUT, G_WORK, G_STATUS, G_LEASE, G_AFTER, G_VERIFY)
        for f in ledger.failures(g)
        if f.startswith(case.id)
    ]
    known = _known_defects(repo)
    unknown = [f for g, f in failures if not any(k.covers(g, f) for k in known)]
    detail = json.dumps(report.model_dump())[:3000]
    assert not unknown, "\n".join(unknown) + "\n" + detail
    if failures:
        # Failures that match a pinned defect's signature exactly (the kill landed inside a git
        # command or between the ref update and the checkout update): recorded in the ledger as
        # failures, reported here as the known defect; test_kill_inside_a_git_command pins each
        # deterministically.
        pytest.xfail("known defect(s): " + "; ".join(k.name for k in known))


@dataclass(frozen=True)
class KnownDefect:
    name: str
    guarantee: str
    needle: str

    def covers(self, guarantee: str, failure: str) -> bool:
        return guarantee == self.guarantee and self.needle in failure


def _check_store_and_history(ledger: Ledger, label: str, when: str, repo: Path, head0: str) -> str:
    """Record that git's objects and both databases are whole and that the canonical history
    is a chain of merges on `head0`; returns the head."""
    fsck_ok, fsck_text = fsck(repo)
    ledger.record(G_STORE, f"{label}: fsck {when}", fsck_ok, fsck_text)
    for db in ("state.db", "leases.db"):
        verdict = integrity(repo / ".git" / "fanout" / db)
        ledger.record(G_STORE, f"{label}: {db} {when}", verdict == "ok", verdict)
    head = git(repo, "rev-parse", "HEAD").strip()
    problems, _ = merge_chain_problems(repo, head0, head)
    ledger.record(G_HEAD, f"{label}: history {when}", not problems, "; ".join(problems))
    return head


def _at_earlier_head(repo: Path, head0: str, head: str) -> bool:
    """Index and files sit exactly at a canonical head older than `head`."""
    if subprocess.run(["git", "diff", "--quiet"], cwd=repo, check=False).returncode != 0:
        return False
    earlier = [head0, *git(repo, "rev-list", f"{head0}..{head}").split()[1:]]
    return any(
        subprocess.run(["git", "diff", "--cached", "--quiet", c], cwd=repo, check=False).returncode
        == 0
        for c in earlier
    )


def _known_defects(repo: Path) -> list[KnownDefect]:
    """The pinned defects whose signature the repository shows: none is open (the half-made
    worktree and the empty rerun were fixed; their tests above now pass strictly)."""
    del repo
    return []


def _probe_leases(
    leases: LeaseStore, held: list[Lease], timing: Timing, label: str, ledger: Ledger
) -> None:
    """The dead server's leases: refused to another holder before expiry + lock-delay, granted
    after it (then given back, so the fresh process retakes them)."""
    rows = held
    if not rows:
        ledger.record(G_LEASE, f"{label}: leases at kill", True, "none held")
        return
    for lease in rows:
        blocks_until = lease.expires_at + timing.lease_lock_delay_s
        if time.time() < blocks_until - 0.05:
            grant = leases.try_acquire("outside-probe", [LeaseRequest.write(lease.resource)])
            if grant is not None:
                leases.release(grant)
            ledger.record(
                G_LEASE,
                f"{label}: {lease.resource} refused before expiry + lock-delay",
                grant is None,
                f"granted to another holder {blocks_until - time.time():.3f} s early",
            )
    last = max(lease.expires_at for lease in rows) + timing.lease_lock_delay_s
    time.sleep(max(0.0, last + 0.05 - time.time()))
    for lease in rows:
        grant = leases.try_acquire("outside-probe", [LeaseRequest.write(lease.resource)])
        ledger.record(
            G_LEASE,
            f"{label}: {lease.resource} re-granted after expiry + lock-delay",
            grant is not None,
            f"still refused {time.time() - lease.expires_at:.3f} s after its expiry",
        )
        if grant is not None:
            leases.release(grant)


G_GIT = "G5h crash: a git command killed mid-update leaves nothing that blocks or leaks"

HOOK = """#!/bin/sh
# test hook: block the first matching ref transaction while its locks are held
[ "$1" = {state} ] || exit 0
lines=$(cat)
case "$lines" in *"{pattern}"*) ;; *) exit 0;; esac
[ -e "{markers}/hooked" ] && exit 0
: > "{markers}/hooked"
sleep 120
"""


@dataclass(frozen=True)
class GitKill:
    scenario: Scenario
    pattern: str  # the ref whose update the server is killed inside
    where: str
    state: str = "prepared"  # the transaction's state at the kill (locks held when prepared)
    workspaces: str = ""  # "worktree" where the kill is inside `git worktree add`


GIT_KILLS = [
    GitKill("mid_merge", "refs/heads/main", "git update-ref of the canonical branch (mid-merge)"),
    GitKill(
        "after_spawn",
        "ORIG_HEAD",
        "git worktree add of an agent (its checkout step)",
        workspaces="worktree",
    ),
    GitKill(
        "mid_merge",
        "refs/heads/main",
        "a merge, after its ref update committed, before the checkout is brought forward",
        state="committed",
    ),
]


@pytest.mark.parametrize(
    "kill",
    [
        pytest.param(GIT_KILLS[0]),
        pytest.param(GIT_KILLS[1]),
        pytest.param(GIT_KILLS[2]),
    ],
    ids=["update-ref", "worktree-add", "before-bring-forward"],
)
def test_kill_inside_a_git_command(kill: GitKill, tmp_path: Path, ledger: Ledger) -> None:
    """Deterministic kills inside git: a `reference-transaction` hook blocks the chosen ref
    update while git holds its locks; the test SIGKILLs the server's process group there (as a
    terminal closing or a container stop would), removes the hook, and reopens the repository."""
    repo = make_repo(tmp_path / "repo")
    head0 = git(repo, "rev-parse", "HEAD").strip()
    markers = tmp_path / "markers"
    markers.mkdir()
    hook = repo / ".git" / "hooks" / "reference-transaction"
    hook.write_text(HOOK.format(pattern=kill.pattern, markers=markers, state=kill.state))
    hook.chmod(0o755)
    timing = Timing()
    config = CrashConfig(
        repo=str(repo),
        markers=str(markers),
        scenario=kill.scenario,
        agents=4,
        timing=timing,
        workspaces=kill.workspaces,
    )
    child = Child("crash", config, tmp_path / "logs")
    wait_for(child, (markers / "hooked").exists, timeout_s=120)
    time.sleep(0.05)
    child.kill(group=True)
    killed_at = time.time()
    hook.unlink()
    label = f"killed inside {kill.where}"
    time.sleep(max(0.0, killed_at + timing.stale_s + 0.1 - time.time()))
    recover = Child("recover", RecoverConfig(repo=str(repo), timing=timing), tmp_path / "logs")
    assert recover.wait(180) == 0, recover.stderr()
    report = RecoverReport.model_validate_json(recover.stdout())
    problems: list[str] = []
    fsck_ok, fsck_text = fsck(repo)
    if not fsck_ok:
        problems.append(f"fsck: {fsck_text}")
    for m in [*report.merges, *report.rerun_merges, *report.fresh_merges]:
        if m.outcome != "merged":
            problems.append(f"{m.agent_id} {m.outcome}: {m.reason}")
    chain, _ = merge_chain_problems(repo, head0, git(repo, "rev-parse", "HEAD").strip())
    problems += chain
    locks = sorted(str(p.relative_to(repo)) for p in (repo / ".git").rglob("*.lock"))
    locks = [p for p in locks if not p.startswith(".git/fanout/")]
    if locks:
        problems.append(f"stale git locks: {locks}")
    admin = repo / ".git" / "worktrees"
    registrations = sorted(admin.iterdir()) if admin.exists() else []
    leftovers = [d.name for d in registrations if (d / "locked").exists()]
    if leftovers:
        problems.append(f"worktree registrations left: {leftovers}")
    status = git(repo, "status", "--porcelain", "--untracked-files=all")
    if status:
        problems.append(f"checkout differs from the canonical head: {status[:300]}")
    ledger.record(G_GIT, label, not problems, "; ".join(problems))
    assert not problems, "\n".join(problems)


@pytest.mark.anyio
async def test_rerun_of_an_interrupted_agent_without_work_merges(
    tmp_path: Path, ledger: Ledger
) -> None:
    """Found by the full-profile kill runs (mid_write, a quick agent killed before its write):
    an interrupted agent with no work, another agent merged, then a rerun that changes nothing."""
    import anyio

    from orchestration.config import Settings
    from orchestration.contracts import MergeRequest, SpawnRequest, TaskSpec
    from orchestration.orchestrator import Orchestrator
    from tests.orchestration.scripts import Gate, by_task

    repo = make_repo(tmp_path / "repo")
    settings = Settings.model_validate({"repo": repo, "sandbox": "none"})
    gate = Gate({"IDLE": 0})
    first = by_task(
        {
            "IDLE": [("write_file", {"path": "docs/i.md", "content": "i\n"})],
            "DONE": [("write_file", {"path": "src/app/d.py", "content": "D = 1\n"})],
        },
        gate=gate,
    )
    async with Orchestrator(settings, lambda _name: first) as orch:
        spawned = await orch.spawn(
            SpawnRequest(
                tasks=[
                    TaskSpec(prompt="IDLE", write_scope=["docs"]),
                    TaskSpec(prompt="DONE", write_scope=["src/app"]),
                ]
            )
        )
        with anyio.fail_after(30):
            await gate.reached["IDLE"].wait()
            cursor: int | None = None
            while True:
                status = await orch.status(run_id=spawned.run_id, since=cursor, wait_s=1)
                cursor = status.cursor
                if status.runs[0].agents[1].status.value == "succeeded":
                    break
    # the server stopped under IDLE before it wrote anything
    second = by_task({"IDLE": [("list_files", {})]})
    async with Orchestrator(settings, lambda _name: second) as orch:
        await orch.merge(MergeRequest(run_id=spawned.run_id))
        rerun = await orch.rerun(spawned.agents[0].agent_id)
        with anyio.fail_after(30):
            cursor = None
            while True:
                status = await orch.status(run_id=spawned.run_id, since=cursor, wait_s=1)
                cursor = status.cursor
                view = next(a for a in status.runs[0].agents if a.agent_id == rerun.agent.agent_id)
                if not view.status.active:
                    break
        merged = await orch.merge(MergeRequest(run_id=spawned.run_id))
        after = await orch.status(run_id=spawned.run_id)
    result = merged.agents[0]
    view = next(a for a in after.runs[0].agents if a.agent_id == rerun.agent.agent_id)
    ok = result.outcome.value == "merged" and view.status.value == "merged" and not view.leases
    ledger.record(
        G_AFTER,
        "rerun of an interrupted agent without work",
        ok,
        f"{result.outcome.value}: {result.reason}; status {view.status.value}, "
        f"leases {[lease.resource for lease in view.leases]}",
    )
    assert (repo / "src/app/d.py").exists()  # never a revert of the other agent's merge
    assert ok, f"{result}; {view.status}; {view.leases}"
