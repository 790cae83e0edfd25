"""The model instances of the agents: one per model name and group of agents."""

from __future__ import annotations

from collections.abc import Callable

import anyio

from orchestration.config import Settings
from orchestration.model import Model
from orchestration.rate_gate import RateGate

# Called once per model name and group of agents (see `ModelPool`), not once per name.
ModelFactory = Callable[[str], Model]

AGENTS_PER_MODEL = 16


def default_model_factory(settings: Settings) -> ModelFactory:
    """Models from the Anthropic API (needs ANTHROPIC_API_KEY)."""

    def make(name: str) -> Model:
        from orchestration.providers.anthropic import AnthropicModel

        return AnthropicModel(
            model=name, timeout_s=settings.model_timeout_s, http_client=settings.http_client
        )

    return make


class ModelPool:
    """One model instance per name and group of `AGENTS_PER_MODEL` agents, so that no HTTP
    connection pool serves more than that many.

    (An httpx connection pool, `FANOUT_HTTP_CLIENT=httpx`, scans every connection it holds on
    each request and response, so one pool for many agents costs more CPU than the requests
    themselves.)"""

    def __init__(self, factory: ModelFactory, *, max_pause_s: float | None = None) -> None:
        self._factory = factory
        self._max_pause_s = max_pause_s
        self._models: dict[tuple[str, int], Model] = {}
        self._locks: dict[tuple[str, int], anyio.Lock] = {}
        self._gates: dict[str, RateGate] = {}

    def pacing(self) -> str | None:
        """What status says while the API's rate limit holds requests back; None otherwise."""
        held = [(name, gate.waiting) for name, gate in self._gates.items() if gate.holding]
        if not held:
            return None
        waiting = ", ".join(f"{n} request{'' if n == 1 else 's'} to {name}" for name, n in held)
        return (
            f"the model API's rate limit (429) holds requests back, {waiting} waiting: agents "
            "go as fast as it allows; more at once would not end sooner"
        )

    def gate(self, name: str) -> RateGate:
        """The pace of the requests to the model `name`, shared by every agent calling it: the
        API's rate limits are the organisation's, per model, whichever instance sends."""
        gate = self._gates.get(name)
        if gate is None:
            gate = self._gates[name] = RateGate(max_pause_s=self._max_pause_s)
        return gate

    def first(self, name: str) -> Model:
        """The model `name` of the first group of agents (made on first use, on this thread:
        a missing API key fails here)."""
        key = _key(name, 1)
        model = self._models.get(key)
        if model is None:
            model = self._models[key] = self._factory(name)
        return model

    async def for_agent(self, name: str, agent_index: int) -> Model:
        """The model `name` for the agent of this index. The instances after the first are made
        in a worker thread, off the event loop: a factory may be slow (the process's first SDK
        client loads the CA bundle)."""
        key = _key(name, agent_index)
        model = self._models.get(key)
        if model is None:
            async with self._locks.setdefault(key, anyio.Lock()):
                model = self._models.get(key)
                if model is None:
                    model = await anyio.to_thread.run_sync(self._factory, name)
                    self._models[key] = model
        return model

    async def aclose(self) -> None:
        """Close the models that hold connections."""
        for model in self._models.values():
            close = getattr(model, "aclose", None)
            if close is not None:
                with anyio.CancelScope(shield=True):
                    await close()


def _key(name: str, agent_index: int) -> tuple[str, int]:
    return (name, (max(agent_index, 1) - 1) // AGENTS_PER_MODEL)
