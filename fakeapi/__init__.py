"""A fake Anthropic Messages API on loopback, for tests, benchmarks and manual trials.

async with FakeAnthropic(by_turn(tool_use("write_file", path="a", content="x"),
                                 finish("done"))).serve() as fake:
    client = anthropic.AsyncAnthropic(base_url=fake.base_url, api_key="test")
"""

from fakeapi.cache import (
    CacheRequestError,
    Charge,
    PromptCache,
    count_input_tokens,
    estimate_tokens,
    min_cacheable_tokens,
)
from fakeapi.faults import (
    ErrorReply,
    Fault,
    FaultPlan,
    Malformed,
    Stall,
    StreamError,
    api_error,
    overloaded,
    rate_limited,
    server_error,
)
from fakeapi.limits import RequestRateLimit
from fakeapi.log import LoggedRequest, RequestLog
from fakeapi.replies import Block, Reply, Text, ToolUse, finish, reply, text, tool_use
from fakeapi.request import FakeRequest, ToolResult
from fakeapi.scripts import (
    Answer,
    Handler,
    KeyedHandler,
    ScriptedConversation,
    Step,
    by_key,
    by_turn,
    echo,
    writes_file,
)
from fakeapi.server import FakeAnthropic

__all__ = [
    "Answer",
    "Block",
    "CacheRequestError",
    "Charge",
    "ErrorReply",
    "FakeAnthropic",
    "FakeRequest",
    "Fault",
    "FaultPlan",
    "Handler",
    "KeyedHandler",
    "LoggedRequest",
    "Malformed",
    "PromptCache",
    "Reply",
    "RequestLog",
    "RequestRateLimit",
    "ScriptedConversation",
    "Stall",
    "Step",
    "StreamError",
    "Text",
    "ToolResult",
    "ToolUse",
    "api_error",
    "by_key",
    "by_turn",
    "count_input_tokens",
    "echo",
    "estimate_tokens",
    "finish",
    "min_cacheable_tokens",
    "overloaded",
    "rate_limited",
    "reply",
    "server_error",
    "text",
    "tool_use",
    "writes_file",
]
