"""`AnthropicModel`: the `Model` over the Anthropic Messages API — the only module that imports
`anthropic`, and the one place SDK errors are translated into `orchestration.errors`.

The SDK's retries are off (`max_retries=0`): `orchestration.retry` retries, with a cap on
retry-after. Prompt caching: the last tool, the shared system prefix and the last block of the
last user message carry `cache_control` breakpoints (three of the API's four); the first two with
the run's lifetime for its shared prefix (`ModelRequest.cache_ttl`), the last with 5 minutes (a
longer lifetime may not follow a shorter one)."""

from __future__ import annotations

import json
import os
import ssl
import threading
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import anthropic
import anthropic._base_client as anthropic_base_client
import httpx2
from anthropic.types import (
    CacheControlEphemeralParam,
    MessageParam,
    TextBlockParam,
    ToolParam,
)
from anthropic.types import (
    Message as ApiMessage,
)
from pydantic import BaseModel, ConfigDict, JsonValue, SecretStr, TypeAdapter, ValidationError

from orchestration.config import DEFAULT_HTTP_CLIENT, HttpClientSetting
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
    ModelResponse,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
    Usage,
)

DEFAULT_MODEL = "claude-sonnet-5-5"
# The SDK refuses a non-streaming call whose max_tokens could take more than ten minutes.
STREAMING_REQUIRED_MAX_TOKENS = 21_334
EPHEMERAL: CacheControlEphemeralParam = {"type": "ephemeral"}
_TOOL_INPUT = TypeAdapter(dict[str, JsonValue])


class _WireBlock(BaseModel):
    """A content block of a response as the API sends it: only what `from_api_message` reads
    is checked; the fields of other kinds of blocks are left aside, as they are dropped."""

    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: JsonValue = None


class _WireCacheCreation(BaseModel):
    model_config = ConfigDict(extra="ignore")

    ephemeral_1h_input_tokens: int = 0


class _WireUsage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_creation: _WireCacheCreation | None = None


class _WireMessage(BaseModel):
    """A non-streamed response's body, read straight from its JSON."""

    model_config = ConfigDict(extra="ignore")

    content: list[_WireBlock]
    stop_reason: str | None = None
    usage: _WireUsage
    model: str


HttpClientKind = HttpClientSetting
_once_lock = threading.Lock()
_ssl_contexts: list[ssl.SSLContext] = []


def shared_ssl_context() -> ssl.SSLContext:
    """One TLS context (the SDK's default: certifi's roots, or SSL_CERT_FILE / SSL_CERT_DIR)
    for every client of this process. Building one loads the whole CA bundle, CPU that each new
    SDK client would otherwise spend, holding up the event loop."""
    with _once_lock:
        if not _ssl_contexts:
            _ssl_contexts.append(httpx2.create_ssl_context(trust_env=True))
        return _ssl_contexts[0]


_platforms: list[anthropic_base_client.Platform] = []


def sdk_platform() -> anthropic_base_client.Platform:
    """What the SDK's requests name as the platform, looked up once for the process. A client
    looks it up on its first request, in a worker thread, and every agent whose first request
    leaves before that lookup ends makes its own: a thread and a turn of the event loop each,
    in the burst of a run's first requests. Each new client is given it instead."""
    with _once_lock:
        if not _platforms:
            _platforms.append(anthropic_base_client.get_platform())
        return _platforms[0]


def warm_up() -> None:
    """What a server's start-up does ahead of the first spawn (see `orchestration.heap`): the
    shared TLS context, so that the first SDK client is not the one to load the CA bundle, and
    the platform the SDK names."""
    shared_ssl_context()
    sdk_platform()


# What the request being made in this context calls when the HTTP client takes it (see
# `AnthropicModel.complete_signalled`); None for most requests.
_ON_SENT: ContextVar[Callable[[], None] | None] = ContextVar("fanout_on_sent", default=None)


async def _request_hook(_request: httpx2.Request) -> None:
    """The HTTP client's hook before it sends a request: the caller's `on_sent`, if any."""
    on_sent = _ON_SENT.get()
    if on_sent is not None:
        on_sent()


def _http_client(kind: HttpClientKind) -> httpx2.AsyncClient:
    """The SDK's own HTTP client (its defaults: limits, redirects, proxies from the environment)
    over httpx or, with `aiohttp`, over aiohttp's transport (the `anthropic[aiohttp]` extra),
    whose C parser costs a request less CPU."""
    hooks = {"request": [_request_hook]}
    if kind == "aiohttp":
        return anthropic.DefaultAioHttpClient(verify=shared_ssl_context(), event_hooks=hooks)
    return anthropic.DefaultAsyncHttpxClient(verify=shared_ssl_context(), event_hooks=hooks)


class AnthropicModel:
    """A `Model` calling the Messages API; streams when `max_tokens >= stream_threshold`.
    `http_client` chooses the SDK's HTTP transport: `aiohttp` (the default) or `httpx`."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout_s: float = 600.0,
        stream_threshold: int = STREAMING_REQUIRED_MAX_TOKENS,
        http_client: HttpClientKind | None = None,
    ) -> None:
        key = api_key or os.environ.get("ANTHROPIC_API_KEY")
        if not key:
            raise ConfigError(
                "no Anthropic API key: set ANTHROPIC_API_KEY (or pass api_key). To dry-run "
                "without a key, use the scripted model "
                "(orchestration.providers.scripted.ScriptedModel) instead of AnthropicModel."
            )
        self.model = model
        self.base_url = base_url or os.environ.get("ANTHROPIC_BASE_URL") or None
        self.timeout_s = timeout_s
        self.stream_threshold = stream_threshold
        self._key = SecretStr(key)
        self.http_client: HttpClientKind = http_client or DEFAULT_HTTP_CLIENT
        self._wire = _WireCache()
        self._client = anthropic.AsyncAnthropic(
            api_key=key,
            base_url=self.base_url,
            timeout=timeout_s,
            max_retries=0,
            http_client=_http_client(self.http_client),
        )
        if getattr(self._client, "_platform", "") is None:  # (the SDK's, see `sdk_platform`)
            self._client._platform = sdk_platform()  # pyright: ignore[reportPrivateUsage]

    @property
    def name(self) -> str:
        return self.model

    def __repr__(self) -> str:
        return f"AnthropicModel(model={self.model!r}, base_url={self.base_url!r})"

    async def aclose(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> AnthropicModel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def complete_signalled(
        self,
        request: ModelRequest,
        on_start: Callable[[], None],
        *,
        on_sent: Callable[[], None] | None = None,
    ) -> ModelResponse:
        """`complete`, streamed, calling `on_start` at the stream's first event: the response
        has begun, and with it what the request wrote to the prompt cache is readable; and
        `on_sent` when the HTTP client takes the request (each attempt's)."""
        token = _ON_SENT.set(on_sent)
        try:
            return await self._call(request, stream=True, on_start=on_start)
        finally:
            _ON_SENT.reset(token)

    async def complete(self, request: ModelRequest) -> ModelResponse:
        return await self._call(request, stream=request.max_tokens >= self.stream_threshold)

    async def _call(
        self,
        request: ModelRequest,
        *,
        stream: bool,
        on_start: Callable[[], None] | None = None,
    ) -> ModelResponse:
        model = request.model or self.model
        try:
            if stream:
                system, tools, messages = to_api_request(request)
                offered = tools if tools else anthropic.omit
                async with self._client.messages.stream(
                    model=model,
                    max_tokens=request.max_tokens,
                    system=system,
                    tools=offered,
                    messages=messages,
                ) as events:
                    if on_start is not None:
                        async for _event in events:
                            on_start()
                            break
                    answer = await events.get_final_message()
                return from_api_message(answer)
            # The body `messages.create` sends, serialized here and posted through the same
            # client (its headers, timeout, errors), and the answer read straight from its JSON:
            # `create` would copy the whole request to prepare it and build a typed message of
            # the answer, the larger part of its own work, only for both to be converted here.
            content = self._wire.body(request, model)
            raw = await self._client.post("/v1/messages", cast_to=bytes, content=content)
            return from_api_message(_WireMessage.model_validate_json(raw))
        except (anthropic.AnthropicError, httpx2.TransportError, json.JSONDecodeError) as exc:
            raise self._scrubbed(translate_error(exc)) from exc
        except ValidationError as exc:
            raise self._scrubbed(
                ModelResponseError(f"the model API sent a malformed answer: {exc}")
            ) from exc

    def _scrubbed(self, error: ModelError) -> ModelError:
        """The same error with the API key masked, should any message ever echo it."""
        key = self._key.get_secret_value()
        text = str(error)
        if key in text:
            return type(error)(text.replace(key, "***"), retry_after_s=error.retry_after_s)
        return error


def to_api_request(
    request: ModelRequest,
) -> tuple[list[TextBlockParam], list[ToolParam], list[MessageParam]]:
    """System blocks, tools and messages in the API's shape, with the cache breakpoints."""
    system, tools = _system_and_tools(request)
    messages = [_message_param(m) for m in request.messages]
    last = _last_user(request.messages)
    if last is not None:
        messages[last] = _marked(messages[last])
    return system, tools, messages


def _last_user(messages: list[Message]) -> int | None:
    """The index of the last user message: it carries the conversation's moving breakpoint."""
    return next((i for i in range(len(messages) - 1, -1, -1) if messages[i].role == "user"), None)


def _marked(param: MessageParam) -> MessageParam:
    """A user message with the conversation's moving cache breakpoint on its last block."""
    content = param["content"]
    if isinstance(content, list) and content:
        last: Any = content[-1]
        last["cache_control"] = EPHEMERAL
    return param


def _system_and_tools(request: ModelRequest) -> tuple[list[TextBlockParam], list[ToolParam]]:
    """The request's system blocks and tools, with their breakpoints (the run's lifetime)."""
    prefix, task = _prefix_block(request), _task_block(request)
    system = [b for b in (prefix, task) if b is not None]
    return system, _tool_params(request)


def _shared_breakpoint(request: ModelRequest) -> CacheControlEphemeralParam:
    """The breakpoint of the parts a run's agents share, for the run's lifetime."""
    return (
        EPHEMERAL if request.cache_ttl == "5m" else {"type": "ephemeral", "ttl": request.cache_ttl}
    )


def _prefix_block(request: ModelRequest) -> TextBlockParam | None:
    """The system block of the run's prefix (the same for all its agents), with a breakpoint."""
    if not request.system_prefix:
        return None
    return {
        "type": "text",
        "text": request.system_prefix,
        "cache_control": _shared_breakpoint(request),
    }


def _task_block(request: ModelRequest) -> TextBlockParam | None:
    """The system block of the agent's own task."""
    return {"type": "text", "text": request.system_task} if request.system_task else None


def _tool_params(request: ModelRequest) -> list[ToolParam]:
    """The tools, the last one with the shared breakpoint."""
    tools: list[ToolParam] = [
        {
            "name": spec.name,
            "description": spec.description,
            "input_schema": dict[str, Any](spec.input_schema),
        }
        for spec in request.tools
    ]
    if tools:
        tools[-1]["cache_control"] = _shared_breakpoint(request)
    return tools


def _message_param(message: Message) -> MessageParam:
    content: list[Any] = []
    for block in message.content:
        if isinstance(block, TextBlock):
            if block.text:  # the API refuses empty text blocks
                content.append({"type": "text", "text": block.text})
        elif isinstance(block, ToolUseBlock):
            content.append(
                {"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}
            )
        else:
            content.append(_tool_result_param(block))
    if not content:
        content.append({"type": "text", "text": "(empty)"})
    if message.role == "user":
        return {"role": "user", "content": content}
    return {"role": "assistant", "content": content}


def _tool_result_param(block: ToolResultBlock) -> dict[str, Any]:
    return {
        "type": "tool_result",
        "tool_use_id": block.tool_use_id,
        "content": block.content,
        "is_error": block.is_error,
    }


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
# (`json.dumps` with any option but the defaults makes an encoder at every call)


def _dumps(value: object) -> str:
    """`value` as the SDK serializes a request (compact JSON, no NaN)."""
    return _ENCODER.encode(value)


class _WireCache:
    """The JSON of the parts of requests that repeat, made once: an agent's system blocks and
    tools are the same at every call (the tools are most of a short request's body), and each
    call's messages are the previous call's and a few more. The body is the one that
    `to_api_request` gives, serialized as the SDK serializes it (a test compares them)."""

    _MAX_FIXED = 256
    _MAX_MESSAGE_CHARS = 32 * 1024 * 1024

    def __init__(self) -> None:
        # (prefix, task, ttl, the tools' ids) -> (system JSON, tools JSON, the tools, kept so
        # that their ids stay theirs while the entry stands)
        self._fixed: dict[tuple[str, str, str, tuple[int, ...]], tuple[str, str, list[Any]]] = {}
        # (prefix, ttl, the tools' ids) -> (the prefix block's JSON or "", tools JSON, the
        # tools): what the agents of a run share, made once for all of them
        self._shared: dict[tuple[str, str, tuple[int, ...]], tuple[str, str, list[Any]]] = {}
        # id(message) -> (the message, kept for the same reason, its JSON without a breakpoint)
        self._messages: dict[int, tuple[Message, str]] = {}
        self._message_chars = 0

    def body(self, request: ModelRequest, model: str) -> bytes:
        system, tools = self._system_and_tools(request)
        last_user = _last_user(request.messages)
        parts: list[str] = []
        for i, message in enumerate(request.messages):
            if i == last_user:  # the moving breakpoint: made afresh, never kept
                parts.append(_dumps(_marked(_message_param(message))))
            else:
                parts.append(self._message(message))
        text = (
            f'{{"max_tokens":{_dumps(request.max_tokens)},"messages":[{",".join(parts)}],'
            f'"model":{_dumps(model)},"system":{system}'
            + (f',"tools":{tools}' if tools else "")
            + "}"
        )
        return text.encode()

    def _system_and_tools(self, request: ModelRequest) -> tuple[str, str]:
        key = (
            request.system_prefix,
            request.system_task,
            request.cache_ttl,
            tuple(id(t) for t in request.tools),
        )
        known = self._fixed.get(key)
        if known is None:
            prefix, tools, kept = self._shared_part(request, key[3])
            task = _task_block(request)
            blocks = [b for b in (prefix, _dumps(task) if task is not None else "") if b]
            if len(self._fixed) >= self._MAX_FIXED:
                self._fixed.clear()
            known = self._fixed[key] = (f"[{','.join(blocks)}]", tools, kept)
        return known[0], known[1]

    def _shared_part(
        self, request: ModelRequest, tool_ids: tuple[int, ...]
    ) -> tuple[str, str, list[Any]]:
        key = (request.system_prefix, request.cache_ttl, tool_ids)
        known = self._shared.get(key)
        if known is None:
            prefix = _prefix_block(request)
            tools = _tool_params(request)
            if len(self._shared) >= self._MAX_FIXED:
                self._shared.clear()
            known = self._shared[key] = (
                _dumps(prefix) if prefix is not None else "",
                _dumps(tools) if tools else "",
                list(request.tools),
            )
        return known

    def _message(self, message: Message) -> str:
        known = self._messages.get(id(message))
        if known is not None and known[0] is message:
            return known[1]
        text = _dumps(_message_param(message))
        if self._message_chars + len(text) > self._MAX_MESSAGE_CHARS:
            self._messages.clear()
            self._message_chars = 0
        self._messages[id(message)] = (message, text)
        self._message_chars += len(text)
        return text


def from_api_message(message: ApiMessage | _WireMessage) -> ModelResponse:
    """Our response from the SDK's message or the API's JSON; blocks other than text and
    tool_use are dropped."""
    content: list[TextBlock | ToolUseBlock] = []
    for block in message.content:
        if block.type == "text":
            if block.text is None:
                raise ModelResponseError("the model API sent a text block without its text")
            content.append(TextBlock(text=block.text))
        elif block.type == "tool_use":
            if block.id is None or block.name is None:
                raise ModelResponseError(
                    "the model API sent a tool_use block without its id or name"
                )
            try:
                tool_input = _TOOL_INPUT.validate_python(block.input)
            except ValidationError as exc:
                raise ModelResponseError(
                    f"tool_use {block.name!r} has an input that is not a JSON object: {exc}"
                ) from exc
            content.append(ToolUseBlock(id=block.id, name=block.name, input=tool_input))
    usage = message.usage
    return ModelResponse(
        content=content,
        stop_reason=message.stop_reason or "end_turn",
        usage=Usage(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cache_read_tokens=usage.cache_read_input_tokens or 0,
            cache_write_tokens=usage.cache_creation_input_tokens or 0,
            cache_write_1h_tokens=(
                usage.cache_creation.ephemeral_1h_input_tokens if usage.cache_creation else 0
            ),
        ),
        model=message.model,
    )


def retry_after_s(headers: httpx2.Headers) -> float | None:
    """The server's retry-after in seconds: `retry-after-ms` first, then `retry-after`."""
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / scale
        except ValueError:
            continue
        if seconds >= 0:
            return seconds
    return None


def translate_error(exc: BaseException) -> ModelError:
    """The one translation of SDK and transport errors into the orchestration error tree."""
    if isinstance(exc, anthropic.APIStatusError):
        return _status_error(exc)
    if isinstance(exc, anthropic.APITimeoutError | httpx2.TimeoutException):
        return ModelTimeout(f"the model API did not answer in time: {exc}")
    if isinstance(exc, anthropic.APIConnectionError | httpx2.TransportError):
        return ModelConnectionError(f"could not reach the model API: {exc}")
    if isinstance(exc, anthropic.APIResponseValidationError | json.JSONDecodeError):
        return ModelResponseError(f"the model API sent a malformed answer: {exc}")
    return ModelResponseError(f"the model call failed: {type(exc).__name__}: {exc}")


# What a refusal that every agent of the server meets alike points to: the orchestrator's next
# step is then to have the server's configuration fixed, not to rerun the agents.
_SERVER_SIDE = {
    401: "the API refused the server's key: set ANTHROPIC_API_KEY where the server starts and "
    "restart it; a rerun fails the same way until then",
    403: "the server's key may not use this model or feature; a rerun fails the same way "
    "until the key or the model changes",
    404: "the API knows no such model or path: check the model (FANOUT_MODEL, or the task's "
    "`model`) and ANTHROPIC_BASE_URL; a rerun fails the same way until then",
}


def _status_error(exc: anthropic.APIStatusError) -> ModelError:
    status = exc.status_code
    after = retry_after_s(exc.response.headers)
    what = f"the model API answered {status} ({exc.type or 'error'}): {exc.api_message or exc}"
    if status in _SERVER_SIDE:
        what = f"{what}; {_SERVER_SIDE[status]}"
    if status == 200:  # an `event: error` inside a stream: only the body says what it was
        return _stream_error(exc, after)
    if status == 429:
        return ModelRateLimited(what, retry_after_s=after)
    if status == 408:
        return ModelTimeout(what, retry_after_s=after)
    if status == 409 or status >= 500:
        return ModelOverloaded(what, retry_after_s=after)
    return ModelFatalError(what)


def _stream_error(exc: anthropic.APIStatusError, after: float | None) -> ModelError:
    kind = exc.type or "error"
    what = f"the model API sent an error mid-stream ({kind}): {exc.api_message or exc}"
    if kind == "rate_limit_error":
        return ModelRateLimited(what, retry_after_s=after)
    if kind in ("overloaded_error", "api_error"):
        return ModelOverloaded(what, retry_after_s=after)
    if kind in ("invalid_request_error", "authentication_error", "permission_error"):
        return ModelFatalError(what)
    return ModelResponseError(what)
