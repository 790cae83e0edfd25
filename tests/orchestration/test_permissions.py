"""The permission policy (allow / ask / deny) and the approvals the person answers; named
resources around commands."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import anyio
import pytest

from orchestration.contracts import AgentResult, AgentStatus, SpawnRequest, StatusResult, TaskSpec
from orchestration.errors import InvalidState
from orchestration.orchestrator import Orchestrator
from tests.orchestration.scripts import Step, by_task, make_repo
from tests.orchestration.test_orchestrator import settings, wait_until_final
from toolbus.permissions import PermissionPolicy, PermissionRequest, PermissionRules

pytestmark = pytest.mark.anyio


# --- the policy ---------------------------------------------------------------------------------


def _decide(policy: PermissionPolicy, **request: object) -> str:
    return policy.decide(PermissionRequest.model_validate(request)).decision


def test_built_in_defaults_allow_commands_and_writes_and_ask_for_network_and_destruction() -> None:
    policy = PermissionPolicy([("settings", PermissionRules())])
    assert _decide(policy, kind="command", subject="make") == "allow"
    assert _decide(policy, kind="write", subject="a.py") == "allow"
    assert _decide(policy, kind="network") == "ask"
    assert _decide(policy, kind="mcp", subject="mcp__db__get", read_only=True) == "allow"
    assert _decide(policy, kind="mcp", subject="mcp__db__put", destructive=False) == "allow"
    assert _decide(policy, kind="mcp", subject="mcp__db__drop", destructive=True) == "ask"


def test_deny_beats_ask_beats_allow_and_globs_match() -> None:
    rules = PermissionRules(
        allow=["run_command(npm *)", "network"],
        ask=["run_command(npm install*)", "write(*.lock)"],
        deny=["run_command(*rm -rf*)", "mcp__db__*"],
    )
    policy = PermissionPolicy([("settings", rules)])
    assert _decide(policy, kind="command", subject="npm test") == "allow"
    assert _decide(policy, kind="command", subject="npm install left-pad") == "ask"
    assert _decide(policy, kind="command", subject="npm x; rm -rf /") == "deny"
    assert _decide(policy, kind="write", subject="deps/yarn.lock") == "ask"
    assert _decide(policy, kind="network") == "allow"
    assert _decide(policy, kind="mcp", subject="mcp__db__get", read_only=True) == "deny"
    verdict = policy.decide(PermissionRequest(kind="command", subject="npm install x"))
    assert verdict.rule == "ask: run_command(npm install*)"


def test_a_run_or_task_can_only_narrow_and_default_deny_refuses_the_unnamed() -> None:
    base = PermissionPolicy([("settings", PermissionRules(allow=["network"]))])
    narrowed = base.narrowed("run", PermissionRules(allow=["run_command"], deny=["network"]))
    assert _decide(narrowed, kind="network") == "deny"
    # a narrowing layer's allow does not loosen what the settings ask
    strict = PermissionPolicy([("settings", PermissionRules(ask=["run_command"]))])
    assert _decide(strict.narrowed("task", PermissionRules(allow=["run_command"])),
                   kind="command", subject="ls") == "ask"  # fmt: skip
    closed = PermissionPolicy([("settings", PermissionRules(default="deny", allow=["write"]))])
    assert _decide(closed, kind="command", subject="ls") == "deny"
    assert _decide(closed, kind="write", subject="x") == "allow"
    assert "commands deny" in closed.describe()


def test_an_unknown_rule_is_refused_naming_the_forms() -> None:
    with pytest.raises(ValueError, match="run_command\\(<glob>\\)"):
        PermissionRules(deny=["Bash(rm *)"])


# --- in a run -----------------------------------------------------------------------------------


async def _until(orch: Orchestrator, run_id: str, predicate: object) -> StatusResult:
    cursor = 0
    with anyio.fail_after(20):
        while True:
            status = await orch.status(run_id=run_id, since=cursor, wait_s=5)
            cursor = status.cursor
            if callable(predicate) and predicate(status):
                return status


def _waiting_for_approval(status: StatusResult) -> bool:
    return any(a.approval is not None for a in status.runs[0].agents)


WRITE_LOCK: list[Step] = [("write_file", {"path": "deps/app.lock", "content": "pinned\n"})]


async def test_a_denied_command_is_a_tool_error_and_is_in_the_result(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    model = by_task({"RM": [("run_command", {"command": "rm -rf src"})]})
    policy = PermissionRules(deny=["run_command(rm *)"])
    async with Orchestrator(settings(repo, permissions=policy), lambda _n: model) as orch:
        spawned = await orch.spawn(SpawnRequest(tasks=[TaskSpec(prompt="RM", name="rm")]))
        assert "rules: deny run_command(rm *)" in spawned.permissions
        done = await wait_until_final(orch, spawned.run_id)
        agent = done.runs[0].agents[0]
        detail = await _result(orch, repo, agent.agent_id)
    result = agent.result
    assert result is not None and result.refused_calls == 1
    assert (repo / "src" / "app" / "core.py").exists()
    assert [p.decision for p in detail.permissions] == ["deny (deny: run_command(rm *))"]


async def _result(orch: Orchestrator, repo: Path, agent_id: str) -> AgentResult:
    ctx = await orch.context(repo)
    record = ctx.store.agent(agent_id)
    assert record is not None and record.result is not None
    return record.result


async def test_an_ask_waits_for_the_person_and_an_allow_lets_the_call_run(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    model = by_task({"LOCK": WRITE_LOCK})
    policy = PermissionRules(ask=["write(*.lock)"])
    async with Orchestrator(settings(repo, permissions=policy), lambda _n: model) as orch:
        task = TaskSpec(prompt="LOCK", name="lock", write_scope=["deps"])
        spawned = await orch.spawn(SpawnRequest(tasks=[task]))
        status = await _until(orch, spawned.run_id, _waiting_for_approval)
        agent = status.runs[0].agents[0]
        assert agent.status is AgentStatus.WAITING
        approval = agent.approval
        assert approval is not None and approval.subject == "deps/app.lock"
        assert approval.rule == "ask: write(*.lock)"
        assert f'answer_approval(approval_id="{approval.approval_id}"' in status.runs[0].next
        pending = await orch.pending_approvals(repo)
        assert [p.approval_id for p in pending] == [approval.approval_id]
        decided = await orch.answer_approval(approval.approval_id, True, None, by="tool")
        assert decided.decision == "allowed"
        with pytest.raises(InvalidState, match="already answered"):
            await orch.answer_approval(approval.approval_id, False, None, by="tool")
        done = await wait_until_final(orch, spawned.run_id)
        result = await _result(orch, repo, agent.agent_id)
    assert done.runs[0].agents[0].status is AgentStatus.SUCCEEDED
    assert [c.path for c in result.changed_files] == ["deps/app.lock"]
    assert [p.decision for p in result.permissions] == ["ask (ask: write(*.lock)): allowed by tool"]


async def test_a_refusal_and_a_timeout_are_tool_errors_the_agent_sees(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    model = by_task({"LOCK": WRITE_LOCK * 2})
    policy = PermissionRules(ask=["write(*.lock)"])
    config = settings(repo, permissions=policy, approval_timeout_s=0.5)
    async with Orchestrator(config, lambda _n: model) as orch:
        task = TaskSpec(prompt="LOCK", name="lock", write_scope=["deps"])
        spawned = await orch.spawn(SpawnRequest(tasks=[task]))
        status = await _until(orch, spawned.run_id, _waiting_for_approval)
        first = status.runs[0].agents[0].approval
        assert first is not None
        await orch.answer_approval(first.approval_id, False, "use the generator", by="tool")
        # the second ask is left unanswered: it times out
        done = await wait_until_final(orch, spawned.run_id)
        result = await _result(orch, repo, done.runs[0].agents[0].agent_id)
    assert not (repo / "deps").exists()
    assert result.changed_files == []
    assert [p.decision for p in result.permissions] == [
        "ask (ask: write(*.lock)): refused by tool: use the generator",
        "ask (ask: write(*.lock)): refused by timeout",
    ]


def _interval_script(name: str, out: Path, go: Path) -> list[Step]:
    """A command that holds `port:8000` until `go` exists, then writes its time span."""
    command = (
        f"s=$(date +%s.%N); while [ ! -e {go} ]; do sleep 0.02; done; "
        f'echo "{name} $s $(date +%s.%N)" >> {out}'
    )
    return [("run_command", {"command": command, "resources": ["port:8000"]})]


async def test_two_agents_never_hold_a_named_resource_together(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    out, go = tmp_path / "intervals.txt", tmp_path / "go"
    model = by_task(
        {
            "SERVE-1": _interval_script("a", out, go),
            "SERVE-2": _interval_script("b", out, go),
            "NO-DECL": [("run_command", {"command": "true", "resources": ["port:9"]})],
        }
    )
    async with Orchestrator(settings(repo), lambda _n: model) as orch:
        tasks = [
            TaskSpec(prompt="SERVE-1", name="a", write_scope=[], resources=["port:8000"]),
            TaskSpec(prompt="SERVE-2", name="b", write_scope=[], resources=["port:8000"]),
            TaskSpec(prompt="NO-DECL", name="c", write_scope=[]),
        ]
        spawned = await orch.spawn(SpawnRequest(tasks=tasks))
        # one command holds the resource (it waits for `go`); the other agent shows waiting,
        # naming the holder
        with anyio.fail_after(20):
            while True:
                status = await orch.status(run_id=spawned.run_id, since=0, wait_s=0.2)
                reasons = [a.status_reason or "" for a in status.runs[0].agents]
                waiting = [r for r in reasons if "port:8000, held by" in r]
                if waiting:
                    break
        assert spawned.run_id in waiting[0]  # the holder: an agent of the run
        go.touch()
        done = await wait_until_final(orch, spawned.run_id)
        c = next(a for a in done.runs[0].agents if a.name == "c")
        c_result = await _result(orch, repo, c.agent_id)
    lines = [line.split() for line in out.read_text().splitlines()]
    spans = sorted((float(start), float(end)) for _, start, end in lines)
    assert len(spans) == 2
    assert spans[0][1] <= spans[1][0], f"the two commands overlapped: {spans}"
    assert c_result.refused_calls == 1  # its resource was not declared


def test_resource_declarations_merge_per_name() -> None:
    task = TaskSpec.model_validate(
        {"prompt": "x", "resources": ["port:8000", {"name": "port:8000", "hold": "agent"}, "cache"]}
    )
    assert [(r.name, r.hold) for r in task.resource_specs()] == [
        ("port:8000", "agent"),
        ("cache", "command"),
    ]


def test_settings_read_the_policy_from_json_or_a_file(tmp_path: Path) -> None:
    from orchestration.config import Settings
    from orchestration.errors import ConfigError

    rules = {"deny": ["network"], "default": "ask"}
    from_json = Settings.from_env({"FANOUT_PERMISSIONS": json.dumps(rules)})
    assert from_json.permissions.deny == ["network"]
    file = tmp_path / "policy.json"
    file.write_text(json.dumps(rules))
    assert Settings.from_env({"FANOUT_PERMISSIONS": f"@{file}"}).permissions.default == "ask"
    with pytest.raises(ConfigError, match="FANOUT_PERMISSIONS"):
        Settings.from_env({"FANOUT_PERMISSIONS": "{not json"})
    with pytest.raises(ConfigError, match="unknown permission rule"):
        Settings.from_env({"FANOUT_PERMISSIONS": '{"deny": ["Bash(x)"]}'})


def _connect(port: int) -> list[Step]:
    code = (
        f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=5); "
        "print('connected')"
    )
    command = f'{os.path.realpath(sys.executable)} -c "{code}"'
    return [("run_command", {"command": command}), ("run_command", {"command": command})]


async def test_the_network_is_granted_on_demand_inside_the_sandbox(
    bwrap: str, tmp_path: Path, listener: int
) -> None:
    repo = make_repo(tmp_path / "repo")
    model = by_task({"NET-ASKS": _connect(listener), "NET-NONE": _connect(listener)})
    config = settings(repo, sandbox="bwrap", sandbox_ro_paths=(Path(sys.base_prefix).resolve(),))
    async with Orchestrator(config, lambda _n: model) as orch:
        tasks = [
            TaskSpec(prompt="NET-ASKS", name="asks", write_scope=[], network=True),
            TaskSpec(prompt="NET-NONE", name="none", write_scope=[]),
        ]
        spawned = await orch.spawn(SpawnRequest(tasks=tasks))
        assert "network ask" in spawned.permissions
        status = await _until(orch, spawned.run_id, _waiting_for_approval)
        approval = next(a.approval for a in status.runs[0].agents if a.approval is not None)
        assert approval is not None and approval.kind == "network"
        await orch.answer_approval(approval.approval_id, True, None, by="tool")
        done = await wait_until_final(orch, spawned.run_id)
        results = {a.name: await _result(orch, repo, a.agent_id) for a in done.runs[0].agents}
    granted = results["asks"].commands
    assert [c.exit_code for c in granted] == [0, 0]  # asked once, then every command has it
    refused = results["none"].commands
    assert refused and all(c.exit_code != 0 for c in refused)
    assert [p.decision for p in results["asks"].permissions] == [
        "allow (default); network: ask (default): allowed by tool"
    ]


async def test_a_command_cannot_change_what_the_policy_guards(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    command = "mkdir -p .github && echo hacked > .github/ci.yml && echo ok > notes.txt"
    model = by_task({"CMD": [("run_command", {"command": command})]})
    policy = PermissionRules(deny=["write(.github/*)"])
    async with Orchestrator(settings(repo, permissions=policy), lambda _n: model) as orch:
        spawned = await orch.spawn(SpawnRequest(tasks=[TaskSpec(prompt="CMD", name="cmd")]))
        done = await wait_until_final(orch, spawned.run_id)
        result = await _result(orch, repo, done.runs[0].agents[0].agent_id)
    assert [c.path for c in result.changed_files] == ["notes.txt"]
    assert ".github/ci.yml" in result.dropped_files
    (decision,) = result.permissions
    assert decision.tool == "commit" and decision.subject == ".github/ci.yml"
    assert decision.decision.startswith("deny (deny: write(.github/*)): a command's change")
