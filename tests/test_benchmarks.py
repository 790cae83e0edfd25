"""Smoke test of the run benchmarks: each `run(quick=True)` finishes and returns its figures."""

from __future__ import annotations

import importlib
import math

import pytest

from benchmarks.__main__ import (
    SLOW_FILE_MS,
    _warn_if_slow,  # pyright: ignore[reportPrivateUsage]
)
from benchmarks.common import remove_scratch

EXPECTED: dict[str, tuple[str, ...]] = {
    "benchmarks.fanout": (
        "makespan_over_ideal_16",
        "makespan_over_ideal_64",
        "worktree_cpu_ms_per_agent_64",
        "work_floor_over_floor_64",
        "work_floor_cpu_ms_per_agent_64",
        "inodes_per_agent_64",
        "work_floor_inodes_per_agent_64",
    ),
    "benchmarks.spawn": ("spawn_s_16", "spawn_over_git_16"),
    "benchmarks.cache": (
        "cache_read_share",
        "input_cost_over_uncached",
        "warmup_delay_over_first_byte",
        "estimate_error",
    ),
    "benchmarks.history": ("status_ms_history", "history_cpu_ratio"),
    "benchmarks.ratelimit": ("ratelimit_failed", "ratelimit_makespan_over_floor"),
    "benchmarks.memory": ("rss_mb_per_running_agent", "agents_failed"),
    "benchmarks.mcp": ("ratio", "get_status_server_cpu_ms", "get_status_driver_parse_ms"),
    "benchmarks.startup": ("startup_initialize_s", "first_spawn_s", "first_run_s"),
    "benchmarks.orchestrator": (
        "orchestrator_json_bytes_per_agent_16",
        "orchestrator_text_bytes_per_agent_16",
        "status_calls_16",
        "waves_loop_ended",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted(EXPECTED))
def test_quick_run_returns_its_figures(module: str) -> None:
    try:
        figures = importlib.import_module(module).run(quick=True)
    finally:
        remove_scratch()  # what `python -m benchmarks` does after its last benchmark
    for key in EXPECTED[module]:
        assert key in figures, f"{module} lacks {key}"
    for key, value in figures.items():
        assert isinstance(value, int | float) and not isinstance(value, bool), key
        assert math.isfinite(value) and value >= 0, (key, value)


def test_a_slow_disk_is_named_beside_the_figures(capsys: pytest.CaptureFixture[str]) -> None:
    _warn_if_slow(SLOW_FILE_MS / 2, "before")
    assert capsys.readouterr().out == ""
    _warn_if_slow(SLOW_FILE_MS * 3, "after the benchmarks")
    out = capsys.readouterr().out
    assert out.startswith("warning: after the benchmarks") and "FANOUT_BENCH_DIR" in out
