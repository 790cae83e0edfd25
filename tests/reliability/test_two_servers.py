"""Two server processes on one repository at once.

Each child (`server_proc.py worker`) runs rounds of runs whose agents write under overlapping
scopes (`shared`, `shared/sub`, `common/x`: contested across the two processes) and disjoint ones
(`own-<server>`, `own-<server>/r<n>`), merging agents as they finish. Meanwhile the test watches
from outside: the lease table (no two live conflicting leases of different holders, ever) and
`PRAGMA integrity_check` of both stores. Each agent logs its critical section (first to last
model turn, while it holds its write lease) with the system-wide monotonic clock: no two
conflicting sections may overlap. Afterwards every merged agent's merge commit is on the
canonical branch, whose history is linear and holds one whole merge per merged agent.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from tests.orchestration.scripts import git, make_repo
from tests.reliability.conftest import FULL, Ledger
from tests.reliability.procs import Child, fsck, integrity, is_ancestor, merge_chain_problems
from tests.reliability.server_proc import Timing, WorkerConfig, WorkerReport
from toolbus.leases import LeaseStore, conflicts
from toolbus.resources import is_within

G_GRANT = "G6a two servers: never a double grant (lease table, critical sections)"
G_STORE = "G6b two servers: stores never corrupted (integrity_check, fsck)"
G_MERGE = "G6c two servers: never a lost merge; history linear and complete"

ROUNDS = 5 if FULL else 2


def _scopes_conflict(a: str, b: str) -> bool:
    return a == b or is_within(a, b) or is_within(b, a)


def test_two_servers_on_one_repository(tmp_path: Path, ledger: Ledger) -> None:
    repo = make_repo(tmp_path / "repo")
    head0 = git(repo, "rev-parse", "HEAD").strip()
    state_dir = repo / ".git" / "fanout"
    markers = tmp_path / "markers"
    critical = tmp_path / "critical.log"
    # a TTL well above a heartbeat's worst delay on a loaded 2-core machine, and a staleness
    # well above a server heartbeat's: neither expiry nor the death of a server is what this
    # test is about (test_crash covers both); a server that opened the repository while the
    # other's heartbeat was late would recover that live server's agents as a dead one's
    timing = Timing(lease_ttl_s=10.0, lease_lock_delay_s=0.3, heartbeat_s=1.0, stale_s=10.0)
    children = [
        Child(
            "worker",
            WorkerConfig(
                repo=str(repo),
                markers=str(markers),
                name=name,
                rounds=ROUNDS,
                timing=timing,
                critical_log=str(critical),
            ),
            tmp_path / "logs",
        )
        for name in ("A", "B")
    ]

    # --- watch from outside while both run --------------------------------------------------
    snapshots = 0
    double: list[str] = []
    corrupt: list[str] = []
    tokens: dict[int, str] = {}
    deadline = time.monotonic() + 600
    next_integrity = 0.0
    while any(c.proc.poll() is None for c in children) and time.monotonic() < deadline:
        if (state_dir / "leases.db").exists():
            store = LeaseStore(state_dir)
            try:
                table = store.table()
            finally:
                store.close()
            snapshots += 1
            for lease in table:
                seen = tokens.setdefault(lease.token, lease.holder)
                if seen != lease.holder:
                    double.append(f"token {lease.token} held by {seen} and {lease.holder}")
            for a, b in itertools.combinations(table, 2):
                if a.holder != b.holder and conflicts(a.request, b.request):
                    double.append(f"{a.holder}:{a.resource} and {b.holder}:{b.resource} live")
            if time.monotonic() >= next_integrity:
                next_integrity = time.monotonic() + 1.0
                for db in ("state.db", "leases.db"):
                    verdict = integrity(state_dir / db)
                    if verdict != "ok":
                        corrupt.append(f"{db}: {verdict}")
        time.sleep(0.02)
    reports: list[WorkerReport] = []
    for child in children:
        code = child.wait(60)
        assert code == 0, child.stderr()
        reports.append(WorkerReport.model_validate_json(child.stdout()))
    ledger.record(G_GRANT, f"lease table, {snapshots} snapshots", not double, "; ".join(double[:5]))
    ledger.record(G_STORE, "integrity during the run", not corrupt, "; ".join(corrupt[:5]))

    # --- critical sections ------------------------------------------------------------------
    spans: dict[str, tuple[str, float, float]] = {}
    opened: dict[str, tuple[str, float]] = {}
    for line in critical.read_text().splitlines():
        kind, key, scope, at = line.split()
        if kind == "enter":
            opened[key] = (scope, float(at))
        else:
            scope0, start = opened.pop(key)
            spans[key] = (scope0, start, float(at))
    overlaps = [
        f"{k1} [{s1}] and {k2} [{s2}]"
        for (k1, (s1, a1, b1)), (k2, (s2, a2, b2)) in itertools.combinations(spans.items(), 2)
        if _scopes_conflict(s1, s2) and a1 < b2 and a2 < b1
    ]
    ledger.record(
        G_GRANT,
        f"{len(spans)} critical sections ({len(opened)} unclosed)",
        not overlaps and not opened,
        "; ".join(overlaps[:5]) + (f" unclosed: {sorted(opened)}" if opened else ""),
    )

    # --- merges -----------------------------------------------------------------------------
    head = git(repo, "rev-parse", "HEAD").strip()
    merged = [m for r in reports for m in r.merges if m.outcome == "merged" and m.commit]
    agents = [a for r in reports for a in r.agents]
    total = ROUNDS * 5 * 2
    statuses = sorted({a.status for a in agents})
    ledger.record(
        G_MERGE,
        f"all {total} agents merged",
        len(agents) == total and statuses == ["merged"],
        f"{len(agents)} agents, statuses {statuses}: "
        + "; ".join(
            f"{a.agent_id} {a.status}: {a.status_reason}" for a in agents if a.status != "merged"
        )[:500],
    )
    lost = [m.agent_id for m in merged if m.commit and not is_ancestor(repo, m.commit, head)]
    ledger.record(G_MERGE, f"{len(merged)} merge commits reachable", not lost, f"{lost}")
    problems, chain_agents = merge_chain_problems(repo, head0, head)
    ledger.record(G_MERGE, "history linear, whole merges", not problems, "; ".join(problems[:5]))
    ledger.record(
        G_MERGE,
        "history complete (one commit per merged agent)",
        sorted(chain_agents) == sorted(m.agent_id for m in merged),
        f"history has {len(chain_agents)}, merges reported {len(merged)}",
    )
    missing = [
        f"{key}.txt"
        for key, (scope, _, _) in spans.items()
        if git(repo, "ls-tree", "--name-only", head, f"{scope}/{key}.txt").strip() == ""
    ]
    ledger.record(G_MERGE, "every agent's file at the head", not missing, f"{missing[:10]}")
    status = git(repo, "status", "--porcelain", "--untracked-files=all")
    ledger.record(G_MERGE, "checkout matches the head", status == "", status[:300])
    fsck_ok, fsck_text = fsck(repo)
    ledger.record(G_STORE, "fsck after", fsck_ok, fsck_text)
    for db in ("state.db", "leases.db"):
        verdict = integrity(state_dir / db)
        ledger.record(G_STORE, f"{db} after", verdict == "ok", verdict)

    failures = [*ledger.failures(G_GRANT), *ledger.failures(G_STORE), *ledger.failures(G_MERGE)]
    assert not failures, "\n".join(failures)
