"""Running one call in many threads at once, for tests of races."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def race(call: Callable[[int], T], count: int) -> list[T]:
    """`call(n)` for each n below `count`, each in a thread of its own, all released at once by
    a barrier; their results, in the order they came. The first error a thread raised (a
    broken barrier included) is raised here once every thread has ended."""
    start = threading.Barrier(count, timeout=10)
    results: list[T] = []
    errors: list[BaseException] = []

    def one(n: int) -> None:
        try:
            start.wait()
            results.append(call(n))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results
