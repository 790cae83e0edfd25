"""How a long-poll of `status` ends: by its deadline whatever else waits for the worker threads,
and with one answer shared by the polls that one change wakes."""

from __future__ import annotations

from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from orchestration.config import Settings
from orchestration.contracts import StatusResult
from orchestration.orchestrator import Orchestrator
from orchestration.state import EventKind
from tests.orchestration.scripts import make_repo
from toolbus.leases import Lease

pytestmark = pytest.mark.anyio

WAIT_S = 1.0
MARGIN_S = 2.0


async def test_a_long_poll_answers_by_its_deadline_while_the_worker_threads_are_all_taken(
    tmp_path: Path,
) -> None:
    repo = make_repo(tmp_path / "repo")
    async with Orchestrator(Settings(repo=repo, sandbox="none")) as orch:
        ctx = await orch.context(repo)
        cursor = ctx.store.cursor()
        # every token of the worker threads' default limiter taken, as by many agents' git work
        limiter = anyio.to_thread.current_default_thread_limiter()
        borrowers = [object() for _ in range(int(limiter.total_tokens))]
        for borrower in borrowers:
            await limiter.acquire_on_behalf_of(borrower)
        try:
            started = anyio.current_time()
            with anyio.fail_after(WAIT_S + 30):
                status = await orch.status(since=cursor, wait_s=WAIT_S)
            took = anyio.current_time() - started
        finally:
            for borrower in borrowers:
                limiter.release_on_behalf_of(borrower)
        assert took < WAIT_S + MARGIN_S
        assert not status.changed and status.cursor == cursor


async def test_long_polls_woken_by_one_change_share_one_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo(tmp_path / "repo")
    async with Orchestrator(Settings(repo=repo, sandbox="none")) as orch:
        ctx = await orch.context(repo)
        await orch.status()  # (its disk usage measured)
        table = ctx.leases.table
        reads = 0

        async def counted_table() -> list[Lease]:
            nonlocal reads
            reads += 1
            return await table()

        monkeypatch.setattr(ctx.leases, "table", counted_table)
        cursor = ctx.store.cursor()
        answers: list[StatusResult] = []

        async def poll() -> None:
            answers.append(await orch.status(since=cursor, wait_s=30))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(50):
                    tg.start_soon(poll)
                await anyio.wait_all_tasks_blocked()
                ctx.store.record_event(None, None, EventKind.NOTE, "one change")
        assert len(answers) == 50
        assert all(answer is answers[0] for answer in answers)
        assert answers[0].changed and answers[0].cursor > cursor
        assert reads == 1  # the state behind the answer was read once
