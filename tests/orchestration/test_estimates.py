"""Spawn's cost estimate against what the run spent: on the cache benchmark's runs, once the
repository has an earlier run to calibrate it, within 25 %; status shows both once settled."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from benchmarks import cache as cache_bench
from benchmarks.common import fake_in_process, remove_scratch
from mcp_server.answers import status_answer, status_text
from orchestration.contracts import RunTotals, RunView, ServerLoad, StatusResult, TokenUsage
from orchestration.estimates import Calibration, calibrate


@pytest.mark.slow
def test_the_estimate_holds_within_a_quarter_on_the_benchmarks_runs(tmp_path: Path) -> None:
    agents, rounds = 4, 3
    try:
        with fake_in_process(latency_s=0.05) as fake:
            warm, cold = anyio.run(
                cache_bench._measure,  # pyright: ignore[reportPrivateUsage]
                fake.base_url,
                tmp_path,
                agents,
                rounds,
            )
    finally:
        remove_scratch()
    for measured in (warm, cold):
        assert all(r.failed == 0 and r.spent > 0 for r in measured)
        errors = [abs(r.estimate - r.spent) / r.spent for r in measured]
        # the first run of a repository is estimated on defaults (8 turns of a real model's
        # size); later ones on what the earlier runs did
        assert max(errors[1:]) <= 0.25, [(r.estimate, r.spent) for r in measured]


def test_calibration_without_history_is_the_defaults() -> None:
    assert calibrate([]) == Calibration()


def _status(settled: bool) -> StatusResult:
    totals = RunTotals(
        agents=1,
        by_status={"succeeded": 1},
        tokens=TokenUsage(input=10),
        budget_tokens=1_000,
        budget_used=110,
        budget_remaining=890,
        estimate_tokens=100,
    )
    run = RunView(
        run_id="r1",
        repo="/r",
        created_at=0,
        base_commit="0" * 40,
        max_concurrency=1,
        totals=totals,
        agents=[],
        settled=settled,
        next="merge_results",
    )
    return StatusResult(
        cursor=1,
        changed=True,
        runs=[run],
        workspace_disk_bytes=0,
        server=ServerLoad(running=0, max_running=64, tokens_used=0),
    )


def test_status_shows_estimate_and_spend_once_settled() -> None:
    settled = status_text(status_answer(_status(True)))
    assert "110 budget units spent against spawn's estimate of 100 (+10%)" in settled
    assert "estimate" not in status_text(status_answer(_status(False)))
