"""AnthropicModel against the fake Messages API over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncGenerator, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import anthropic._base_client as anthropic_base_client
import anyio
import pytest

from fakeapi import (
    FakeAnthropic,
    FakeRequest,
    Fault,
    Handler,
    Malformed,
    Reply,
    Stall,
    StreamError,
    api_error,
    by_turn,
    echo,
    overloaded,
    rate_limited,
    server_error,
    text,
    tool_use,
)
from orchestration.config import Settings
from orchestration.errors import (
    ConfigError,
    ModelConnectionError,
    ModelError,
    ModelFatalError,
    ModelOverloaded,
    ModelRateLimited,
    ModelResponseError,
    ModelTimeout,
)
from orchestration.model import (
    Message,
    ModelRequest,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
    Usage,
)
from orchestration.providers import anthropic as anthropic_provider
from orchestration.providers.anthropic import AnthropicModel
from orchestration.retry import RetryPolicy, call_with_retry
from toolbus.toolspec import ToolSpec

pytestmark = pytest.mark.anyio

KEY = "sk-test-provider-key-0123456789"
# above the API's minimum cacheable length
PREFIX = "You are one of a team of engineers. Shared conventions follow. " * 80
TOOLS = [
    ToolSpec(
        name="write_file",
        description="Write a file.",
        input_schema={
            "type": "object",
            "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
        },
    ),
    ToolSpec(
        name="finish",
        description="Finish.",
        input_schema={"type": "object", "properties": {"summary": {"type": "string"}}},
    ),
]


def request(
    messages: list[Message] | None = None, *, max_tokens: int = 1024, task: str = "task: alpha"
) -> ModelRequest:
    return ModelRequest(
        model="claude-test",
        system_prefix=PREFIX,
        system_task=task,
        tools=TOOLS,
        messages=messages or [Message(role="user", content=[TextBlock(text="begin")])],
        max_tokens=max_tokens,
    )


@pytest.fixture(autouse=True, params=["aiohttp", "httpx"])
def http_client(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs over both of the SDK's HTTP transports (the default is switched)."""
    kind = cast(str, request.param)
    monkeypatch.setattr(anthropic_provider, "DEFAULT_HTTP_CLIENT", kind)
    return kind


@asynccontextmanager
async def served(
    handler: Handler = echo, **model_options: Any
) -> AsyncGenerator[tuple[FakeAnthropic, AnthropicModel]]:
    with anyio.fail_after(15):
        async with FakeAnthropic(handler).serve() as fake:
            options: dict[str, Any] = {"api_key": KEY, "timeout_s": 5.0, **model_options}
            model = AnthropicModel("claude-test", base_url=fake.base_url, **options)
            async with model:
                yield fake, model


def blocks(value: Any) -> list[dict[str, Any]]:
    return cast(list[dict[str, Any]], value)


async def test_a_multi_turn_tool_loop() -> None:
    def final(req: FakeRequest) -> Reply:
        [result] = req.tool_results
        return text(f"result was {result.content!r}, error={result.is_error}")

    script = by_turn(tool_use("write_file", path="a.py", content="A = 1\n"), final)
    async with served(script) as (fake, model):
        messages = [Message(role="user", content=[TextBlock(text="begin")])]
        first = await model.complete(request(messages))
        assert first.stop_reason == "tool_use" and first.model == "claude-test"
        [use] = first.tool_uses
        assert (use.name, use.input) == ("write_file", {"path": "a.py", "content": "A = 1\n"})
        messages += [
            Message(role="assistant", content=list(first.content)),
            Message(
                role="user",
                content=[ToolResultBlock(tool_use_id=use.id, content="refused", is_error=True)],
            ),
        ]
        second = await model.complete(request(messages))
    assert second.stop_reason == "end_turn"
    assert second.text == "result was 'refused', error=True"
    assert second.usage.cache_read_tokens > 0 and second.usage.output_tokens > 0
    sent = fake.requests[1].body
    assert blocks(sent["messages"])[1]["content"] == [
        {"type": "tool_use", "id": use.id, "name": "write_file", "input": use.input}
    ]
    assert not any(r.stream for r in fake.requests)


async def test_what_the_provider_sends_system_tools_and_cache_breakpoints() -> None:
    async with served() as (fake, model):
        messages = [
            Message(role="user", content=[TextBlock(text="begin")]),
            Message(role="assistant", content=[ToolUseBlock(id="t1", name="finish", input={})]),
            Message(
                role="user",
                content=[
                    ToolResultBlock(tool_use_id="t1", content="no"),
                    TextBlock(text="try again"),
                ],
            ),
        ]
        await model.complete(request(messages, max_tokens=777))
    body = fake.requests[0].body
    assert body["model"] == "claude-test" and body["max_tokens"] == 777
    assert body["system"] == [
        {"type": "text", "text": PREFIX, "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "task: alpha"},
    ]
    tools = blocks(body["tools"])
    assert [t["name"] for t in tools] == ["write_file", "finish"]
    assert "cache_control" not in tools[0]
    assert tools[1]["cache_control"] == {"type": "ephemeral"}
    assert tools[1]["input_schema"] == TOOLS[1].input_schema
    sent = blocks(body["messages"])
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[2]["content"] == [
        {"type": "tool_result", "tool_use_id": "t1", "content": "no", "is_error": False},
        {"type": "text", "text": "try again", "cache_control": {"type": "ephemeral"}},
    ]
    assert sent[0]["content"] == [{"type": "text", "text": "begin"}]
    marks = str(body).count("'cache_control'")
    assert marks == 3
    assert KEY not in str(fake.requests[0].headers)


@pytest.mark.parametrize("tools", [TOOLS, []], ids=["tools", "no-tools"])
async def test_a_call_sends_what_the_sdk_create_sends(tools: list[ToolSpec]) -> None:
    """The provider serializes the body itself and posts it through the SDK's client: the API
    gets the body and headers that the SDK's `messages.create` sends for the same call."""
    asked = request(
        [
            Message(role="user", content=[TextBlock(text="begin \u00e9\u4e2d")]),
            Message(
                role="assistant",
                content=[ToolUseBlock(id="t1", name="write_file", input={"path": "a", "n": 1.5})],
            ),
            Message(role="user", content=[ToolResultBlock(tool_use_id="t1", content="ok")]),
        ],
        max_tokens=555,
    ).model_copy(update={"tools": tools})
    async with served() as (fake, model):
        ours = await model.complete(asked)
        system, api_tools, messages = anthropic_provider.to_api_request(asked)
        theirs = await model._client.messages.create(  # pyright: ignore[reportPrivateUsage]
            model="claude-test",
            max_tokens=asked.max_tokens,
            system=system,
            tools=api_tools or anthropic_provider.anthropic.omit,
            messages=messages,
        )
    mine, sdk = fake.requests[0], fake.requests[1]
    assert mine.body == sdk.body
    assert ("tools" in mine.body) is bool(tools)
    assert mine.headers == sdk.headers
    assert mine.headers["content-type"] == "application/json"
    converted = anthropic_provider.from_api_message(theirs)
    assert (ours.content, ours.stop_reason, ours.model) == (
        converted.content,
        converted.stop_reason,
        converted.model,
    )

    # the second call read from the cache what the first wrote: the same input, counted apart
    def whole_input(usage: Usage) -> int:
        return usage.input_tokens + usage.cache_read_tokens + usage.cache_write_tokens

    assert whole_input(ours.usage) == whole_input(converted.usage)
    assert ours.usage.output_tokens == converted.usage.output_tokens


@pytest.mark.parametrize(
    "answer",
    [
        b'{"content": [{"type": "text"}], "usage": {"input_tokens": 1, "output_tokens": 1},'
        b' "model": "m"}',
        b'{"content": [{"type": "tool_use", "name": "x", "input": {}}],'
        b' "usage": {"input_tokens": 1, "output_tokens": 1}, "model": "m"}',
        b'{"content": [{"type": "tool_use", "id": "t", "name": "x", "input": [1]}],'
        b' "usage": {"input_tokens": 1, "output_tokens": 1}, "model": "m"}',
        b'{"content": [], "usage": {"input_tokens": "many", "output_tokens": 1}, "model": "m"}',
        b'{"content": [], "model": "m"}',
        b'{"content": "text", "usage": {"input_tokens": 1, "output_tokens": 1}, "model": "m"}',
        b"[]",
    ],
    ids=[
        "text-without-text",
        "tool-without-id",
        "input-not-object",
        "usage-type",
        "no-usage",
        "content-not-list",
        "not-object",
    ],
)
async def test_a_malformed_answer_is_a_response_error(
    answer: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with served() as (_, model):

        async def post(*args: object, **kwargs: object) -> bytes:
            return answer

        monkeypatch.setattr(model._client, "post", post)  # pyright: ignore[reportPrivateUsage]
        with pytest.raises(ModelResponseError, match=r"malformed|without|not a JSON object"):
            await model.complete(request())


async def test_large_max_tokens_streams() -> None:
    content = "x = 1\n" * 50
    script = by_turn(tool_use("write_file", path="big.py", content=content))
    async with served(script) as (fake, model):
        answer = await model.complete(request(max_tokens=32_000))
    assert fake.requests[0].stream
    assert answer.tool_uses[0].input == {"path": "big.py", "content": content}
    assert answer.usage.output_tokens == fake.requests[0].output_tokens


async def test_stream_threshold_zero_always_streams() -> None:
    async with served(stream_threshold=0) as (fake, model):
        answer = await model.complete(request(max_tokens=100))
    assert fake.requests[0].stream and answer.text == "echo: begin"


@pytest.mark.parametrize("http_client", ["aiohttp", "httpx"])
async def test_a_signalled_call_says_when_its_request_leaves_and_its_response_begins(
    http_client: str,
) -> None:
    """`on_sent` is called once per attempt as the HTTP client takes the request (before the
    fake receives it), `on_start` once the response begins; other calls call neither."""
    events: list[tuple[str, int]] = []
    fake_box: list[FakeAnthropic] = []

    def seen(what: str) -> Callable[[], None]:
        return lambda: events.append((what, len(fake_box[0].requests)))

    async with served(http_client=http_client) as (fake, model):
        fake_box.append(fake)
        fake.inject(overloaded(), times=1)
        with pytest.raises(ModelOverloaded):
            await model.complete_signalled(request(), seen("start"), on_sent=seen("sent"))
        answer = await model.complete_signalled(request(), seen("start"), on_sent=seen("sent"))
        await model.complete(request())
    assert answer.text == "echo: begin"
    assert events == [("sent", 0), ("sent", 1), ("start", 2)]


async def test_cache_tokens_are_recorded() -> None:
    async with served() as (_, model):
        first = await model.complete(request())
        second = await model.complete(request(task="task: beta"))  # same prefix, other agent
        again = await model.complete(request())
    assert first.usage.cache_write_tokens > 0 and first.usage.cache_read_tokens == 0
    # tools + system prefix are shared: the other agent reads them from the cache
    assert second.usage.cache_read_tokens > 0
    assert again.usage.cache_read_tokens == first.usage.cache_write_tokens
    assert again.usage.cache_write_tokens == 0


async def test_a_growing_conversation_reads_the_previous_turn_from_the_cache() -> None:
    async with served() as (_, model):
        messages = [Message(role="user", content=[TextBlock(text="begin " * 100)])]
        first = await model.complete(request(messages))
        messages += [
            Message(role="assistant", content=list(first.content)),
            Message(role="user", content=[TextBlock(text="next")]),
        ]
        second = await model.complete(request(messages))
    assert second.usage.cache_read_tokens == first.usage.cache_write_tokens
    assert second.usage.cache_write_tokens > 0


async def test_refusal_is_returned_as_a_stop_reason() -> None:
    async with served(by_turn(text("I can't help with that.", stop_reason="refusal"))) as (_, m):
        answer = await m.complete(request())
    assert answer.stop_reason == "refusal"


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
@pytest.mark.parametrize(
    ("fault", "error", "retry_after"),
    [
        (rate_limited(7), ModelRateLimited, 7.0),
        (rate_limited(3, ms_header=False), ModelRateLimited, 3.0),
        (rate_limited(None), ModelRateLimited, None),
        (overloaded(), ModelOverloaded, None),
        (server_error(), ModelOverloaded, None),
        (server_error(503), ModelOverloaded, None),
        (Stall(600), ModelTimeout, None),
        (Malformed(), ModelResponseError, None),
        (StreamError("overloaded_error"), ModelOverloaded, None),
        (StreamError("rate_limit_error"), ModelRateLimited, None),
        (api_error(401, "authentication_error", "invalid x-api-key"), ModelFatalError, None),
        (api_error(403, "permission_error", "forbidden"), ModelFatalError, None),
        (api_error(400, "invalid_request_error", "bad"), ModelFatalError, None),
        (api_error(404, "not_found_error", "no such model"), ModelFatalError, None),
    ],
    ids=[
        "429-ms",
        "429-s",
        "429-bare",
        "529",
        "500",
        "503",
        "stall",
        "malformed",
        "stream-overloaded",
        "stream-rate-limit",
        "401",
        "403",
        "400",
        "404",
    ],
)
async def test_each_fault_maps_to_its_model_error(
    fault: Fault, error: type[ModelError], retry_after: float | None, stream: bool
) -> None:
    threshold = 0 if stream else 1_000_000
    async with served(timeout_s=0.3, stream_threshold=threshold) as (fake, model):
        fake.inject(fault)
        with pytest.raises(ModelError) as caught:
            await model.complete(request())
        assert (await model.complete(request())).text == "echo: begin"
    assert type(caught.value) is error
    assert caught.value.retryable is (error is not ModelFatalError)
    assert caught.value.retry_after_s == retry_after
    assert KEY not in str(caught.value)


@pytest.mark.parametrize(
    ("status", "kind", "says"),
    [
        (401, "authentication_error", "set ANTHROPIC_API_KEY where the server starts"),
        (403, "permission_error", "may not use this model or feature"),
        (404, "not_found_error", "check the model (FANOUT_MODEL"),
    ],
)
async def test_a_refusal_every_agent_meets_alike_says_what_to_fix(
    status: int, kind: str, says: str
) -> None:
    """The server's key refused, a model unknown: each agent that meets it is told what to
    fix, since rerunning it alone fails the same way; an invalid request of its own is not."""
    async with served() as (fake, model):
        fake.inject(api_error(status, kind, "no"))
        fake.inject(api_error(400, "invalid_request_error", "bad"))
        with pytest.raises(ModelFatalError) as refused:
            await model.complete(request())
        with pytest.raises(ModelFatalError) as invalid:
            await model.complete(request())
    assert says in str(refused.value)
    assert "a rerun fails the same way" in str(refused.value)
    assert "rerun" not in str(invalid.value)


async def test_an_unreachable_api_is_a_connection_error() -> None:
    async with AnthropicModel("claude-test", api_key=KEY, base_url="http://127.0.0.1:9") as model:
        with anyio.fail_after(10), pytest.raises(ModelConnectionError, match="could not reach"):
            await model.complete(request())


async def test_the_key_never_shows_in_errors_or_repr() -> None:
    echoing = api_error(401, "authentication_error", f"invalid x-api-key {KEY}")
    async with served() as (fake, model):
        fake.inject(echoing)
        with pytest.raises(ModelFatalError) as caught:
            await model.complete(request())
        assert KEY not in repr(model) and KEY not in str(vars(model))
    assert KEY not in str(caught.value) and "***" in str(caught.value)


async def test_retry_recovers_from_429_and_529() -> None:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    async with served() as (fake, model):
        fake.inject(rate_limited(0.05))
        fake.inject(overloaded())
        req = request()
        answer = await call_with_retry(
            lambda: model.complete(req), RetryPolicy(jitter=False, base_delay_s=0.01), sleep=sleep
        )
    assert answer.text == "echo: begin"
    assert [r.status for r in fake.requests] == [429, 529, 200]
    assert waits == [0.05, 0.02]  # retry-after honoured, then plain backoff


async def test_retry_after_above_the_cap_is_capped() -> None:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    policy = RetryPolicy(jitter=False, base_delay_s=0.01, max_delay_s=0.1, retry_after_cap_s=0.5)
    async with served() as (fake, model):
        fake.inject(rate_limited(120), times=2)
        req = request()
        answer = await call_with_retry(lambda: model.complete(req), policy, sleep=sleep)
    assert answer.text == "echo: begin"
    assert waits == [0.5, 0.5]


async def test_retries_exhausted_surface_the_last_error() -> None:
    async with served() as (fake, model):
        fake.inject(overloaded(), times=3)
        req = request()
        with pytest.raises(ModelOverloaded, match="gave up after 3 attempts"):
            await call_with_retry(
                lambda: model.complete(req),
                RetryPolicy(max_attempts=3, base_delay_s=0.001, jitter=False),
            )
    assert len(fake.requests) == 3


def test_a_missing_key_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY") as caught:
        AnthropicModel("claude-test")
    assert "ScriptedModel" in str(caught.value)


async def test_environment_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    with anyio.fail_after(15):
        async with FakeAnthropic().serve() as fake:
            monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
            monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
            async with AnthropicModel("claude-test") as model:
                assert model.base_url == fake.base_url
                assert (await model.complete(request())).text == "echo: begin"


async def test_the_chosen_transport_is_the_one_used(http_client: str) -> None:
    async with served() as (fake, model):
        assert model.http_client == http_client
        transport = model._client._client._transport  # pyright: ignore[reportPrivateUsage]
        expected = "AiohttpTransport" if http_client == "aiohttp" else "AsyncHTTPTransport"
        assert type(transport).__name__ == expected
        assert (await model.complete(request())).text == "echo: begin"
        assert len(fake.requests) == 1


async def test_first_requests_at_once_look_up_no_platform(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the SDK looks the platform up on a client's first request, in a worker thread: every
    # request that leaves before the lookup ends makes its own; the provider gives it instead
    real = anthropic_base_client.get_platform
    looked_up: list[str] = []

    def counted() -> anthropic_base_client.Platform:
        looked_up.append(threading.current_thread().name)
        return real()

    async with served() as (fake, model):
        monkeypatch.setattr(anthropic_base_client, "get_platform", counted)
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(model.complete, request())
    assert looked_up == []
    assert [r.headers.get("x-stainless-os") for r in fake.requests] == [str(real())] * 4


def test_an_unknown_transport_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="FANOUT_HTTP_CLIENT"):
        Settings.from_env({"FANOUT_HTTP_CLIENT": "curl"})


def _whole_body(asked: ModelRequest, model: str) -> bytes:
    """The body built whole from `to_api_request`, serialized as the SDK does."""
    system, tools, messages = anthropic_provider.to_api_request(asked)
    body: dict[str, Any] = {
        "max_tokens": asked.max_tokens,
        "messages": messages,
        "model": model,
        "system": system,
    }
    if tools:
        body["tools"] = tools
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def test_the_kept_json_of_requests_is_the_whole_body_byte_for_byte() -> None:
    """A conversation grows turn by turn (the moving breakpoint with it), with and without a
    prefix, tools, a task; agents share tools and prefix. At each call the body made from the
    kept parts is the one built whole."""
    wire = anthropic_provider._WireCache()  # pyright: ignore[reportPrivateUsage]
    history: list[Message] = [Message(role="user", content=[TextBlock(text='begin \u00e9 "q"')])]
    turns: list[list[Message]] = [
        [
            Message(
                role="assistant",
                content=[
                    ToolUseBlock(
                        id="t1", name="write_file", input={"path": "a\\b", "n": [1, 2.5, None]}
                    )
                ],
            )
        ],
        [
            Message(
                role="user",
                content=[
                    ToolResultBlock(tool_use_id="t1", content="ok \u4e2d", is_error=True),
                    TextBlock(text=""),
                ],
            )
        ],
        [Message(role="assistant", content=[TextBlock(text="")])],
        [
            Message(role="user", content=[TextBlock(text="more")]),
            Message(role="assistant", content=[TextBlock(text="done")]),
        ],
    ]
    shapes: list[dict[str, object]] = [
        {"tools": TOOLS},
        {"tools": [], "system_prefix": ""},
        {"tools": TOOLS[:1], "system_task": "", "cache_ttl": "1h"},
        {"tools": TOOLS, "system_task": "another agent's task"},  # the first one's shared part
    ]
    for turn in turns:
        history = [*history, *turn]
        for agent, shape in enumerate(shapes):
            asked = request(list(history), max_tokens=100 + agent).model_copy(update=shape)
            for _ in range(2):  # the second from what the first kept
                assert wire.body(asked, "claude-test") == _whole_body(asked, "claude-test")
