"""Run benchmarks by name; the last stdout line is one JSON object with every figure."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import SCRATCH_ENV, file_create_ms, remove_scratch, scratch_root
from orchestration.workspace.overlay import enter_private_mounts

# name -> module under benchmarks/ exposing `run(quick: bool) -> dict[str, float | int]`
BENCHMARKS: dict[str, str] = {
    "leases": "benchmarks.leases",
    "merge": "benchmarks.merge",
    "fanout": "benchmarks.fanout",
    "spawn": "benchmarks.spawn",
    "cache": "benchmarks.cache",
    "mcp": "benchmarks.mcp",
    "memory": "benchmarks.memory",
    "startup": "benchmarks.startup",
    "orchestrator": "benchmarks.orchestrator",
    "bus": "benchmarks.bus",
    "cluster": "benchmarks.cluster",
    "history": "benchmarks.history",
    "ratelimit": "benchmarks.ratelimit",
}


def available() -> list[str]:
    """The benchmarks whose module exists in this checkout."""
    names: list[str] = []
    for name, module in BENCHMARKS.items():
        if importlib.util.find_spec(module) is not None:
            names.append(name)
    return names


SLOW_FILE_MS = 0.04
"""Above this, making a file in the scratch directory is slow: a disk that made about 0.015 ms a
file when quiet here takes five to ten times that for minutes after many deletions (ext4
searching past recently freed inodes), and every figure that makes files runs high with it."""


def _disk(scratch: Path, system_tmp: Path) -> dict[str, float | int]:
    """How long creating a file takes where the benchmarks work, and in the system temporary
    directory: worktrees are files, so this floor explains part of every figure."""
    here, there = file_create_ms(scratch), file_create_ms(system_tmp)
    print(
        f"scratch directory: {scratch.name}/ ({SCRATCH_ENV} to move it); creating a file there "
        f"takes {here:.3f} ms, in the system temporary directory {there:.3f} ms",
        flush=True,
    )
    _warn_if_slow(here, "before the benchmarks")
    return {"scratch_file_create_ms": round(here, 4), "tmp_file_create_ms": round(there, 4)}


def _warn_if_slow(ms: float, when: str) -> None:
    if ms > SLOW_FILE_MS:
        print(
            f"warning: {when}, creating a file in the scratch directory took {ms:.3f} ms (more "
            f"than {SLOW_FILE_MS} ms): the disk is slow, and the figures that make files (spawn, "
            "fan-out, merge, their floors) run high with it. Compare figures of one run only, "
            f"run again after a few quiet minutes, or put {SCRATCH_ENV} on a tmpfs to compare "
            "code.",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    # as the server does, before any thread: agents' workspaces can be copy-on-write views
    enter_private_mounts()
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="+", help=f"one or more of {', '.join(BENCHMARKS)}, or all")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (CI)")
    args = parser.parse_args(argv)
    names: list[str] = available() if args.names == ["all"] else list(args.names)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(
            f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}"
        )
    figures: dict[str, float | int] = _disk(scratch_root(), Path(tempfile.gettempdir()))
    try:
        for name in names:
            module = importlib.import_module(BENCHMARKS[name])
            print(f"\n== {name}{' (quick)' if args.quick else ''}", flush=True)
            started = time.perf_counter()
            result: dict[str, float | int] = module.run(quick=args.quick)
            print(f"({name}: {time.perf_counter() - started:.1f} s)", flush=True)
            figures.update(result)
        after = file_create_ms(scratch_root())
        figures["scratch_file_create_ms_after"] = round(after, 4)
        _warn_if_slow(after, "after the benchmarks")
        print(json.dumps(figures, sort_keys=True), flush=True)
    finally:
        remove_scratch()  # after the figures: deleting a full run's files can take minutes
    return 0


if __name__ == "__main__":
    sys.exit(main())
