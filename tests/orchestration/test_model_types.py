"""The model seam's message types, and the FunctionModel / ScriptedModel test doubles."""

from __future__ import annotations

import anyio
import pytest
from pydantic import TypeAdapter, ValidationError

from orchestration.errors import ModelFatalError, ModelRateLimited
from orchestration.model import (
    ContentBlock,
    Message,
    Model,
    ModelRequest,
    ModelResponse,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
    Usage,
    estimate_request_tokens,
    estimate_tokens,
)
from orchestration.providers.function import FunctionModel
from orchestration.providers.scripted import (
    ScriptedModel,
    ScriptExhausted,
    reply_finish,
    reply_text,
    reply_tool,
    reply_tools,
)
from toolbus.toolspec import ToolSpec

pytestmark = pytest.mark.anyio


def request(task: str = "task: alpha", *, turns: int = 0) -> ModelRequest:
    messages = [Message(role="user", content=[TextBlock(text="begin")])]
    for i in range(turns):
        messages.append(
            Message(role="assistant", content=[ToolUseBlock(id=f"t{i}", name="x", input={})])
        )
        messages.append(
            Message(role="user", content=[ToolResultBlock(tool_use_id=f"t{i}", content="ok")])
        )
    return ModelRequest(
        model="m",
        system_prefix="shared prefix",
        system_task=task,
        tools=[ToolSpec(name="x", description="a tool", input_schema={"type": "object"})],
        messages=messages,
        max_tokens=1024,
    )


def test_usage_adds_and_totals() -> None:
    a = Usage(input_tokens=10, output_tokens=5, cache_read_tokens=100, cache_write_tokens=7)
    b = Usage(input_tokens=1, output_tokens=2)
    assert a + b == Usage(
        input_tokens=11, output_tokens=7, cache_read_tokens=100, cache_write_tokens=7
    )
    assert (a + b).total == 125
    assert sum([a, b], Usage()) == a + b


def test_content_blocks_are_a_discriminated_union() -> None:
    adapter = TypeAdapter(list[ContentBlock])
    blocks = adapter.validate_python(
        [
            {"type": "text", "text": "hi"},
            {"type": "tool_use", "id": "t1", "name": "read_file", "input": {"path": "a"}},
            {"type": "tool_result", "tool_use_id": "t1", "content": "x", "is_error": True},
        ]
    )
    assert [type(b) for b in blocks] == [TextBlock, ToolUseBlock, ToolResultBlock]
    with pytest.raises(ValidationError):
        adapter.validate_python([{"type": "image", "source": {}}])
    message = Message(role="assistant", content=blocks[:2])
    assert Message.model_validate_json(message.model_dump_json()) == message


def test_response_defaults_its_stop_reason_and_lists_tool_uses() -> None:
    use = ToolUseBlock(id="t", name="finish", input={"summary": "s"})
    assert ModelResponse(content=[TextBlock(text="a"), use]).stop_reason == "tool_use"
    assert ModelResponse(content=[TextBlock(text="a")]).stop_reason == "end_turn"
    refused = ModelResponse(content=[], stop_reason="refusal")
    assert refused.stop_reason == "refusal" and refused.tool_uses == []
    assert ModelResponse(content=[TextBlock(text="a"), use]).tool_uses == [use]


def test_estimates_are_a_quarter_of_the_characters() -> None:
    assert [estimate_tokens("x" * n) for n in (0, 3, 4, 9)] == [0, 1, 1, 3]
    assert estimate_request_tokens(request(turns=3)) > estimate_request_tokens(request())


async def test_function_model_sync_and_async_with_estimated_usage() -> None:
    def sync_fn(req: ModelRequest) -> ModelResponse:
        return reply_text(f"hello {req.system_task}")

    async def async_fn(req: ModelRequest) -> ModelResponse:
        return ModelResponse(content=[TextBlock(text="x")], usage=Usage(input_tokens=3))

    model: Model = FunctionModel(sync_fn, name="fn")
    answer = await model.complete(request())
    assert answer.text == "hello task: alpha" and model.name == "fn"
    assert answer.usage.input_tokens == estimate_request_tokens(request())
    assert answer.usage.output_tokens > 0 and answer.model == "m"
    given = await FunctionModel(async_fn).complete(request())
    assert given.usage == Usage(input_tokens=3)  # a usage the function gives is kept


async def test_scripted_model_plays_steps_in_order_then_refuses_clearly() -> None:
    seen: list[int] = []

    def third(req: ModelRequest) -> ModelResponse:
        seen.append(len(req.messages))
        return reply_finish("done", follow_ups=["more tests"], status="succeeded")

    model = ScriptedModel(
        [reply_tool("write_file", path="a.py", content="A\n"), ModelRateLimited("slow down"), third]
    )
    first = await model.complete(request())
    assert first.stop_reason == "tool_use"
    assert [(u.name, u.input) for u in first.tool_uses] == [
        ("write_file", {"path": "a.py", "content": "A\n"})
    ]
    assert first.usage.input_tokens > 0
    with pytest.raises(ModelRateLimited, match="slow down"):
        await model.complete(request(turns=1))
    last = await model.complete(request(turns=1))
    assert last.tool_uses[0].input == {
        "summary": "done",
        "follow_ups": ["more tests"],
        "status": "succeeded",
    }
    assert seen == [3] and model.remaining == 0
    model.assert_consumed()
    with pytest.raises(ScriptExhausted, match="no step left: it played 3 step"):
        await model.complete(request(turns=2))
    assert isinstance(ScriptExhausted("x"), ModelFatalError)
    with pytest.raises(AssertionError, match="asked 1 time"):
        model.assert_consumed()


async def test_assert_consumed_says_how_many_remain() -> None:
    model = ScriptedModel([reply_text("a"), reply_text("b"), reply_text("c")])
    await model.complete(request())
    with pytest.raises(AssertionError, match="2 step"):
        model.assert_consumed()


async def test_parallel_tool_calls_get_distinct_ids() -> None:
    answer = reply_tools(("read_file", {"path": "a"}), ("read_file", {"path": "b"}), text="reading")
    assert answer.text == "reading"
    assert len({u.id for u in answer.tool_uses}) == 2


async def test_per_agent_scripts_for_concurrent_agents() -> None:
    model = ScriptedModel.per_agent(
        {
            "task: alpha": [reply_tool("write_file", path="a.py", content="A"), reply_finish("a")],
            "task: beta": [ModelRateLimited("busy"), reply_finish("b")],
            "task: gamma": [reply_finish("g")],
        }
    )
    got: dict[str, list[str]] = {}

    async def agent(key: str, turns: int) -> None:
        names: list[str] = []
        for turn in range(turns):
            try:
                answer = await model.complete(request(f"You are an agent.\n{key}", turns=turn))
            except ModelRateLimited:
                answer = await model.complete(request(f"You are an agent.\n{key}", turns=turn))
            names += [u.name for u in answer.tool_uses]
        got[key] = names

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(agent, "task: alpha", 2)
            tg.start_soon(agent, "task: beta", 1)
            tg.start_soon(agent, "task: gamma", 1)
    assert got == {
        "task: alpha": ["write_file", "finish"],
        "task: beta": ["finish"],
        "task: gamma": ["finish"],
    }
    model.assert_consumed()
    with pytest.raises(ScriptExhausted, match="no script matches"):
        await model.complete(request("task: delta"))


async def test_per_agent_default_and_unconsumed_report() -> None:
    model = ScriptedModel.per_agent(
        {"alpha": [reply_finish("a"), reply_text("extra")]}, default=[reply_text("fallback")]
    )
    assert (await model.complete(request("someone else"))).text == "fallback"
    await model.complete(request("alpha"))
    with pytest.raises(AssertionError, match="'alpha': 1 step"):
        model.assert_consumed()
