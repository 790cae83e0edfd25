"""A real third-party client, the MCP Inspector CLI (npm), lists the tools and calls get_status
against the stdio server, in both protocol eras. Install it with `scripts/install-inspector`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mcp_server.demo import make_sample_repo

ROOT = Path(__file__).resolve().parents[2]
INSPECTOR = ROOT / ".inspector" / "node_modules" / ".bin" / "mcp-inspector"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not INSPECTOR.exists(),
        reason="the MCP Inspector is not installed: run scripts/install-inspector",
    ),
]


def _inspect(tmp_path: Path, repo: Path, era: str, *method: str) -> dict[str, object]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    command = [
        str(INSPECTOR),
        "--cli",
        "--protocol-era",
        era,
        "-q",
        "--format",
        "json",
        sys.executable,
        "-m",
        "mcp_server.cli",
        "--repo",
        str(repo),
        "--model-provider",
        "demo",
        *method,
    ]
    proc = subprocess.run(
        command,
        cwd=ROOT,
        env={"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return json.loads(proc.stdout)


@pytest.mark.parametrize("era", ["legacy", "modern"])
def test_inspector_lists_tools_and_calls_get_status(tmp_path: Path, era: str) -> None:
    repo = make_sample_repo(tmp_path)
    listed = _inspect(tmp_path, repo, era, "--method", "tools/list")
    result = listed["result"]
    assert isinstance(result, dict)
    names = {t["name"] for t in result["tools"]}  # pyright: ignore[reportUnknownVariableType]
    assert {"spawn_subagents", "get_status", "merge_results", "ping"} <= names
    called = _inspect(
        tmp_path,
        repo,
        era,
        "--method",
        "tools/call",
        "--tool-name",
        "get_status",
        "--tool-args-json",
        "{}",
    )
    answer = called["result"]
    assert isinstance(answer, dict)
    assert answer["isError"] is False
    assert answer["structuredContent"]["runs"] == []  # pyright: ignore[reportIndexIssue]
