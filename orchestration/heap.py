"""Keep Python's cycle collector off the process's long-lived objects.

A server process holds a great many objects that live as long as it does: modules, classes, the
pydantic schemas of the MCP SDK and of the `anthropic` SDK. A full (generation 2) collection
walks all of them, on whichever thread allocates at that moment, usually the event loop, so every
running agent and every client waits. `gc.freeze()` moves every object alive at that moment out
of the collector's sight, after which a full collection walks only what the server has made
since.

Frozen objects are still freed by reference counting; only cyclic garbage among them would stay,
which is why the heap is frozen once, after start-up, with its garbage collected first.

The young generation's threshold is raised at the same time. At the default (700 allocations) a
running fan-out triggers young collections many times over each agent's run, and each one
walks every young object still alive, most of them the agents' state that outlives the
collection anyway. The young count is allocations less deallocations, so it climbs while
agents start and falls back as they end: a threshold above what a fan-out of 64 agents holds
at its peak (some tens of thousands of objects) lets most of them be freed before any
collection walks them, at the price of more objects waiting for their collection. Far above
that, the rare collection walks so many that it pauses the event loop for longer than the
older generation's collections do.
"""

from __future__ import annotations

import gc
import importlib
import logging
import threading
from collections.abc import Sequence

log = logging.getLogger("fanout.heap")

YOUNG_THRESHOLD = 50_000


def freeze_heap() -> None:
    """Collect the garbage there is now, freeze every object still alive, and raise the young
    generation's threshold to `YOUNG_THRESHOLD` (a higher one already set is kept)."""
    gc.collect()
    gc.freeze()
    young, *older = gc.get_threshold()
    if 0 < young < YOUNG_THRESHOLD:  # (0: collection is off, and stays so)
        gc.set_threshold(YOUNG_THRESHOLD, *older)


def warm_up(modules: Sequence[str] = ()) -> None:
    """Import `modules` (a provider's SDK, which a first spawn would otherwise import on the
    event loop, a pause of seconds for `anthropic`) and run each one's own `warm_up()` if it has
    one, then `freeze_heap`. A failure is logged and left for the first real use to report."""
    for name in modules:
        try:
            module = importlib.import_module(name)
            hook = getattr(module, "warm_up", None)
            if callable(hook):
                hook()
        except Exception:  # the first use reports it to the client, with the cause
            log.warning("warm-up: %s failed", name, exc_info=True)
    freeze_heap()


def warm_up_in_background(modules: Sequence[str] = ()) -> threading.Thread:
    """`warm_up` in a daemon thread, so that a server answers its client meanwhile."""
    thread = threading.Thread(target=warm_up, args=(modules,), name="fanout-warm-up", daemon=True)
    thread.start()
    return thread
