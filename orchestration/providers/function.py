"""`FunctionModel`: a `Model` answered by a function of the request (sync or async)."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

from orchestration.model import ModelRequest, ModelResponse, estimate_usage

ModelFunction = Callable[[ModelRequest], ModelResponse | Awaitable[ModelResponse]]


def complete_response(request: ModelRequest, response: ModelResponse) -> ModelResponse:
    """Fill what a hand-built response left out: usage (estimated from text sizes), model."""
    updates: dict[str, object] = {}
    if "usage" not in response.model_fields_set:
        updates["usage"] = estimate_usage(request, response)
    if not response.model:
        updates["model"] = request.model
    return response.model_copy(update=updates) if updates else response


class FunctionModel:
    """A real `Model` whose answers come from `fn`; usage is estimated when `fn` gives none."""

    def __init__(self, fn: ModelFunction, *, name: str = "function") -> None:
        self._fn = fn
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"FunctionModel({getattr(self._fn, '__name__', repr(self._fn))})"

    async def complete(self, request: ModelRequest) -> ModelResponse:
        result = self._fn(request)
        if inspect.isawaitable(result):
            result = await result
        return complete_response(request, result)
