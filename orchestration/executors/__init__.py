"""Where an agent runs: its workspace, its loop, its bus and its commands.

The runner keeps what belongs to the repository (the durable state, the leases, the gate, the
join); an executor runs the rest. `in_process` is the default and the reference; `ray` runs each
agent on a Ray cluster and brings its work back as git objects (`shipping`).
"""

from __future__ import annotations

from collections.abc import Callable

from orchestration.config import Settings
from orchestration.executors.base import Executor, InProcessExecutor


def make_executor(settings: Settings, start_soon: Callable[..., None]) -> Executor:
    """The executor the settings name (`FANOUT_EXECUTOR`)."""
    if settings.executor == "ray":
        from orchestration.executors.ray_executor import RayExecutor

        return RayExecutor(settings, start_soon)
    return InProcessExecutor()


__all__ = ["Executor", "InProcessExecutor", "make_executor"]
