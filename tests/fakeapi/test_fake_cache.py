"""Prompt-cache accounting: unit rules, and the usage the real client reads back."""

from __future__ import annotations

from typing import Any

import anthropic
import anyio
import pytest
from anthropic.types import MessageParam, TextBlockParam, ToolParam

from fakeapi import (
    CacheRequestError,
    Charge,
    FakeAnthropic,
    PromptCache,
    count_input_tokens,
    estimate_tokens,
    min_cacheable_tokens,
)

MODEL = "claude-test"
EPHEMERAL: dict[str, str] = {"type": "ephemeral"}
PREFIX = "shared prefix " * 400  # about 1,400 tokens: above the default minimum of 1,024


def charged(cache: PromptCache, request: dict[str, Any]) -> Charge:
    """Charge a request whose response then begins (what it wrote becomes readable)."""
    charge = cache.charge(request)
    cache.publish(charge)
    return charge


def body(
    *,
    marks: tuple[str, ...] = ("system",),
    turns: int = 1,
    model: str = MODEL,
    ttl: str | None = None,
) -> dict[str, Any]:
    """A request with a long system prefix, `turns` user/assistant exchanges, marked as asked."""
    system: list[dict[str, Any]] = [
        {"type": "text", "text": PREFIX},
        {"type": "text", "text": "task text"},
    ]
    if "system" in marks:
        system[0]["cache_control"] = EPHEMERAL if ttl is None else {**EPHEMERAL, "ttl": ttl}
    messages: list[dict[str, Any]] = []
    for i in range(turns):
        messages.append(
            {"role": "user", "content": [{"type": "text", "text": f"question {i} " * 40}]}
        )
        messages.append({"role": "assistant", "content": [{"type": "text", "text": f"answer {i}"}]})
    messages.append({"role": "user", "content": [{"type": "text", "text": "last " * 30}]})
    if "last" in marks:
        messages[-1]["content"][-1]["cache_control"] = EPHEMERAL
    result: dict[str, Any] = {"model": model, "system": system, "messages": messages}
    if "top" in marks:
        result["cache_control"] = EPHEMERAL
    return result


def test_estimate_tokens_is_a_quarter_of_the_characters_rounded_up() -> None:
    assert [estimate_tokens("x" * n) for n in (0, 1, 4, 5, 400)] == [0, 1, 1, 2, 100]


def test_no_marks_no_caching() -> None:
    cache = PromptCache()
    charge = cache.charge(body(marks=()))
    assert charge.cache_creation_input_tokens == charge.cache_read_input_tokens == 0
    assert charge.input_tokens == count_input_tokens(body(marks=()))
    assert len(cache) == 0


def test_first_request_writes_the_prefix_the_second_reads_it() -> None:
    cache = PromptCache()
    first = charged(cache, body())
    second = charged(cache, body())
    assert first.cache_creation_input_tokens > 0 and first.cache_read_input_tokens == 0
    assert second.cache_read_input_tokens == first.cache_creation_input_tokens
    assert second.cache_creation_input_tokens == 0
    assert first.total_input == second.total_input == count_input_tokens(body())


def test_the_prefix_is_per_model() -> None:
    cache = PromptCache()
    charged(cache, body())
    assert charged(cache, body(model="other-model")).cache_read_input_tokens == 0


def test_incremental_conversation_caching_reads_the_earlier_turn() -> None:
    """Turn 2 marks a later block; the prefix marked in turn 1 is found by the lookback."""
    cache = PromptCache()
    turn1 = charged(cache, body(marks=("system", "last"), turns=1))
    grown = body(marks=("system", "last"), turns=1)
    grown["messages"] += [
        {"role": "assistant", "content": [{"type": "text", "text": "more"}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "again", "cache_control": EPHEMERAL}],
        },
    ]
    del grown["messages"][2]["content"][-1]["cache_control"]  # the old mark moved to the end
    turn2 = charged(cache, grown)
    assert (
        turn2.cache_read_input_tokens
        == turn1.cache_read_input_tokens + turn1.cache_creation_input_tokens
    )
    assert turn2.cache_creation_input_tokens > 0
    assert turn2.input_tokens == 0


def test_top_level_cache_control_marks_the_last_block() -> None:
    cache = PromptCache()
    first = charged(cache, body(marks=("top",)))
    assert first.input_tokens == 0 and first.cache_creation_input_tokens == first.total_input
    assert charged(cache, body(marks=("top",))).cache_read_input_tokens == first.total_input


def test_entries_expire_after_the_ttl() -> None:
    now = [0.0]
    cache = PromptCache(ttl_s=300, clock=lambda: now[0])
    charged(cache, body())
    now[0] = 299.0
    assert charged(cache, body()).cache_read_input_tokens > 0  # a read refreshes the entry
    now[0] = 598.0
    assert charged(cache, body()).cache_read_input_tokens > 0
    now[0] = 899.0
    assert charged(cache, body()).cache_read_input_tokens == 0


def test_an_entry_is_readable_only_once_its_writers_response_has_begun() -> None:
    cache = PromptCache()
    first = cache.charge(body())
    second = cache.charge(body())  # left together with the first: both write
    assert first.cache_creation_input_tokens == second.cache_creation_input_tokens > 0
    assert second.cache_read_input_tokens == 0
    cache.publish(first)
    third = cache.charge(body())
    assert third.cache_read_input_tokens == first.cache_creation_input_tokens
    assert third.cache_creation_input_tokens == 0


def test_a_write_whose_response_never_began_is_never_readable() -> None:
    cache = PromptCache()
    cache.charge(body())  # e.g. the request failed before its response began
    assert cache.charge(body()).cache_read_input_tokens == 0
    assert len(cache) == 0


def test_a_prefix_below_the_models_minimum_is_not_cached() -> None:
    short = body()
    short["system"][0]["text"] = "shared prefix " * 200  # about 700 tokens
    cache = PromptCache()
    for _ in range(2):
        charge = charged(cache, short)
        assert charge.cache_creation_input_tokens == charge.cache_read_input_tokens == 0
        assert charge.input_tokens == count_input_tokens(short)
    # families differ, and a test may set its own floor
    assert min_cacheable_tokens("claude-haiku-4-5-20251001") == 4096
    assert min_cacheable_tokens("claude-sonnet-4-5") == 1024
    assert charged(cache, body(model="claude-haiku-4-5")).cache_creation_input_tokens == 0
    lower = PromptCache(min_tokens={MODEL: 512})
    assert charged(lower, short).cache_creation_input_tokens > 0
    assert charged(lower, short).cache_read_input_tokens > 0


def test_a_one_hour_entry_outlives_five_minutes_and_is_reported_apart() -> None:
    now = [0.0]
    cache = PromptCache(clock=lambda: now[0])
    first = charged(cache, body(ttl="1h"))
    assert first.cache_creation_1h_input_tokens == first.cache_creation_input_tokens > 0
    assert first.cache_creation_5m_input_tokens == 0
    now[0] = 3000.0
    assert charged(cache, body(ttl="1h")).cache_read_input_tokens > 0
    now[0] = 3000.0 + 3601.0
    assert charged(cache, body(ttl="1h")).cache_read_input_tokens == 0


def test_a_one_hour_mark_after_a_five_minute_mark_is_refused() -> None:
    request = body(marks=("system", "last"), ttl="5m")
    request["messages"][-1]["content"][-1]["cache_control"] = {**EPHEMERAL, "ttl": "1h"}
    with pytest.raises(CacheRequestError, match="1h"):
        PromptCache().charge(request)
    mixed = body(marks=("system", "last"), ttl="1h")  # 1h first, then 5m: allowed
    charge = charged(PromptCache(), mixed)
    assert 0 < charge.cache_creation_1h_input_tokens < charge.cache_creation_input_tokens
    with pytest.raises(CacheRequestError, match="ttl"):
        PromptCache().charge(body(ttl="2h"))


@pytest.mark.anyio
async def test_the_client_sees_cache_creation_then_cache_reads() -> None:
    system: list[TextBlockParam] = [
        {
            "type": "text",
            "text": "You are a careful engineer. " * 200,
            "cache_control": {"type": "ephemeral"},
        },
        {"type": "text", "text": "Your task: alpha."},
    ]
    tools: list[ToolParam] = [
        {
            "name": "finish",
            "description": "Finish.",
            "input_schema": {"type": "object", "properties": {"summary": {"type": "string"}}},
            "cache_control": {"type": "ephemeral"},
        }
    ]
    messages: list[MessageParam] = [{"role": "user", "content": "go"}]
    with anyio.fail_after(15):
        async with (
            FakeAnthropic().serve() as fake,
            anthropic.AsyncAnthropic(base_url=fake.base_url, api_key="t", max_retries=0) as client,
        ):
            first = await client.messages.create(
                model=MODEL, max_tokens=32, system=system, tools=tools, messages=messages
            )
            second = await client.messages.create(
                model=MODEL, max_tokens=32, system=system, tools=tools, messages=messages
            )
    assert first.usage.cache_creation_input_tokens and first.usage.cache_creation_input_tokens > 0
    assert first.usage.cache_read_input_tokens == 0
    assert second.usage.cache_read_input_tokens == first.usage.cache_creation_input_tokens
    assert second.usage.cache_creation_input_tokens == 0
    assert second.usage.input_tokens == first.usage.input_tokens > 0
    logged = fake.requests[1].usage
    assert (
        logged is not None
        and logged.cache_read_input_tokens == second.usage.cache_read_input_tokens
    )


@pytest.mark.anyio
async def test_requests_that_leave_together_all_pay_the_write_over_http() -> None:
    """The second request arrives while the first is still being answered: no read for it; a
    third, sent after the first's response began, reads. The 1-hour part is in the usage."""
    system: list[TextBlockParam] = [
        {"type": "text", "text": PREFIX, "cache_control": {"type": "ephemeral", "ttl": "1h"}}
    ]
    messages: list[MessageParam] = [{"role": "user", "content": "go"}]
    with anyio.fail_after(15):
        async with (
            FakeAnthropic(latency_s=0.3).serve() as fake,
            anthropic.AsyncAnthropic(base_url=fake.base_url, api_key="t", max_retries=0) as client,
        ):

            async def ask() -> anthropic.types.Message:
                return await client.messages.create(
                    model=MODEL, max_tokens=32, system=system, messages=messages
                )

            together: list[anthropic.types.Message] = []

            async def collect() -> None:
                together.append(await ask())

            async with anyio.create_task_group() as tg:
                tg.start_soon(collect)
                tg.start_soon(collect)
            later = await ask()
    writes = [m.usage.cache_creation_input_tokens for m in together]
    assert writes[0] == writes[1] and writes[0] and writes[0] > 0
    assert all(m.usage.cache_read_input_tokens == 0 for m in together)
    creation = together[0].usage.cache_creation
    assert creation is not None and creation.ephemeral_1h_input_tokens == writes[0]
    assert creation.ephemeral_5m_input_tokens == 0
    assert later.usage.cache_read_input_tokens == writes[0]


@pytest.mark.anyio
async def test_more_than_four_breakpoints_is_a_bad_request() -> None:
    marked: list[TextBlockParam] = [
        {"type": "text", "text": f"part {i}", "cache_control": {"type": "ephemeral"}}
        for i in range(5)
    ]
    with anyio.fail_after(15):
        async with (
            FakeAnthropic().serve() as fake,
            anthropic.AsyncAnthropic(base_url=fake.base_url, api_key="t", max_retries=0) as client,
        ):
            with pytest.raises(anthropic.BadRequestError, match="maximum of 4 blocks"):
                await client.messages.create(
                    model=MODEL,
                    max_tokens=32,
                    system=marked,
                    messages=[{"role": "user", "content": "x"}],
                )
