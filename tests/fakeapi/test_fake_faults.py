"""Injected faults surface as the real SDK's own errors; retry-after is honoured by its retries."""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncGenerator
from contextlib import AsyncExitStack, asynccontextmanager

import anthropic
import anyio
import pytest

from fakeapi import (
    ErrorReply,
    FakeAnthropic,
    Fault,
    FaultPlan,
    Malformed,
    RequestRateLimit,
    Stall,
    StreamError,
    api_error,
    overloaded,
    rate_limited,
    server_error,
)

pytestmark = pytest.mark.anyio

MODEL = "claude-test"


@asynccontextmanager
async def client_for(
    fake: FakeAnthropic, *, max_retries: int = 0, client_timeout_s: float = 5.0
) -> AsyncGenerator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(
        base_url=fake.base_url, api_key="test", max_retries=max_retries, timeout=client_timeout_s
    ) as client:
        yield client


async def ask(client: anthropic.AsyncAnthropic, *, stream: bool = False) -> str:
    """One request; returns the answer's text."""
    messages: list[anthropic.types.MessageParam] = [{"role": "user", "content": "hi"}]
    if stream:
        async with client.messages.stream(model=MODEL, max_tokens=32, messages=messages) as s:
            message = await s.get_final_message()
    else:
        message = await client.messages.create(model=MODEL, max_tokens=32, messages=messages)
    block = message.content[0]
    assert block.type == "text"
    return block.text


@pytest.mark.parametrize("ms_header", [True, False], ids=["retry-after-ms", "retry-after"])
async def test_429_retry_after_is_honoured_by_the_sdk(ms_header: bool) -> None:
    with anyio.fail_after(15):
        async with FakeAnthropic().serve() as fake, client_for(fake, max_retries=2) as client:
            fake.inject(rate_limited(0.2, ms_header=ms_header))
            start = time.monotonic()
            assert await ask(client) == "echo: hi"
            elapsed = time.monotonic() - start
    first, second = fake.requests
    assert first.status == 429 and second.status == 200
    assert second.at - first.at >= 0.2 and elapsed >= 0.2
    assert second.headers["x-stainless-retry-count"] == "1"


async def test_529_is_retried() -> None:
    quick_overload = ErrorReply(529, "overloaded_error", "Overloaded", retry_after_s=0.05)
    with anyio.fail_after(15):
        async with FakeAnthropic().serve() as fake, client_for(fake, max_retries=2) as client:
            fake.inject(quick_overload, times=2)
            assert await ask(client) == "echo: hi"
    assert [r.status for r in fake.requests] == [529, 529, 200]


async def test_error_bodies_have_the_api_shape() -> None:
    with anyio.fail_after(15):
        async with FakeAnthropic().serve() as fake, client_for(fake) as client:
            fake.inject(rate_limited(3))
            with pytest.raises(anthropic.RateLimitError) as caught:
                await ask(client)
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "Rate limited (fake)"},
    }
    assert caught.value.type == "rate_limit_error"
    assert caught.value.response.headers["retry-after"] == "3"
    assert caught.value.response.headers["retry-after-ms"] == "3000"


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (rate_limited(1), anthropic.RateLimitError),
        (overloaded(), anthropic.OverloadedError),
        (server_error(), anthropic.InternalServerError),
        (server_error(503), anthropic.ServiceUnavailableError),
        (api_error(401, "authentication_error", "bad key"), anthropic.AuthenticationError),
        (Stall(600), anthropic.APITimeoutError),
        (Malformed(), json.JSONDecodeError),
    ],
    ids=["429", "529", "500", "503", "401", "stall", "malformed"],
)
async def test_each_fault_surfaces_as_the_sdk_error(
    fault: Fault, error: type[Exception], stream: bool
) -> None:
    with anyio.fail_after(15):
        async with (
            FakeAnthropic().serve() as fake,
            client_for(fake, client_timeout_s=0.3) as client,
        ):
            fake.inject(fault)
            with pytest.raises(error):
                await ask(client, stream=stream)
            assert await ask(client, stream=stream) == "echo: hi"  # only the injected one failed
    assert fake.requests[0].fault == fault


async def test_an_error_event_mid_stream_raises_api_status_error_and_is_not_retried() -> None:
    with anyio.fail_after(15):
        async with FakeAnthropic().serve() as fake, client_for(fake, max_retries=2) as client:
            fake.inject(StreamError("overloaded_error", "mid-stream overload"))
            with pytest.raises(anthropic.APIStatusError) as caught:
                await ask(client, stream=True)
    assert type(caught.value) is anthropic.APIStatusError
    assert caught.value.status_code == 200
    assert caught.value.type == "overloaded_error"
    assert len(fake.requests) == 1


async def test_a_stream_error_on_a_plain_request_is_the_matching_http_error() -> None:
    with anyio.fail_after(15):
        async with FakeAnthropic().serve() as fake, client_for(fake) as client:
            fake.inject(StreamError("overloaded_error"))
            with pytest.raises(anthropic.OverloadedError):
                await ask(client)


async def test_a_pending_request_ends_cleanly_when_the_server_stops() -> None:
    outcome: list[BaseException] = []
    stopped_in = math.inf
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            stack = AsyncExitStack()
            fake = await stack.enter_async_context(FakeAnthropic(latency_s=600).serve())

            async def waiting_client() -> None:
                async with client_for(fake) as client:
                    try:
                        await ask(client)
                    except anthropic.APIError as exc:
                        outcome.append(exc)

            tg.start_soon(waiting_client)
            await fake.wait_for_requests(1)
            start = time.monotonic()
            await stack.aclose()
            stopped_in = time.monotonic() - start
    assert stopped_in < 1.0
    [error] = outcome
    assert isinstance(error, anthropic.InternalServerError | anthropic.APIConnectionError)


async def test_a_handler_may_answer_a_fault() -> None:
    with anyio.fail_after(15):
        async with (
            FakeAnthropic(lambda request: overloaded()).serve() as fake,
            client_for(fake) as client,
        ):
            with pytest.raises(anthropic.OverloadedError):
                await ask(client)


async def test_fault_rate_is_seeded_and_reproducible() -> None:
    def draws(seed: int) -> list[bool]:
        plan = FaultPlan(rate=0.3, seed=seed)
        return [plan.next() is not None for _ in range(200)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    assert 30 < sum(draws(7)) < 90
    with anyio.fail_after(15):
        plan = FaultPlan(rate=1.0, faults=[overloaded()])
        async with FakeAnthropic(faults=plan).serve() as fake, client_for(fake) as client:
            with pytest.raises(anthropic.OverloadedError):
                await ask(client)


def test_fault_plan_validates_its_rate() -> None:
    with pytest.raises(ValueError, match="within"):
        FaultPlan(rate=1.5)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_a_rate_limit_refuses_beyond_its_bucket_as_the_api_does() -> None:
    """A bucket of 2 requests refilled at 1 a second: the third request at once is refused with
    429 rate_limit_error, a retry-after in whole seconds and the limit's headers; a second later
    one request gets in again. A refused request leaves the prompt cache untouched."""
    clock = _Clock()
    limit = RequestRateLimit(60, burst=2, clock=clock)
    with anyio.fail_after(15):
        async with FakeAnthropic(rate_limit=limit).serve() as fake, client_for(fake) as client:
            assert await ask(client) and await ask(client)
            with pytest.raises(anthropic.RateLimitError) as caught:
                await ask(client)
            clock.now += 1.0
            assert await ask(client)
            with pytest.raises(anthropic.RateLimitError):
                await ask(client)
    headers = caught.value.response.headers
    assert caught.value.type == "rate_limit_error"
    assert headers["retry-after"] == "1" and "retry-after-ms" not in headers
    assert headers["anthropic-ratelimit-requests-limit"] == "60"
    assert headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert "anthropic-ratelimit-requests-reset" in headers
    assert [r.status for r in fake.requests] == [200, 200, 429, 200, 429]
    assert limit.refused == 2
    assert all(r.usage is None for r in fake.requests if r.status == 429)


def test_a_rate_limit_validates() -> None:
    with pytest.raises(ValueError, match="per_minute"):
        RequestRateLimit(0)
    with pytest.raises(ValueError, match="burst"):
        RequestRateLimit(60, burst=0.5)
