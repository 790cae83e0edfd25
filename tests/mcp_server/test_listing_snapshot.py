"""What a client lists (tools with their input and output schemas, descriptions and annotations,
resources, resource templates, prompts) is byte-for-byte the stored snapshot, in both protocol
eras (each lists the same, its keys in its own order): a refactoring of the MCP layer cannot
change the surface by accident.

After an intended change of the surface, write the snapshot again with
`python -m tests.mcp_server.test_listing_snapshot` and review its diff.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from mcp_server.demo import demo_model_factory, make_sample_repo
from mcp_server.server import build_server
from orchestration.config import Settings

pytestmark = pytest.mark.anyio

SNAPSHOT = Path(__file__).with_name("listing_snapshot.json")
ERAS = ["legacy", "auto"]


async def listing(repo: Path, mode: str) -> dict[str, Any]:
    """Everything the server lists, as JSON data in the order the server lists it."""
    settings = Settings.from_env({}, repo=repo, sandbox="none")
    async with Client(build_server(settings, demo_model_factory()), mode=mode) as client:
        tools = (await client.list_tools()).tools
        resources = (await client.list_resources()).resources
        templates = (await client.list_resource_templates()).resource_templates
        prompts = (await client.list_prompts()).prompts
    dump: dict[str, Any] = {"mode": "json", "by_alias": True, "exclude_none": True}
    return {
        "tools": [t.model_dump(**dump) for t in tools],
        "resources": [r.model_dump(**dump) for r in resources],
        "resource_templates": [t.model_dump(**dump) for t in templates],
        "prompts": [p.model_dump(**dump) for p in prompts],
    }


def _text(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=1, ensure_ascii=False) + "\n"


async def listings(repo: Path) -> dict[str, Any]:
    return {mode: await listing(repo, mode) for mode in ERAS}


async def test_the_listing_is_the_snapshot(tmp_path: Path) -> None:
    listed = await listings(make_sample_repo(tmp_path))
    assert _text(listed) == SNAPSHOT.read_text(encoding="utf-8")


async def _write() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        SNAPSHOT.write_text(_text(await listings(make_sample_repo(Path(tmp)))), "utf-8")


if __name__ == "__main__":
    anyio.run(_write)
