"""How the end-to-end tests start this checkout's stdio server with the real `anthropic` client
pointed at a fake Messages API."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mcp import StdioServerParameters

ROOT = Path(__file__).resolve().parents[2]


def stdio_params(repo: Path, base_url: str) -> StdioServerParameters:
    """The server on `repo`, its model calls going to the fake at `base_url`, no sandbox."""
    env = {
        **os.environ,
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": "sk-test-dummy",
        "FANOUT_SANDBOX": "none",
        "FANOUT_MODEL_PROVIDER": "anthropic",
        "PYTHONPATH": str(ROOT),
    }
    return StdioServerParameters(
        command=sys.executable, args=["-m", "mcp_server.cli", "--repo", str(repo)], env=env
    )
