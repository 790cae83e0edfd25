"""`FakeAnthropic`: the Messages API (plain and streaming, count_tokens) served by uvicorn on
127.0.0.1, answered by a handler, with prompt-cache accounting, latency and injected faults."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator, Mapping
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from types import TracebackType
from typing import Any, Self, cast

import anyio
import anyio.from_thread
import anyio.lowlevel
import uvicorn
from pydantic import JsonValue
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from fakeapi.cache import (
    CacheRequestError,
    Charge,
    PromptCache,
    count_input_tokens,
    estimate_tokens,
)
from fakeapi.faults import ErrorReply, Fault, FaultPlan, Malformed, Stall, StreamError, api_error
from fakeapi.limits import RequestRateLimit
from fakeapi.log import HEADERS_OF_INTEREST, LoggedRequest, RequestLog
from fakeapi.replies import Reply, Text, ToolUse, new_id
from fakeapi.request import FakeRequest
from fakeapi.scripts import Handler, echo, resolve

TEXT_CHUNK_CHARS = 16
JSON_CHUNKS = 3


class _Server(uvicorn.Server):
    """uvicorn, embedded: signals a ready event, leaves signal handlers alone, and stops as soon
    as asked instead of at its next 0.1 s tick (lifespan is off, so there is none to end)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = anyio.Event()
        self.exit_requested = anyio.Event()

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        self.ready.set()

    @contextmanager
    def capture_signals(self) -> Generator[None]:
        yield

    async def main_loop(self) -> None:
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864000
            with anyio.move_on_after(0.1):
                await self.exit_requested.wait()

    async def shutdown(self, sockets: Any = None) -> None:
        """uvicorn's shutdown without its fixed 0.1 s sleeps: close, drain, then cancel."""
        for server in self.servers:
            server.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        with anyio.move_on_after(self.config.timeout_graceful_shutdown or 5.0):
            # uvicorn offers no event for "the last connection closed": poll, briefly
            while self.server_state.connections or self.server_state.tasks:  # noqa: ASYNC110
                await anyio.sleep(0.005)
        for task in self.server_state.tasks:
            task.cancel()
        for connection in list(self.server_state.connections):  # past the grace period
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.close()
        await anyio.lowlevel.checkpoint()  # let the transports' connection_lost callbacks run
        for server in self.servers:
            await server.wait_closed()

    def request_exit(self) -> None:
        self.should_exit = True
        self.exit_requested.set()


def _error_response(error: ErrorReply) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


class FakeAnthropic:
    """A fake Messages API. `handler` answers each request (default: echo); `latency_s` delays
    every request; `faults` injects faults before the handler is asked; `rate_limit` refuses
    requests beyond it as the API does (`fakeapi.limits`). Its prompt cache
    (`fakeapi.cache`) keeps the API's rules; `cache_ttl_s` replaces the 5-minute lifetime and
    `cache_min_tokens` the minimum cacheable length of model families.

        async with FakeAnthropic(by_turn(...), latency_s=0.05).serve() as fake:
            client = AsyncAnthropic(base_url=fake.base_url, api_key="test")

    From sync code: `with FakeAnthropic().running() as fake:` or `start_in_thread()`/`stop()`.
    """

    def __init__(
        self,
        handler: Handler = echo,
        *,
        latency_s: float = 0.0,
        faults: FaultPlan | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        cache_ttl_s: float | None = 300.0,
        cache_min_tokens: Mapping[str, int] | None = None,
        rate_limit: RequestRateLimit | None = None,
    ) -> None:
        self.handler = handler
        self.rate_limit = rate_limit
        self.latency_s = latency_s
        self.faults = faults if faults is not None else FaultPlan()
        self.host = host
        self.port = port
        self.cache = PromptCache(ttl_s=cache_ttl_s, min_tokens=cache_min_tokens)
        self.log = RequestLog()
        self.app = Starlette(
            routes=[
                Route("/v1/messages", self._messages, methods=["POST"]),
                Route("/v1/messages/count_tokens", self._count_tokens, methods=["POST"]),
            ]
        )
        self._base_url: str | None = None
        self._stopping: anyio.Event | None = None
        self._arrived: anyio.Event | None = None
        self._portal_cm: AbstractContextManager[anyio.from_thread.BlockingPortal] | None = None
        self._serve_cm: AbstractContextManager[FakeAnthropic] | None = None

    # -- public surface ------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        if self._base_url is None:
            raise RuntimeError("the fake is not serving: use `async with fake.serve()`")
        return self._base_url

    @property
    def requests(self) -> list[LoggedRequest]:
        """A snapshot of the Messages requests received so far, in arrival order."""
        return self.log.entries()

    async def wait_for_requests(self, count: int) -> None:
        """Wait until `count` Messages requests have arrived (from the serving event loop)."""
        while True:
            arrived = self._arrived
            if arrived is None:
                raise RuntimeError("wait_for_requests needs the fake served by `serve()`")
            if len(self.requests) >= count:
                return
            await arrived.wait()

    def inject(self, fault: Fault, times: int = 1) -> None:
        """Answer the next `times` Messages requests with `fault`."""
        self.faults.queue(fault, times)

    @asynccontextmanager
    async def serve(self) -> AsyncGenerator[Self]:
        """Serve on an ephemeral port (uvicorn opens the socket) until the block exits."""
        config = uvicorn.Config(
            self.app,
            host=self.host,
            port=self.port,
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws="none",
            timeout_graceful_shutdown=2,
        )
        server = _Server(config)
        self._stopping = anyio.Event()
        self._arrived = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve)
            await server.ready.wait()
            port = server.servers[0].sockets[0].getsockname()[1]
            self._base_url = f"http://{self.host}:{port}"
            try:
                yield self
            finally:
                self._stopping.set()
                server.request_exit()
        self._base_url = self._arrived = None

    def start_in_thread(self) -> Self:
        """Serve from an event loop in a background thread (for sync code); `stop()` ends it."""
        if self._portal_cm is not None:
            raise RuntimeError("the fake is already running in a thread")
        portal_cm = anyio.from_thread.start_blocking_portal()
        portal = portal_cm.__enter__()
        serve_cm = portal.wrap_async_context_manager(self.serve())
        try:
            serve_cm.__enter__()
        except BaseException:
            portal_cm.__exit__(None, None, None)
            raise
        self._portal_cm, self._serve_cm = portal_cm, serve_cm
        return self

    def stop(self) -> None:
        """Stop a server started with `start_in_thread()`."""
        serve_cm, portal_cm = self._serve_cm, self._portal_cm
        self._serve_cm = self._portal_cm = None
        try:
            if serve_cm is not None:
                serve_cm.__exit__(None, None, None)
        finally:
            if portal_cm is not None:
                portal_cm.__exit__(None, None, None)

    def running(self) -> _Running:
        """`with fake.running():` — start_in_thread() and stop() as a context manager."""
        return _Running(self)

    # -- endpoints -----------------------------------------------------------------------------

    async def _read_json(self, request: Request) -> dict[str, JsonValue] | ErrorReply:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            return api_error(400, "invalid_request_error", "request body is not valid JSON")
        if not isinstance(body, dict):
            return api_error(400, "invalid_request_error", "request body must be a JSON object")
        return cast(dict[str, JsonValue], body)

    def _log(self, request: Request, body: dict[str, JsonValue]) -> LoggedRequest:
        headers = {k: request.headers[k] for k in HEADERS_OF_INTEREST if k in request.headers}
        return self.log.add(request.url.path, body, headers)

    async def _count_tokens(self, request: Request) -> Response:
        body = await self._read_json(request)
        if isinstance(body, ErrorReply):
            return _error_response(body)
        entry = self._log(request, body)
        entry.status = 200
        return JSONResponse({"input_tokens": count_input_tokens(cast(dict[str, Any], body))})

    async def _messages(self, request: Request) -> Response:
        body = await self._read_json(request)
        if isinstance(body, ErrorReply):
            return _error_response(body)
        entry = self._log(request, body)
        if self._arrived is not None:
            self._arrived.set()
            self._arrived = anyio.Event()
        problem = _validate(body)
        if problem is not None:
            return self._answer_error(entry, api_error(400, "invalid_request_error", problem))
        refusal = None if self.rate_limit is None else self.rate_limit.take()
        if refusal is not None:  # refused before anything of it is done (the cache untouched)
            return self._answer_error(entry, refusal)
        try:
            # the prompt is looked up in the cache as the request arrives; what it writes is
            # readable once its response begins (see `_answer_reply`)
            charge = self.cache.charge(cast(dict[str, Any], body))
        except CacheRequestError as exc:
            return self._answer_error(entry, api_error(400, "invalid_request_error", str(exc)))
        if not await self._pause(request, self.latency_s):
            return self._gone(entry)
        fake_request = FakeRequest(body=body, headers=entry.headers, index=entry.index)
        answer = self.faults.next()
        if answer is None:
            try:
                answer = await resolve(self.handler, fake_request)
            except Exception as exc:
                entry.error = f"{type(exc).__name__}: {exc}"
                return self._answer_error(
                    entry, api_error(500, "api_error", f"fake handler raised {entry.error}")
                )
        if isinstance(answer, Reply):
            return await self._answer_reply(request, entry, fake_request, answer, charge)
        return await self._answer_fault(request, entry, fake_request, answer)

    # -- answers -------------------------------------------------------------------------------

    def _answer_error(self, entry: LoggedRequest, error: ErrorReply) -> Response:
        entry.fault, entry.status = error, error.status
        return _error_response(error)

    def _gone(self, entry: LoggedRequest) -> Response:
        """The client left or the server is stopping: nobody will read this answer."""
        entry.status = 499
        entry.error = entry.error or "client gone or server stopping"
        return _error_response(api_error(503, "api_error", "fake server stopping"))

    async def _answer_fault(
        self, request: Request, entry: LoggedRequest, fake_request: FakeRequest, fault: Fault
    ) -> Response:
        entry.fault = fault
        if isinstance(fault, ErrorReply):
            return self._answer_error(entry, fault)
        if isinstance(fault, Stall):
            await self._pause(request, fault.seconds)
            return self._gone(entry)
        if isinstance(fault, Malformed):
            entry.status = 200
            if fake_request.stream:
                payload = f"event: message_start\ndata: {fault.body}\n\n".encode()
                return Response(payload, media_type="text/event-stream")
            return Response(fault.body, media_type="application/json")
        if not fake_request.stream:
            return self._answer_error(entry, fault.as_http())
        entry.status = 200
        return StreamingResponse(
            self._error_stream(fake_request, fault), media_type="text/event-stream"
        )

    async def _answer_reply(
        self,
        request: Request,
        entry: LoggedRequest,
        fake_request: FakeRequest,
        reply: Reply,
        charge: Charge,
    ) -> Response:
        if not await self._pause(request, reply.latency_s):
            return self._gone(entry)
        content = [_block_json(b) for b in reply.content]
        output_tokens = reply.output_tokens
        if output_tokens is None:
            output_tokens = max(1, estimate_tokens(json.dumps(content)))
        entry.reply, entry.usage, entry.output_tokens, entry.status = (
            reply,
            charge,
            output_tokens,
            200,
        )
        message: dict[str, Any] = {
            "id": new_id("msg"),
            "type": "message",
            "role": "assistant",
            "model": fake_request.model,
            "content": content,
            "stop_reason": reply.effective_stop_reason,
            "stop_sequence": None,
            "usage": _usage_json(charge, output_tokens),
        }
        self.cache.publish(charge)  # the response begins now
        if fake_request.stream:
            return StreamingResponse(_reply_stream(message), media_type="text/event-stream")
        return JSONResponse(message)

    async def _error_stream(
        self, fake_request: FakeRequest, fault: StreamError
    ) -> AsyncIterator[bytes]:
        start: dict[str, Any] = {
            "id": new_id("msg"),
            "type": "message",
            "role": "assistant",
            "model": fake_request.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 1, "output_tokens": 1},
        }
        yield _sse("message_start", {"type": "message_start", "message": start})
        block = {"type": "text", "text": ""}
        yield _sse(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": block},
        )
        delta = {"type": "text_delta", "text": "partial "}
        yield _sse(
            "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
        )
        error = {"type": "error", "error": {"type": fault.error_type, "message": fault.message}}
        yield _sse("error", error)

    async def _pause(self, request: Request, seconds: float) -> bool:
        """Sleep `seconds` unless the client disconnects or the server stops (→ False)."""
        if seconds <= 0:
            return True
        stopping = self._stopping
        interrupted = False

        async def on_disconnect(scope: anyio.CancelScope) -> None:
            nonlocal interrupted
            while (await request.receive())["type"] != "http.disconnect":
                pass
            interrupted = True
            scope.cancel()

        async def on_stop(scope: anyio.CancelScope) -> None:
            nonlocal interrupted
            if stopping is not None:
                await stopping.wait()
                interrupted = True
                scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(on_disconnect, tg.cancel_scope)
            tg.start_soon(on_stop, tg.cancel_scope)
            await anyio.sleep(seconds)
            tg.cancel_scope.cancel()
        return not interrupted


class _Running:
    def __init__(self, fake: FakeAnthropic) -> None:
        self.fake = fake

    def __enter__(self) -> FakeAnthropic:
        return self.fake.start_in_thread()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.fake.stop()


def _validate(body: dict[str, JsonValue]) -> str | None:
    if not isinstance(body.get("model"), str):
        return "model: field required (a string)"
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return "max_tokens: field required (a positive integer)"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: field required (a non-empty list)"
    return None


def _block_json(block: Text | ToolUse) -> dict[str, Any]:
    if isinstance(block, Text):
        return {"type": "text", "text": block.text}
    return {
        "type": "tool_use",
        "id": block.id or new_id("toolu"),
        "name": block.name,
        "input": block.input,
    }


def _usage_json(charge: Charge, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": charge.input_tokens,
        "cache_creation_input_tokens": charge.cache_creation_input_tokens,
        "cache_read_input_tokens": charge.cache_read_input_tokens,
        "cache_creation": {
            "ephemeral_5m_input_tokens": charge.cache_creation_5m_input_tokens,
            "ephemeral_1h_input_tokens": charge.cache_creation_1h_input_tokens,
        },
        "output_tokens": output_tokens,
    }


def _reply_events(message: dict[str, Any]) -> Iterator[bytes]:
    start: dict[str, Any] = {**message, "content": [], "stop_reason": None}
    start["usage"] = {**message["usage"], "output_tokens": 1}
    yield _sse("message_start", {"type": "message_start", "message": start})
    yield _sse("ping", {"type": "ping"})
    for index, block in enumerate(cast(list[dict[str, Any]], message["content"])):
        if block["type"] == "text":
            opening: dict[str, Any] = {"type": "text", "text": ""}
            deltas = [
                {"type": "text_delta", "text": c} for c in _chunks(block["text"], TEXT_CHUNK_CHARS)
            ]
        else:
            opening = {**block, "input": {}}
            raw = json.dumps(block["input"])
            size = max(1, math.ceil(len(raw) / JSON_CHUNKS))
            deltas = [{"type": "input_json_delta", "partial_json": c} for c in _chunks(raw, size)]
        yield _sse(
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": opening},
        )
        for delta in deltas:
            yield _sse(
                "content_block_delta",
                {"type": "content_block_delta", "index": index, "delta": delta},
            )
        yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
    yield _sse(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
            "usage": message["usage"],
        },
    )
    yield _sse("message_stop", {"type": "message_stop"})


async def _reply_stream(message: dict[str, Any]) -> AsyncIterator[bytes]:
    for event in _reply_events(message):
        yield event
