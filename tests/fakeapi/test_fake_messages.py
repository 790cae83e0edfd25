"""The fake Messages API driven by the real `anthropic` client over HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager

import anthropic
import anyio
import pytest
from anthropic.types import MessageParam, ToolParam

from fakeapi import (
    FakeAnthropic,
    FakeRequest,
    Handler,
    Reply,
    ToolUse,
    by_key,
    by_turn,
    echo,
    finish,
    reply,
    text,
    tool_use,
    writes_file,
)

pytestmark = pytest.mark.anyio

MODEL = "claude-test"
TOOLS: list[ToolParam] = [
    {
        "name": "write_file",
        "description": "Write a file.",
        "input_schema": {
            "type": "object",
            "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
            "required": ["path", "content"],
        },
    }
]


@asynccontextmanager
async def serving(
    handler: Handler = echo,
    *,
    max_retries: int = 0,
    client_timeout_s: float = 5.0,
    latency_s: float = 0.0,
) -> AsyncGenerator[tuple[FakeAnthropic, anthropic.AsyncAnthropic]]:
    with anyio.fail_after(15):
        async with FakeAnthropic(handler, latency_s=latency_s).serve() as fake:
            client = anthropic.AsyncAnthropic(
                base_url=fake.base_url,
                api_key="test",
                max_retries=max_retries,
                timeout=client_timeout_s,
            )
            async with client:
                yield fake, client


def user(content: str) -> MessageParam:
    return {"role": "user", "content": content}


async def test_default_handler_echoes_and_ends_the_turn() -> None:
    async with serving() as (fake, client):
        message = await client.messages.create(
            model=MODEL, max_tokens=64, messages=[user("hello there")]
        )
    assert message.stop_reason == "end_turn"
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].type == "text" and message.content[0].text == "echo: hello there"
    assert message.model == MODEL
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    [logged] = fake.requests
    assert logged.status == 200 and logged.reply is not None
    assert logged.headers["content-type"] == "application/json"


async def test_multi_turn_tool_use_loop() -> None:
    seen_results: list[str] = []

    def after_write(request: FakeRequest) -> Reply:
        seen_results.extend(r.content for r in request.tool_results)
        return text("wrote a.py")

    script = by_turn(tool_use("write_file", path="a.py", content="x = 1\n"), after_write)
    async with serving(script) as (fake, client):
        messages: list[MessageParam] = [user("write a.py")]
        first = await client.messages.create(
            model=MODEL, max_tokens=256, tools=TOOLS, messages=messages
        )
        assert first.stop_reason == "tool_use"
        [call] = [b for b in first.content if b.type == "tool_use"]
        assert call.name == "write_file"
        assert call.input == {"path": "a.py", "content": "x = 1\n"}
        assert call.id.startswith("toolu_")
        messages.append({"role": "assistant", "content": first.content})
        messages.append(
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "ok"}],
            }
        )
        final = await client.messages.create(
            model=MODEL, max_tokens=256, tools=TOOLS, messages=messages
        )
    assert final.stop_reason == "end_turn"
    assert final.content[0].type == "text" and final.content[0].text == "wrote a.py"
    assert seen_results == ["ok"]
    assert [len(r.body["messages"]) for r in fake.requests] == [1, 3]  # pyright: ignore[reportArgumentType]


async def test_streaming_sends_tool_input_in_several_deltas() -> None:
    content = "line\n" * 40
    script = by_turn(
        reply("Writing it.", ToolUse("write_file", {"path": "b.py", "content": content}))
    )
    partials: list[str] = []
    event_types: list[str] = []
    async with (
        serving(script) as (fake, client),
        client.messages.stream(
            model=MODEL, max_tokens=256, tools=TOOLS, messages=[user("write b.py")]
        ) as stream,
    ):
        async for event in stream:
            event_types.append(event.type)
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                partials.append(event.delta.partial_json)
        final = await stream.get_final_message()
    assert len(partials) >= 2
    assert json.loads("".join(partials)) == {"path": "b.py", "content": content}
    assert final.stop_reason == "tool_use"
    assert final.content[0].type == "text" and final.content[0].text == "Writing it."
    tool = final.content[1]
    assert tool.type == "tool_use" and tool.input == {"path": "b.py", "content": content}
    assert event_types[0] == "message_start" and "message_stop" in event_types
    assert final.usage.output_tokens == fake.requests[0].output_tokens


async def test_count_tokens_matches_the_charged_input() -> None:
    async with serving() as (fake, client):
        counted = await client.messages.count_tokens(
            model=MODEL, messages=[user("count me " * 20)], tools=TOOLS
        )
        created = await client.messages.create(
            model=MODEL, max_tokens=16, messages=[user("count me " * 20)], tools=TOOLS
        )
    assert counted.input_tokens == created.usage.input_tokens > 0
    assert len(fake.requests) == 1  # count_tokens is logged apart from Messages requests
    assert [e.path for e in fake.log.entries(None)] == ["/v1/messages/count_tokens", "/v1/messages"]


async def test_latency_overlaps_across_concurrent_requests() -> None:
    count, latency = 8, 0.25
    async with serving(latency_s=latency) as (fake, client):

        async def one(i: int) -> None:
            await client.messages.create(model=MODEL, max_tokens=16, messages=[user(f"n{i}")])

        start = time.monotonic()
        async with anyio.create_task_group() as tg:
            for i in range(count):
                tg.start_soon(one, i)
        elapsed = time.monotonic() - start
    assert len(fake.requests) == count
    assert latency <= elapsed < count * latency / 2


async def test_keyed_scripts_give_each_agent_its_own_conversation() -> None:
    handler = by_key(
        {
            "task: alpha": writes_file("alpha.py", "A = 1\n", summary="alpha done"),
            "task: beta": writes_file("beta.py", "B = 2\n", summary="beta done"),
            "task: gamma": by_turn(finish("gamma had nothing to do"), "gamma idle"),
        }
    )
    async with serving(handler) as (_, client):

        async def agent(name: str, out: dict[str, list[str]]) -> None:
            messages: list[MessageParam] = [user("go")]
            calls: list[str] = []
            for _ in range(5):
                answer = await client.messages.create(
                    model=MODEL,
                    max_tokens=256,
                    system=f"You are an agent.\ntask: {name}",
                    messages=messages,
                )
                uses = [b for b in answer.content if b.type == "tool_use"]
                if not uses:
                    break
                calls.extend(f"{u.name}:{json.dumps(u.input, sort_keys=True)}" for u in uses)
                messages.append({"role": "assistant", "content": answer.content})
                messages.append(
                    {
                        "role": "user",
                        "content": [
                            {"type": "tool_result", "tool_use_id": u.id, "content": "ok"}
                            for u in uses
                        ],
                    }
                )
            out[name] = calls

        results: dict[str, list[str]] = {}
        async with anyio.create_task_group() as tg:
            for name in ("alpha", "beta", "gamma"):
                tg.start_soon(agent, name, results)
    assert results["alpha"] == [
        'write_file:{"content": "A = 1\\n", "path": "alpha.py"}',
        'finish:{"summary": "alpha done"}',
    ]
    assert results["beta"][0] == 'write_file:{"content": "B = 2\\n", "path": "beta.py"}'
    assert results["gamma"] == ['finish:{"summary": "gamma had nothing to do"}']


async def test_unknown_key_and_exhausted_script_answer_400_naming_the_problem() -> None:
    async with serving(by_key({"task: alpha": by_turn("only step")})) as (_, client):
        with pytest.raises(anthropic.BadRequestError, match="no fake script matches"):
            await client.messages.create(model=MODEL, max_tokens=16, messages=[user("task: zeta")])
        with pytest.raises(anthropic.BadRequestError, match="script exhausted: turn 1"):
            await client.messages.create(
                model=MODEL,
                max_tokens=16,
                messages=[
                    user("task: alpha"),
                    {"role": "assistant", "content": "only step"},
                    user("and?"),
                ],
            )


async def test_a_handler_that_raises_answers_500_and_is_logged() -> None:
    async def broken(request: FakeRequest) -> Reply:
        raise LookupError("no such step")

    async with serving(broken) as (fake, client):
        with pytest.raises(anthropic.InternalServerError, match="LookupError: no such step"):
            await client.messages.create(model=MODEL, max_tokens=16, messages=[user("x")])
    assert fake.requests[0].error == "LookupError: no such step"


async def test_request_validation_answers_400() -> None:
    async with serving() as (_, client):
        with pytest.raises(anthropic.BadRequestError, match="messages"):
            await client.messages.create(model=MODEL, max_tokens=16, messages=[])


def test_sync_mode_serves_a_sync_client() -> None:
    with FakeAnthropic(by_turn("from a thread")).running() as fake:
        with anthropic.Anthropic(base_url=fake.base_url, api_key="test", max_retries=0) as client:
            message = client.messages.create(model=MODEL, max_tokens=16, messages=[user("hi")])
        assert message.content[0].type == "text" and message.content[0].text == "from a thread"
        assert len(fake.requests) == 1
    with pytest.raises(RuntimeError, match="not serving"):
        _ = fake.base_url


def test_start_in_thread_and_stop() -> None:
    fake = FakeAnthropic().start_in_thread()
    try:
        with anthropic.Anthropic(base_url=fake.base_url, api_key="test", max_retries=0) as client:
            message = client.messages.create(model=MODEL, max_tokens=16, messages=[user("ping")])
        assert message.content[0].type == "text" and message.content[0].text == "echo: ping"
    finally:
        fake.stop()
