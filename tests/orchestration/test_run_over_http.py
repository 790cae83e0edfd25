"""A full run through the real `anthropic` client, over HTTP, against the fake Messages API."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from fakeapi import (
    FakeAnthropic,
    RequestRateLimit,
    by_key,
    by_turn,
    finish,
    rate_limited,
    tool_use,
    writes_file,
)
from orchestration.config import Settings
from orchestration.contracts import (
    AgentStatus,
    MergeOutcome,
    MergeRequest,
    SharedContextSpec,
    SpawnRequest,
    StopReason,
    TaskSpec,
)
from orchestration.model import Model
from orchestration.orchestrator import Orchestrator
from orchestration.providers.anthropic import AnthropicModel
from tests.orchestration.scripts import git, make_repo
from tests.orchestration.test_orchestrator import wait_until_final

pytestmark = pytest.mark.anyio


async def test_tool_use_bus_file_finish_result_over_http(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    handler = by_key(
        {
            "TASK-ALPHA": writes_file("src/app/alpha.py", "ALPHA = 1\n", summary="alpha added"),
            "TASK-BETA": by_turn(
                tool_use("read_file", path="src/lib/util.py"),
                tool_use("edit_file", path="src/lib/util.py", old="return 2", new="return 3"),
                tool_use("run_command", command="cat src/lib/util.py"),
                finish("util returns 3"),
            ),
        }
    )
    fake = FakeAnthropic(handler)
    # the first request of the run is refused once with a retry-after: the loop retries it
    fake.inject(rate_limited(retry_after_s=0.05), times=1)
    async with fake.serve():

        def factory(name: str) -> Model:
            return AnthropicModel(model=name, api_key="sk-test", base_url=fake.base_url)

        settings = Settings(repo=repo, sandbox="none", model="claude-sonnet-5-5")
        async with Orchestrator(settings, factory) as orch:
            spawned = await orch.spawn(
                SpawnRequest(
                    tasks=[
                        TaskSpec(prompt="TASK-ALPHA", name="alpha", write_scope=["src/app"]),
                        TaskSpec(prompt="TASK-BETA", name="beta", write_scope=["src/lib"]),
                    ],
                    shared_context=SharedContextSpec(plan="P" * 4_000),
                )
            )
            status = await wait_until_final(orch, spawned.run_id)
            views = {a.name: a for a in status.runs[0].agents}
            for view in views.values():
                assert view.status == AgentStatus.SUCCEEDED, view.status_reason
            beta = views["beta"].result
            assert beta is not None
            assert beta.stop_reason == StopReason.FINISHED
            assert beta.summary == "util returns 3"
            assert [(c.path, c.lines_added, c.lines_removed) for c in beta.changed_files] == [
                ("src/lib/util.py", 1, 1)
            ]
            assert [(c.command, c.exit_code) for c in beta.commands] == [("cat src/lib/util.py", 0)]
            # tokens come from the API's usage; the shared prefix was cached after its first use
            tokens = status.runs[0].totals.tokens
            assert tokens.output > 0
            assert tokens.cache_write > 0 and tokens.cache_read > tokens.cache_write
            merged = await orch.merge(MergeRequest(run_id=spawned.run_id))
            assert [r.outcome for r in merged.agents] == [MergeOutcome.MERGED] * 2
    assert (repo / "src/app/alpha.py").read_text() == "ALPHA = 1\n"
    assert "return 3" in (repo / "src/lib/util.py").read_text()
    bodies = [r.body for r in fake.requests]
    assert any(r.status == 429 for r in fake.requests)
    # every request carries the same system prefix, marked for caching
    prefixes = {str(b["system"][0]["text"]) for b in bodies}  # type: ignore[index]
    assert len(prefixes) == 1
    assert all(b["system"][0].get("cache_control") for b in bodies)  # type: ignore[index,union-attr]
    git(repo, "fsck", "--no-progress")


async def test_retry_after_above_the_cap_is_capped(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    fake = FakeAnthropic(writes_file("docs/x.md", "x\n"))
    fake.inject(rate_limited(retry_after_s=120.0), times=1)
    async with fake.serve():

        def factory(name: str) -> Model:
            return AnthropicModel(model=name, api_key="sk-test", base_url=fake.base_url)

        settings = Settings(repo=repo, sandbox="none", retry_after_cap_s=0.2)
        async with Orchestrator(settings, factory) as orch:
            started = anyio.current_time()
            spawned = await orch.spawn(SpawnRequest(tasks=[TaskSpec(prompt="go")]))
            status = await wait_until_final(orch, spawned.run_id)
            elapsed = anyio.current_time() - started
    assert status.runs[0].agents[0].status == AgentStatus.SUCCEEDED
    assert elapsed < 20  # the server asked for 120 s; the cap is 0.2 s


async def test_agents_that_meet_the_rate_limit_slow_down_together(tmp_path: Path) -> None:
    """Eight agents against an API that allows 4 requests a second (a bucket of 2): each refusal
    pauses every agent's next request and paces the rest, so none runs out of its attempts (2
    here) and the refusals stay few; each agent on its own would meet the limit again at every
    retry. The API answers in whole seconds, as the real one does."""
    repo = make_repo(tmp_path / "repo")
    limit = RequestRateLimit(240, burst=2)
    fake = FakeAnthropic(
        by_turn(tool_use("read_file", path="README.md"), finish("read")), rate_limit=limit
    )
    async with fake.serve():

        def factory(name: str) -> Model:
            return AnthropicModel(model=name, api_key="sk-test", base_url=fake.base_url)

        settings = Settings(repo=repo, sandbox="none", retry_max_attempts=2)
        async with Orchestrator(settings, factory) as orch:
            spawned = await orch.spawn(
                SpawnRequest(
                    tasks=[TaskSpec(prompt=f"read {i}", write_scope=[]) for i in range(8)],
                    max_concurrency=8,
                )
            )
            notes: set[str] = set()  # what status said of the rate limit, polled
            with anyio.fail_after(120):
                while True:
                    status = await orch.status(run_id=spawned.run_id)
                    if status.server.rate_limited:
                        notes.add(status.server.rate_limited)
                    if not any(a.status.active for a in status.runs[0].agents):
                        break
                    await anyio.sleep(0.05)
    agents = status.runs[0].agents
    assert [a.status for a in agents] == [AgentStatus.SUCCEEDED] * 8, [
        a.status_reason for a in agents
    ]
    answered = [r for r in fake.requests if r.status == 200]
    refused = [r for r in fake.requests if r.status == 429]
    assert len(answered) == 16
    assert 0 < len(refused) <= 12  # (the first burst meets the limit: 6; the pace then holds)
    # while it held requests back, status said so (the orchestrator: more agents would not help)
    assert notes and all("rate limit (429) holds requests back" in n for n in notes)
    assert any(f"to {settings.model} waiting" in n for n in notes)
