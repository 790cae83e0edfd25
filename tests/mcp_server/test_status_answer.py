"""The get_status answer: compact (one line per agent that changed after the cursor), the same
facts in its structured content and its text, bounded, and the full record only on request."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp_types import CallToolResult, TextContent

from mcp_server import answers
from mcp_server.demo import DEMO_TASKS, demo_model_factory, make_sample_repo
from mcp_server.server import build_server
from orchestration.config import Settings
from orchestration.contracts import (
    AgentMergeResult,
    AgentResultView,
    AgentStatus,
    AgentView,
    DiffStat,
    LeaseView,
    MergeOutcome,
    MergeResult,
    RunTotals,
    RunView,
    ServerLoad,
    StatusResult,
    StopReason,
    TokenUsage,
)

pytestmark = pytest.mark.anyio


def _view(agent_id: str, status: AgentStatus, leases: list[LeaseView] | None = None) -> AgentView:
    return AgentView(
        agent_id=agent_id,
        run_id="r1",
        name=agent_id,
        status=status,
        turns=1,
        max_turns=40,
        tokens=TokenUsage(input=10, output=2),
        write_scope=["src"],
        leases=leases or [],
        changed_files=["src/a.py"],
        model="m",
        base_commit="b" * 40,
    )


def _status(*views: AgentView, cursor: int = 1) -> StatusResult:
    totals = RunTotals(
        agents=len(views),
        by_status={"running": len(views)},
        tokens=TokenUsage(),
        budget_tokens=100,
        budget_used=1,
        budget_remaining=99,
    )
    run = RunView(
        run_id="r1",
        repo="/repo",
        created_at=1.0,
        base_commit="b" * 40,
        max_concurrency=4,
        totals=totals,
        agents=list(views),
    )
    server = ServerLoad(running=1, max_running=64, tokens_used=0)
    return StatusResult(
        cursor=cursor, changed=True, runs=[run], workspace_disk_bytes=0, server=server
    )


def test_the_answer_is_one_line_per_changed_agent_in_json_and_text() -> None:
    a, b = _view("r1-a1", AgentStatus.RUNNING), _view("r1-a2", AgentStatus.FAILED)
    status = _status(a, b)
    answer = answers.status_answer(status)
    body = answers.dump(answer)
    assert answers.StatusAnswer.model_validate(body) == answer
    line = body["runs"][0]["agents"][0]
    assert line == {
        "agent_id": "r1-a1",
        "name": "r1-a1",
        "status": "running",
        "files": 1,
        "tokens": 12,
    }
    text = answers.status_text(answer)
    assert "r1-a1 · r1-a1 · running · 1 files +0 -0 · 12 tok" in text
    assert "r1-a2 · r1-a2 · failed" in text
    # agents that did not change after the cursor are not repeated
    run = status.runs[0].model_copy(update={"changed_agents": ["r1-a2"]})
    only_b = status.model_copy(update={"runs": [run]})
    shown = answers.status_answer(only_b).runs[0].agents
    assert [x.agent_id for x in shown] == ["r1-a2"]


def test_the_server_line_says_when_the_rate_limit_holds_requests_back() -> None:
    """Shown only while it holds them back: a fan-out that runs slowly because of the API's
    rate limit is not helped by more agents, and the orchestrator should know that."""
    status = _status(_view("r1-a1", AgentStatus.RUNNING))
    assert answers.status_answer(status).server is None
    note = "the model API's rate limit (429) holds requests back, 3 requests to m waiting"
    server = status.server.model_copy(update={"rate_limited": note})
    answer = answers.status_answer(status.model_copy(update={"server": server}))
    assert answer.server is not None and answer.server.rate_limited == note
    assert note in answers.status_text(answer)
    assert answers.StatusAnswer.model_validate(answers.dump(answer)) == answer


def test_runs_with_nothing_left_to_do_are_counted_unless_named() -> None:
    """An answer without run_id must not grow with the server's history: closed runs (every
    agent merged or discarded) are counted unless named, changed after the cursor, or asked
    about in detail."""
    closed = _status(_view("r1-a1", AgentStatus.MERGED), _view("r1-a2", AgentStatus.DISCARDED))
    moving = (
        _status(_view("r3-a1", AgentStatus.RUNNING)).runs[0].model_copy(update={"run_id": "r3"})
    )
    older = closed.runs[0].model_copy(update={"run_id": "r0"})
    failed = _status(_view("r2-a1", AgentStatus.FAILED)).runs[0].model_copy(update={"run_id": "r2"})
    history = closed.model_copy(update={"runs": [older, closed.runs[0], failed, moving]})
    answer = answers.status_answer(history, every_run=False)
    assert [r.run_id for r in answer.runs] == ["r2", "r3"]  # a failed agent still wants you
    assert (answer.closed_runs, answer.last_closed_run) == (2, "r1")
    text = answers.status_text(answer)
    assert "2 closed runs not shown" in text and "newest r1" in text
    assert answers.StatusAnswer.model_validate(answers.dump(answer)) == answer
    # named (run_id or agent_ids), asked about in detail, or changed after the cursor: shown
    assert len(answers.status_answer(history).runs) == 4
    assert "r1" in [
        r.run_id for r in answers.status_answer(history, ["r1-a1"], every_run=False).runs
    ]
    just_merged = closed.runs[0].model_copy(update={"changed_agents": ["r1-a1"]})
    after = history.model_copy(update={"runs": [older, just_merged, failed, moving]})
    shown = answers.status_answer(after, every_run=False)
    assert [r.run_id for r in shown.runs] == ["r1", "r2", "r3"]
    assert shown.closed_runs == 1
    # only closed runs: not mistaken for "no runs yet"
    only = answers.status_answer(closed, every_run=False)
    assert only.runs == [] and "no runs yet" not in answers.status_text(only)


def test_a_long_summary_is_one_line_in_answers_and_bounded_in_detail() -> None:
    long = "Headline of the work\n" + "body " * 2_000
    result = AgentResultView(
        stop_reason=StopReason.FINISHED,
        summary=long,
        follow_ups=[f"follow {i} " + "x" * 500 for i in range(15)],
    )
    view = _view("r1-a1", AgentStatus.SUCCEEDED).model_copy(update={"result": result})
    answer = answers.status_answer(_status(view), detail=["r1-a1"])
    assert answer.runs[0].agents[0].summary == "Headline of the work"
    shown = answer.detail[0].agent.result
    assert shown is not None
    assert len(shown.summary) <= 1_500 and "fanout://agents/r1-a1/result" in shown.summary
    assert len(shown.follow_ups) == answers.FOLLOW_UPS_SHOWN + 1
    assert all(len(f) <= answers.FOLLOW_UP_CHARS for f in shown.follow_ups)
    assert len(json.dumps(answers.dump(answer))) < 8_000


def test_an_agents_error_shows_once_in_its_line() -> None:
    """A failed agent's error is its line's summary when it has none of its own, and not a
    flag as well; beside a summary of its own it is a flag."""
    error = "the model API answered 401 (authentication_error): invalid x-api-key"
    bare = AgentResultView(stop_reason=StopReason.MODEL_ERROR, summary="", error=error)
    told = bare.model_copy(update={"summary": "Got half way"})
    lines = [
        answers.agent_line(_view(f"r1-a{i}", AgentStatus.FAILED).model_copy(update={"result": r}))
        for i, r in enumerate((bare, told))
    ]
    assert (lines[0].summary, lines[0].flags) == (error, ["stop: model_error"])
    assert lines[1].summary == "Got half way"
    assert lines[1].flags == ["error: " + answers.one_line(error, 80), "stop: model_error"]


def test_a_merge_reason_several_agents_share_is_given_whole_once() -> None:
    """The checkout could not be brought forward, so every agent's merge was undone: the first
    agent's line gives the reason, the others refer to it; short reasons stay as they are."""
    undone = (
        "your checkout could not be brought forward, so the merge was undone (nothing "
        "changed): fatal: You need to resolve your current index first"
    )
    agents = [
        AgentMergeResult(
            agent_id=f"r1-a{i}", name=f"t{i}", outcome=MergeOutcome.SKIPPED, reason=undone
        )
        for i in range(1, 65)
    ]
    agents += [
        AgentMergeResult(
            agent_id=f"r1-b{i}", name=f"d{i}", outcome=MergeOutcome.DISCARDED, reason="discarded"
        )
        for i in (1, 2)
    ]
    result = MergeResult(
        run_id="r1", dry_run=False, agents=agents, head="h" * 40, branch=None, diffstat=DiffStat()
    )
    answer = answers.merge_answer(result)
    reasons = [line.reason for line in answer.agents]
    assert reasons == [undone] + ["the same as r1-a1"] * 63 + ["discarded"] * 2
    assert answers.merge_text(answer).count("You need to resolve") == 1
    assert len(json.dumps(answers.dump(answer))) < 100 * len(agents)


def _structured(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, result
    assert result.structured_content is not None
    return dict(result.structured_content)


def _text(result: CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, TextContent))


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_status_over_the_client_follows_changes_and_is_not_shared(
    tmp_path: Path, mode: str
) -> None:
    repo = make_sample_repo(tmp_path)
    settings = Settings.from_env({}, repo=repo, sandbox="none")
    async with Client(build_server(settings, demo_model_factory()), mode=mode) as client:
        tasks = [
            {"name": key, "prompt": t.prompt, "write_scope": t.write_scope}
            for key, t in DEMO_TASKS.items()
            if key != "greeting"
        ]
        spawned = _structured(await client.call_tool("spawn_subagents", {"tasks": tasks}))
        run_id = spawned["run_id"]
        with anyio.fail_after(30):
            settled = await client.call_tool(
                "get_status", {"run_id": run_id, "since": 0, "wait_s": 30}
            )
        body = _structured(settled)
        run = body["runs"][0]
        assert run["settled"] and {a["status"] for a in run["agents"]} == {"succeeded"}
        assert run["next"].startswith(f'merge_results(run_id="{run_id}") merges')
        assert _text(settled) == answers.status_text(answers.StatusAnswer.model_validate(body))
        # nothing changed since that cursor: a poll without waiting lists no agent
        quiet = _structured(
            await client.call_tool("get_status", {"run_id": run_id, "since": body["cursor"]})
        )
        assert quiet["runs"][0]["agents"] == [] and quiet["runs"][0]["settled"]
        # what a client does with its answer does not reach the next answer
        first = await client.call_tool("get_status", {"run_id": run_id})
        assert first.structured_content is not None
        first.structured_content["runs"][0]["agents"][0]["name"] = "tampered"
        again = _structured(await client.call_tool("get_status", {"run_id": run_id}))
        assert {a["status"] for a in again["runs"][0]["agents"]} == {"succeeded"}
        assert "tampered" not in json.dumps(again)

        await client.call_tool("merge_results", {"run_id": run_id})
        merged = _structured(await client.call_tool("get_status", {"run_id": run_id}))
        assert {a["status"] for a in merged["runs"][0]["agents"]} == {"merged"}
        assert merged["cursor"] > again["cursor"]
        assert merged["runs"][0]["next"].startswith("nothing to do")
        unnamed = _structured(await client.call_tool("get_status", {}))
        assert unnamed.get("runs") in (None, []), unnamed
        assert (unnamed["closed_runs"], unnamed["last_closed_run"]) == (1, run_id)
