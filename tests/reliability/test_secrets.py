"""Secrets in the server's environment never reach a command, a model, the state or the client.

A full run through the real MCP server (in memory, a real MCP client) with a scripted model whose
agents print their environment in every way a shell offers, and one that commits it to a file
and gets merged. Then every byte under `.git/fanout`, the repository history, every tool result
sent to the model, every status answer and every resource read is searched for the secrets.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp_types import CallToolResult, TextContent, TextResourceContents

from mcp_server.server import build_server
from orchestration.config import Settings
from orchestration.model import ModelRequest
from tests.orchestration.scripts import by_task, git, make_repo
from tests.reliability.conftest import Ledger
from toolbus.sandbox import probe_bwrap

pytestmark = pytest.mark.anyio

GUARANTEE = "G2 secrets never leave the server process"
SECRETS = {
    "ANTHROPIC_API_KEY": "sk-ant-SECRET-api03-r3l1ab1l1ty-0000",
    "ANTHROPIC_AUTH_TOKEN": "sk-ant-SECRET-oauth-r3l1ab1l1ty-1111",
    "OPENAI_API_KEY": "sk-SECRET-openai-r3l1ab1l1ty-2222",
    "AWS_SECRET_ACCESS_KEY": "SECRET-aws-r3l1ab1l1ty-3333",
    "GITHUB_TOKEN": "ghp_SECRET-r3l1ab1l1ty-4444",
    "DATABASE_PASSWORD": "SECRET-db-r3l1ab1l1ty-5555",
    "FANOUT_HTTP_TOKEN": "SECRET-http-r3l1ab1l1ty-6666",
    "MY_CREDENTIALS": "SECRET-creds-r3l1ab1l1ty-7777",
    "npm_config__authToken": "SECRET-npm-r3l1ab1l1ty-8888",
}
LEAK_COMMANDS = [
    "env",
    "printenv",
    "export -p",
    "set",
    'echo "$ANTHROPIC_API_KEY$ANTHROPIC_AUTH_TOKEN$GITHUB_TOKEN$AWS_SECRET_ACCESS_KEY"',
    "tr '\\0' '\\n' < /proc/self/environ",
    "tr '\\0' '\\n' < /proc/$$/environ",
    "python3 -c 'import os; print(dict(os.environ))'",
    "git config -l",
    "cat ~/.bashrc ~/.profile 2>&1; ls -la ~",
    "env > src/app/env.txt; tr '\\0' '\\n' < /proc/self/environ >> src/app/env.txt",
]


def _texts(result: CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, TextContent))


def _structured(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, _texts(result)
    assert result.structured_content is not None
    return dict(result.structured_content)


def _leaks(blob: bytes) -> list[str]:
    return [name for name, value in SECRETS.items() if value.encode() in blob]


@pytest.fixture(params=["none", "bwrap"])
async def sandbox(request: pytest.FixtureRequest) -> str:
    mode = str(request.param)
    if mode == "bwrap":
        exe = shutil.which("bwrap")
        reason = "bubblewrap not installed" if exe is None else await probe_bwrap(exe)
        if reason is not None:
            pytest.skip(f"sandboxed variant skipped: {reason}")
    return mode


async def test_secrets_stay_out_of_commands_state_and_answers(
    tmp_path: Path, sandbox: str, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    repo = make_repo(tmp_path / "repo")
    seen: list[ModelRequest] = []
    steps = [("run_command", {"command": c}) for c in LEAK_COMMANDS]
    model = by_task({"LEAKY": list(steps)}, seen=seen)  # pyright: ignore[reportArgumentType]
    # A wildcard passthrough is the riskiest configuration: secret-looking names must still stop.
    settings = Settings.from_env(
        {}, repo=repo, sandbox=sandbox, env_passthrough=("*",), lease_ttl_s=30.0
    )
    answers: list[str] = []
    async with Client(build_server(settings, lambda _name: model), mode="legacy") as client:
        spawned = await client.call_tool(
            "spawn_subagents",
            {"tasks": [{"prompt": "LEAKY print the environment", "write_scope": ["src/app"]}]},
        )
        answers.append(_texts(spawned) + json.dumps(spawned.structured_content))
        run_id = _structured(spawned)["run_id"]
        cursor = 0
        with anyio.fail_after(60):
            while True:
                status = await client.call_tool(
                    "get_status", {"run_id": run_id, "since": cursor, "wait_s": 5}
                )
                answers.append(_texts(status) + json.dumps(status.structured_content))
                body = _structured(status)
                cursor = body["cursor"]
                agents = body["runs"][0]["agents"]
                if not any(a["status"] in ("queued", "waiting", "running") for a in agents):
                    break
        assert [a["status"] for a in agents] == ["succeeded"], agents
        agent_id = agents[0]["agent_id"]
        merged = await client.call_tool("merge_results", {"run_id": run_id})
        answers.append(_texts(merged) + json.dumps(merged.structured_content))
        assert _structured(merged)["agents"][0]["outcome"] == "merged", _texts(merged)
        for uri in (
            f"fanout://agents/{agent_id}/transcript",
            f"fanout://agents/{agent_id}/result",
            f"fanout://agents/{agent_id}/diff",
            f"fanout://runs/{run_id}",
            "fanout://runs",
            "fanout://leases",
        ):
            resource = await client.read_resource(uri)
            answers.append(
                "\n".join(c.text for c in resource.contents if isinstance(c, TextResourceContents))
            )
        final = await client.call_tool("get_status", {})
        answers.append(_texts(final) + json.dumps(final.structured_content))

    # the commands did run and saw an environment (the test is not vacuous)
    tool_results = [r.model_dump_json() for r in seen]
    assert any("PATH=" in t for t in tool_results)
    assert (repo / "src/app/env.txt").read_text().count("HOME=") >= 1

    history = await anyio.run_process(["git", "log", "-p", "--all"], cwd=repo, check=True)
    sources: dict[str, bytes] = {
        "tool results sent to the model": "\n".join(tool_results).encode(),
        "MCP answers and resources": "\n".join(answers).encode(),
        "merged file written from env": (repo / "src/app/env.txt").read_bytes(),
        "repository history": history.stdout,
    }
    state_dir = repo / ".git" / "fanout"
    for expected in ("transcripts", "audit", "state.db", "leases.db"):
        assert any(p.name == expected for p in state_dir.iterdir()), expected
    for path in sorted(state_dir.rglob("*")):
        if path.is_file() and not path.is_symlink():
            sources[f"state file {path.relative_to(state_dir)}"] = path.read_bytes()
    for what, blob in sources.items():
        leaked = _leaks(blob)
        ledger.record(GUARANTEE, f"[{sandbox}] {what}", not leaked, f"holds {leaked}")
    failures = [f for f in ledger.failures(GUARANTEE) if f.startswith(f"[{sandbox}]")]
    assert not failures, "\n".join(failures)
    assert git(repo, "status", "--porcelain") == ""
    assert os.environ["ANTHROPIC_API_KEY"] == SECRETS["ANTHROPIC_API_KEY"]
