"""Several OS processes contending on one lease store never overlap conflicting sections."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from toolbus.leases import LeaseMode, LeaseRequest, conflicts

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = 4
ITERATIONS = 200

# One contender: acquires random overlapping leases through the async manager (cross-process
# waiting is by polling), records (token, resource, mode, start, end) of each critical section
# using the system-wide monotonic clock, and appends its records to the shared file at the end.
WORKER = r"""
import os, random, sys, time
import anyio
from toolbus.leases import LeaseManager, LeaseMode, LeaseRequest, LeaseStore

state_dir, out, seed, iterations = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
CHOICES = [
    ("src", "write"), ("src/a", "write"), ("src/a/x.py", "write"), ("src/b", "write"),
    ("src", "read"), ("src/a/x.py", "read"), ("docs", "write"),
]

async def main() -> None:
    rng = random.Random(seed)
    manager = LeaseManager(LeaseStore(state_dir, ttl_s=60.0, lock_delay_s=0.0),
                           poll_interval_s=0.002)
    lines = []
    for _ in range(iterations):
        resource, mode = rng.choice(CHOICES)
        grant = await manager.acquire(f"worker-{seed}", [LeaseRequest(resource=resource,
                                                                      mode=LeaseMode(mode))])
        start = time.monotonic_ns()
        manager.check(grant.holder, grant.token, resource, LeaseMode(mode))
        time.sleep(0.0001)
        end = time.monotonic_ns()
        await manager.release(grant)
        lines.append(f"{grant.token} {resource or '.'} {mode} {start} {end}\n")
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, "".join(lines).encode())
    os.close(fd)

anyio.run(main)
"""


def test_processes_never_hold_conflicting_leases_at_once(tmp_path: Path) -> None:
    out = tmp_path / "sections.txt"
    state_dir = tmp_path / "state"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(state_dir), str(out), str(i), str(ITERATIONS)],
            cwd=ROOT,
        )
        for i in range(PROCESSES)
    ]
    for worker in workers:
        assert worker.wait(timeout=120) == 0

    records: list[tuple[int, LeaseRequest, int, int]] = []
    for line in out.read_text().splitlines():
        token, resource, mode, start, end = line.split()
        request = LeaseRequest(resource=resource, mode=LeaseMode(mode))
        records.append((int(token), request, int(start), int(end)))
    assert len(records) == PROCESSES * ITERATIONS
    assert len({token for token, *_ in records}) == len(records), "a token was granted twice"

    records.sort(key=lambda r: r[2])
    conflicting_pairs = 0
    for i, (token_a, request_a, _start_a, end_a) in enumerate(records):
        for token_b, request_b, start_b, end_b in records[i + 1 :]:
            if start_b > end_a:
                # later sections start after this one ended: only the token order remains to check
                if conflicts(request_a, request_b):
                    conflicting_pairs += 1
                    assert token_a < token_b, "a later conflicting grant got a smaller token"
                continue
            assert not conflicts(request_a, request_b), (
                f"overlapping critical sections for {request_a} (token {token_a}) and "
                f"{request_b} (token {token_b})"
            )
            assert start_b <= end_b
    assert conflicting_pairs > 0
