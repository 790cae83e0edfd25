"""What an agent's record tells about where it starts."""

from __future__ import annotations

from orchestration.records import resumes_work
from tests.orchestration.test_state import _agent  # pyright: ignore[reportPrivateUsage]


def test_only_a_rerun_resumed_from_its_predecessors_commit_starts_from_an_agents_work() -> None:
    fresh = _agent("a1")
    assert not resumes_work(fresh, fresh.base_commit)
    # an agent that waited for merges starts from the user's head, which the user merged
    assert not resumes_work(fresh, "head")
    # a rerun that starts over on the head
    over = _agent("a2").model_copy(update={"rerun_of": "a1", "base_commit": "head"})
    assert not resumes_work(over, "head")
    # a rerun resumed from the commit its interrupted predecessor left
    resumed = _agent("a3").model_copy(update={"rerun_of": "a1", "start_commit": "work"})
    assert resumes_work(resumed, "work")
