"""The run writes its shared prefix to the prompt cache once, against the fake Messages API
(whose cache makes an entry readable only once its writer's response has begun), and says how
its prefix is cached, or that caching does not apply."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from fakeapi import FakeAnthropic, LoggedRequest, by_turn, finish, overloaded, tool_use
from orchestration.caching import PrefixWarmup, choose_ttl, min_cacheable_tokens
from orchestration.config import Settings
from orchestration.contracts import SharedContextSpec, SpawnRequest, TaskSpec, TokenUsage
from orchestration.model import Model
from orchestration.orchestrator import Orchestrator
from orchestration.providers.anthropic import AnthropicModel
from orchestration.runner import AgentRunner
from orchestration.state import StateStore
from tests.orchestration.scripts import make_repo
from tests.orchestration.test_orchestrator import wait_until_final

pytestmark = pytest.mark.anyio

AGENTS = 4
LATENCY_S = 0.3


def _handler() -> Any:
    return by_turn(tool_use("list_files", path="."), finish("looked around"))


def _first_requests(fake: FakeAnthropic) -> list[LoggedRequest]:
    """Each agent's first request (one user message), in arrival order."""
    return [
        r
        for r in fake.requests
        if r.status == 200 and len(r.body["messages"]) == 1  # type: ignore[arg-type]
    ]


@asynccontextmanager
async def _orchestrator(
    tmp_path: Path, fake: FakeAnthropic, **overrides: object
) -> AsyncGenerator[Orchestrator]:
    repo = make_repo(tmp_path / "repo")

    def factory(name: str) -> Model:
        return AnthropicModel(model=name, api_key="sk-test", base_url=fake.base_url)

    settings = Settings.model_validate(
        {"repo": repo, "sandbox": "none", "model": "claude-sonnet-5-5", **overrides}
    )
    async with Orchestrator(settings, factory) as orch:
        yield orch


async def _spawn(orch: Orchestrator) -> Any:
    """A run of `AGENTS` agents sharing a prefix long enough to be cached."""
    return await orch.spawn(
        SpawnRequest(
            tasks=[
                TaskSpec(prompt=f"TASK-{i}", name=f"t{i}", write_scope=[f"src/t{i}"])
                for i in range(AGENTS)
            ],
            shared_context=SharedContextSpec(plan="Plan step. " * 800),
            max_concurrency=AGENTS,
        )
    )


async def _spawn_and_wait(
    tmp_path: Path, fake: FakeAnthropic, **overrides: object
) -> tuple[Any, Any]:
    async with _orchestrator(tmp_path, fake, **overrides) as orch:
        spawned = await _spawn(orch)
        with anyio.fail_after(60):
            await wait_until_final(orch, spawned.run_id)
        status = await orch.status(run_id=spawned.run_id)
    return spawned, status.runs[0]


async def test_the_shared_prefix_is_written_once_and_read_by_the_others(tmp_path: Path) -> None:
    async with FakeAnthropic(_handler(), latency_s=LATENCY_S).serve() as fake:
        spawned, run = await _spawn_and_wait(tmp_path, fake)
    assert spawned.estimate.cache_ttl == "5m"
    assert "cached for 5m, written once" in spawned.estimate.prompt_cache
    firsts = _first_requests(fake)
    assert len(firsts) == AGENTS
    writes = [r.usage.cache_creation_input_tokens for r in firsts if r.usage]
    reads = [r.usage.cache_read_input_tokens for r in firsts if r.usage]
    # the first wrote the tools and the shared prefix; the others read them and wrote only
    # their own task and message
    assert reads[0] == 0 and all(r > 0 for r in reads[1:])
    assert all(w < writes[0] / 10 for w in writes[1:])
    # they left only once the first response began
    assert all(r.at - firsts[0].at >= LATENCY_S * 0.9 for r in firsts[1:])
    cache = run.prompt_cache
    assert cache is not None and cache.ttl == "5m"
    assert cache.first_byte_s is not None and cache.first_byte_s >= LATENCY_S * 0.9
    assert cache.held_s > 0 and "written once" in cache.note


async def test_without_the_warm_up_every_first_request_pays_the_write(tmp_path: Path) -> None:
    async with FakeAnthropic(_handler(), latency_s=LATENCY_S).serve() as fake:
        await _spawn_and_wait(tmp_path, fake, cache_warmup_max_s=0)
    firsts = _first_requests(fake)
    assert [r.usage.cache_read_input_tokens for r in firsts if r.usage] == [0] * AGENTS


async def test_a_failed_first_request_lets_the_others_go(tmp_path: Path) -> None:
    fake = FakeAnthropic(_handler(), latency_s=0.05)
    fake.inject(overloaded(), times=1)  # the first request of the run fails, then is retried
    async with fake.serve():
        _spawned, run = await _spawn_and_wait(tmp_path, fake, cache_warmup_max_s=20)
    assert run.totals.by_status == {"succeeded": AGENTS}
    assert run.prompt_cache is not None and run.prompt_cache.held_s < 10


async def test_a_prefix_below_the_minimum_is_said_not_to_be_cached(tmp_path: Path) -> None:
    async with FakeAnthropic(_handler(), latency_s=0.05).serve() as fake:
        spawned, run = await _spawn_and_wait(tmp_path, fake, cache_min_tokens=1_000_000)
    assert spawned.estimate.cache_ttl is None
    assert "does not apply" in spawned.estimate.prompt_cache
    assert run.prompt_cache is not None and run.prompt_cache.ttl is None
    assert "does not apply" in run.prompt_cache.note
    assert run.prompt_cache.first_byte_s is None  # no warm-up: nothing to write once


async def test_a_one_hour_prefix_is_asked_for_and_billed_at_its_price(tmp_path: Path) -> None:
    async with FakeAnthropic(_handler(), latency_s=0.05).serve() as fake:
        spawned, run = await _spawn_and_wait(tmp_path, fake, cache_ttl="1h")
    assert spawned.estimate.cache_ttl == "1h"
    body = fake.requests[0].body
    assert body["system"][0]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}  # type: ignore[index,call-overload]
    tokens: TokenUsage = run.totals.tokens
    assert 0 < tokens.cache_write_1h < tokens.cache_write
    # the budget settles each turn rounded to whole tokens; an agent's total rounds once
    turns = sum(a.turns for a in run.agents)
    billed = sum(a.tokens.billed_equivalent for a in run.agents)
    assert abs(run.totals.budget_used - billed) <= turns / 2 + len(run.agents) / 2
    assert run.totals.budget_used > 0
    # an hour's write costs 2x, five minutes' 1.25x
    assert TokenUsage(cache_write=10, cache_write_1h=10).billed_equivalent == 20
    assert TokenUsage(cache_write=100).billed_equivalent == 125


def test_the_lifetime_follows_what_the_run_is_expected_to_take() -> None:
    assert choose_ttl("auto", expected_s=60, has_waits=True) == "5m"
    assert choose_ttl("auto", expected_s=3_600, has_waits=False) == "5m"
    assert choose_ttl("auto", expected_s=900, has_waits=True) == "1h"
    assert choose_ttl("5m", expected_s=900, has_waits=True) == "5m"
    assert choose_ttl("1h", expected_s=1, has_waits=False) == "1h"
    assert min_cacheable_tokens("claude-haiku-4-5") == 4096
    assert min_cacheable_tokens("claude-sonnet-5-5") == 1024
    assert min_cacheable_tokens("claude-haiku-4-5", override=10) == 10


async def test_the_others_start_once_the_first_request_has_left() -> None:
    """The first agent to start goes on; the others wait in `before_start` until its request
    has left (`sent`), it waits for leases or ended (`starter_stops`), or its call failed;
    never longer than the warm-up's bound."""
    for opener in ("sent", "stops", "failed"):
        warmup = PrefixWarmup(5.0)
        await warmup.before_start("a1")  # the starter: at once
        started: list[str] = []

        async def start(
            agent: str, warmup: PrefixWarmup = warmup, started: list[str] = started
        ) -> None:
            await warmup.before_start(agent)
            started.append(agent)

        async with anyio.create_task_group() as tg:
            tg.start_soon(start, "a2")
            tg.start_soon(start, "a3")
            await anyio.sleep(0.05)
            assert started == []
            warmup.starter_stops("a2")  # not the starter: nothing changes
            warmup.starter_stops("a3")
            await anyio.sleep(0.05)
            assert started == []
            if opener == "sent":
                warmup.sent()
            elif opener == "stops":
                warmup.starter_stops("a1")
            else:
                release = await warmup.before_first_call()
                assert release is not None
                release(False)
        assert sorted(started) == ["a2", "a3"], opener
    bounded = PrefixWarmup(0.1)
    await bounded.before_start("a1")
    with anyio.fail_after(2):
        await bounded.before_start("a2")  # the starter never sends: the bound lets it go


def _when_sent(monkeypatch: pytest.MonkeyPatch, sent: Callable[[], None]) -> None:
    """Call `sent` whenever the provider hands a signalled request to its HTTP client."""
    plain = AnthropicModel.complete_signalled

    async def recording(
        self: AnthropicModel,
        request: Any,
        on_start: Callable[[], None],
        *,
        on_sent: Callable[[], None] | None = None,
    ) -> Any:
        def both() -> None:
            sent()
            if on_sent is not None:
                on_sent()

        return await plain(self, request, on_start, on_sent=both)

    monkeypatch.setattr(AnthropicModel, "complete_signalled", recording)


async def test_in_a_run_the_first_request_leaves_before_the_others_take_their_leases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent_at: list[float] = []
    _when_sent(monkeypatch, lambda: sent_at.append(time.time()))
    async with FakeAnthropic(_handler(), latency_s=LATENCY_S).serve() as fake:
        spawned, _run = await _spawn_and_wait(tmp_path, fake)
    store = StateStore(Path(spawned.repo) / ".git" / "fanout")
    leased = sorted(e.ts for e in store.events(run_id=spawned.run_id) if e.kind == "leased")
    assert len(sent_at) == 1 and len(leased) == AGENTS
    # the starter took its leases before its request left; every other agent after
    assert leased[0] < sent_at[0] <= leased[1], (sent_at, leased)


async def _run_noting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, label: str
) -> tuple[Any, list[tuple[str, str]]]:
    """A run of `AGENTS` agents, noting (label, agent) whenever `AgentRunner.<method>` (whose
    arguments begin with the context and the agent's runtime) starts, and ("sent", "") whenever a
    signalled request leaves: (spawned, notes)."""
    events: list[tuple[str, str]] = []
    plain = getattr(AgentRunner, method)

    async def noted(self: AgentRunner, ctx: Any, runtime: Any, *rest: Any) -> Any:
        events.append((label, runtime.agent_id))
        return await plain(self, ctx, runtime, *rest)

    _when_sent(monkeypatch, lambda: events.append(("sent", "")))
    monkeypatch.setattr(AgentRunner, method, noted)
    async with FakeAnthropic(_handler(), latency_s=LATENCY_S).serve() as fake:
        spawned, run = await _spawn_and_wait(tmp_path, fake)
    assert run.totals.by_status == {"succeeded": AGENTS}
    return spawned, events


async def test_the_others_tasks_start_only_once_the_first_request_has_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Until the run's first request has left, only its agent's task runs: the others' tasks
    would each take a turn of the event loop between its steps, for nothing but a wait."""
    spawned, events = await _run_noting(tmp_path, monkeypatch, "_agent_task", "task")
    first = spawned.agents[0].agent_id
    assert events[:2] == [("task", first), ("sent", "")], events
    assert sorted(e[1] for e in events[2:]) == sorted(a.agent_id for a in spawned.agents[1:])


async def test_a_run_cancelled_before_its_first_request_left_ends_every_agent(
    tmp_path: Path,
) -> None:
    async with (
        FakeAnthropic(_handler(), latency_s=LATENCY_S).serve() as fake,
        _orchestrator(tmp_path, fake) as orch,
    ):
        spawned = await _spawn(orch)
        await orch.cancel(spawned.run_id)  # at once: no request has left yet
        with anyio.fail_after(30):
            status = await wait_until_final(orch, spawned.run_id)
    assert status.runs[0].totals.by_status == {"cancelled": AGENTS}, status.runs[0].agents


async def test_the_first_agents_workspace_is_made_once_its_request_has_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Making the first workspace (the run's base with it) would delay the request every other
    agent waits for; the others make theirs while they wait."""
    spawned, events = await _run_noting(tmp_path, monkeypatch, "_prepare_workspace", "prepare")
    first = spawned.agents[0].agent_id
    assert events.index(("sent", "")) < events.index(("prepare", first)), events
    assert len([e for e in events if e[0] == "prepare"]) == AGENTS


async def test_a_first_agent_that_never_sends_is_not_held_for_the_warm_up(
    tmp_path: Path,
) -> None:
    """The first agent's loop ends before its request (the run's budget cannot cover a turn):
    its workspace is made and it ends at once, not after the warm-up's bound."""
    async with (
        FakeAnthropic(_handler(), latency_s=LATENCY_S).serve() as fake,
        _orchestrator(tmp_path, fake, cache_warmup_max_s=30) as orch,
    ):
        spawned = await orch.spawn(
            SpawnRequest(
                tasks=[TaskSpec(prompt="TASK", name="t0", write_scope=["src/t0"])],
                shared_context=SharedContextSpec(plan="Plan step. " * 800),
                budget_tokens=1_000,
            )
        )
        with anyio.fail_after(10):
            status = await wait_until_final(orch, spawned.run_id)
    (agent,) = status.runs[0].agents
    assert agent.status == "failed" and "budget" in (agent.status_reason or ""), agent
    assert agent.branch is not None  # its workspace was made
    assert not fake.requests
