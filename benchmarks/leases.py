"""Lease store latency and throughput, next to the floors it is built on (a WAL commit, an flock).

Figures: `acquire_release_p50_ms` / `_p99_ms` (one holder, sync store: two serialized
transactions), `manager_acquire_release_p50_ms` (the same through the async `LeaseManager`),
`acquire_release_p50_ms_1000_live` (with 1,000 other live leases in the table), `check_p50_ms`
(the fence on every write), `pairs_per_s_4proc` (4 processes on disjoint paths), and the floors
`sqlite_wal_commit_p50_ms`, `flock_p50_ms`.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import sqlite3
import statistics
import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import anyio

from benchmarks.common import scratch
from toolbus.leases import LeaseManager, LeaseRequest, LeaseStore


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _sqlite_commit_floor(directory: Path, n: int) -> list[float]:
    conn = sqlite3.connect(directory / "floor.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v INTEGER)")
    conn.execute("INSERT INTO t VALUES (1, 0)")
    samples: list[float] = []
    for _ in range(n):
        started = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE t SET v = v + 1 WHERE k = 1")
        conn.execute("COMMIT")
        samples.append(time.perf_counter() - started)
    conn.close()
    return samples


def _flock_floor(directory: Path, n: int) -> list[float]:
    fd = os.open(directory / "floor.lock", os.O_RDWR | os.O_CREAT, 0o600)
    samples: list[float] = []
    for _ in range(n):
        started = time.perf_counter()
        fcntl.flock(fd, fcntl.LOCK_EX)
        fcntl.flock(fd, fcntl.LOCK_UN)
        samples.append(time.perf_counter() - started)
    os.close(fd)
    return samples


def _store_pairs(store: LeaseStore, n: int, holder: str = "bench") -> list[float]:
    requests = [LeaseRequest.write(f"bench/{holder}/file.py")]
    samples: list[float] = []
    for _ in range(n):
        started = time.perf_counter()
        grant = store.try_acquire(holder, requests)
        assert grant is not None
        store.release(grant)
        samples.append(time.perf_counter() - started)
    return samples


def _manager_pairs(store: LeaseStore, n: int) -> list[float]:
    manager = LeaseManager(store)
    requests = [LeaseRequest.write("bench/manager/file.py")]
    samples: list[float] = []

    async def loop() -> None:
        for _ in range(n):
            started = time.perf_counter()
            grant = await manager.acquire("manager", requests)
            await manager.release(grant)
            samples.append(time.perf_counter() - started)

    anyio.run(loop)
    return samples


def _check_samples(store: LeaseStore, n: int) -> list[float]:
    grant = store.try_acquire("checker", [LeaseRequest.write("bench/checked")])
    assert grant is not None
    samples: list[float] = []
    for _ in range(n):
        started = time.perf_counter()
        store.check("checker", grant.token, "bench/checked/deep/file.py")
        samples.append(time.perf_counter() - started)
    store.release(grant)
    return samples


def _worker(
    state_dir: str, index: int, seconds: float, barrier: Barrier, results: Queue[int]
) -> None:
    """One of the throughput processes: acquire/release pairs on its own path until time is up."""
    store = LeaseStore(state_dir)
    requests = [LeaseRequest.write(f"bench/proc{index}/file.py")]
    holder = f"proc-{index}"
    barrier.wait()
    deadline = time.perf_counter() + seconds
    pairs = 0
    while time.perf_counter() < deadline:
        grant = store.try_acquire(holder, requests)
        assert grant is not None
        store.release(grant)
        pairs += 1
    store.close()
    results.put(pairs)


def _throughput(state_dir: Path, processes: int, seconds: float) -> float:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes)
    results: Queue[int] = context.Queue()
    workers = [
        context.Process(target=_worker, args=(str(state_dir), i, seconds, barrier, results))
        for i in range(processes)
    ]
    for worker in workers:
        worker.start()
    total = sum(int(results.get(timeout=60)) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
    return total / seconds


def run(quick: bool) -> dict[str, float | int]:
    n = 500 if quick else 10_000
    seconds = 0.5 if quick else 3.0
    with scratch("bench-leases-") as tmp:
        directory = Path(tmp)
        commit = _sqlite_commit_floor(directory, n)
        flock = _flock_floor(directory, n)
        with LeaseStore(directory / "state") as store:
            _store_pairs(store, 100)  # warm up statement caches
            pairs = _store_pairs(store, n)
            manager = _manager_pairs(store, n)
            checks = _check_samples(store, n)
            for i in range(1_000):
                store.try_acquire(f"idle-{i}", [LeaseRequest.write(f"pkg/m{i:04d}")])
            crowded = _store_pairs(store, n, holder="crowded")
        per_s = _throughput(directory / "state-4proc", 4, seconds)

    ms = 1_000.0
    figures: dict[str, float | int] = {
        "acquire_release_p50_ms": round(statistics.median(pairs) * ms, 4),
        "acquire_release_p99_ms": round(_percentile(pairs, 0.99) * ms, 4),
        "manager_acquire_release_p50_ms": round(statistics.median(manager) * ms, 4),
        "acquire_release_p50_ms_1000_live": round(statistics.median(crowded) * ms, 4),
        "check_p50_ms": round(statistics.median(checks) * ms, 4),
        "pairs_per_s_4proc": round(per_s),
        "sqlite_wal_commit_p50_ms": round(statistics.median(commit) * ms, 4),
        "flock_p50_ms": round(statistics.median(flock) * ms, 4),
    }
    rows = [
        ("floor: bare SQLite WAL commit", commit),
        ("floor: bare flock lock+unlock", flock),
        ("store acquire+release (1 holder)", pairs),
        ("manager acquire+release (async)", manager),
        ("store acquire+release, 1000 live", crowded),
        ("check (the fence)", checks),
    ]
    print(f"{'operation':<36} {'p50 ms':>9} {'p99 ms':>9} {'x commit':>9}")
    floor = statistics.median(commit)
    for name, samples in rows:
        p50 = statistics.median(samples)
        print(
            f"{name:<36} {p50 * ms:>9.4f} {_percentile(samples, 0.99) * ms:>9.4f} "
            f"{p50 / floor:>9.1f}"
        )
    print(f"{'4 processes, disjoint paths':<36} {per_s:>9.0f} pairs/s")
    return figures
