"""A small downstream MCP server for the tests of `mcp_server.downstream`, run over stdio.

Its store is a JSON file in the agent's workspace (`FANOUT_WORKSPACE`, else its working
directory); every tool call appends one JSON line (tool, start, end, pid, whether the store's
directory is a git work tree, and its working directory) to the `--log` file so tests can see
which process ran a call, whether calls overlapped in time, and where::

    python -m tests.mcp_server.downstream_server --log FILE
"""

from __future__ import annotations

import argparse
import json
import os
import time

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import TypeAdapter

STORE = "store.json"
READ_ONLY = ToolAnnotations(read_only_hint=True)
ADDITIVE = ToolAnnotations(read_only_hint=False, destructive_hint=False)

_store_adapter = TypeAdapter(dict[str, str])


def build_server(log_path: str, store_dir: str = ".") -> MCPServer:
    """The server with its tools and its one resource; calls are logged to `log_path`, the store
    is in `store_dir`."""
    server = MCPServer("downstream-test", version="1.0")
    store = anyio.Path(store_dir) / STORE

    async def load() -> dict[str, str]:
        if not await store.exists():
            return {}
        return _store_adapter.validate_json(await store.read_text())

    async def save(data: dict[str, str]) -> None:
        await store.write_text(json.dumps(data, sort_keys=True))

    async def log(tool: str, start: float) -> None:
        # whether it runs in a git work tree (an agent's workspace has its `.git` file)
        git = os.path.isfile(os.path.join(store_dir, ".git"))
        line = json.dumps(
            {
                "tool": tool,
                "start": start,
                "end": time.time(),
                "pid": os.getpid(),
                "git": git,
                "cwd": os.getcwd(),
            }
        )
        async with await anyio.open_file(log_path, "a") as file:
            await file.write(line + "\n")

    @server.tool(annotations=READ_ONLY)
    async def get(key: str) -> str:
        """The value stored under `key`."""
        start = time.time()
        try:
            data = await load()
            if key not in data:
                raise ToolError(f"no value under {key!r}")
            return data[key]
        finally:
            await log("get", start)

    @server.tool(annotations=READ_ONLY)
    async def slow_get(key: str, ms: int) -> str:
        """The value stored under `key`, after sleeping `ms` milliseconds."""
        start = time.time()
        try:
            await anyio.sleep(ms / 1000)
            return (await load()).get(key, "")
        finally:
            await log("slow_get", start)

    @server.tool(annotations=ADDITIVE)
    async def put(key: str, value: str) -> str:
        """Store `value` under `key`."""
        start = time.time()
        try:
            data = await load()
            data[key] = value
            await save(data)
            return "ok"
        finally:
            await log("put", start)

    @server.tool(annotations=ADDITIVE)
    async def slow_put(key: str, value: str, ms: int) -> str:
        """Store `value` under `key`, after sleeping `ms` milliseconds."""
        start = time.time()
        try:
            await anyio.sleep(ms / 1000)
            data = await load()
            data[key] = value
            await save(data)
            return "ok"
        finally:
            await log("slow_put", start)

    @server.tool()
    async def drop(key: str) -> str:
        """Remove `key` from the store (no annotations: destructive by MCP's defaults)."""
        start = time.time()
        try:
            data = await load()
            data.pop(key, None)
            await save(data)
            return "ok"
        finally:
            await log("drop", start)

    @server.tool()
    async def crash() -> str:
        """Exit the server process at once, as a crash would."""
        await log("crash", time.time())
        os._exit(3)

    @server.tool(annotations=READ_ONLY)
    async def big(n: int) -> str:
        """`n` characters: the digits 0-9 repeated."""
        start = time.time()
        try:
            return ("0123456789" * (n // 10 + 1))[:n]
        finally:
            await log("big", start)

    @server.resource("store://all", mime_type="application/json")
    async def everything() -> str:
        """The whole store as JSON."""
        return json.dumps(await load(), sort_keys=True)

    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--log", required=True, help="file that receives one JSON line per call")
    args = parser.parse_args()
    # where the agent works: the server is told (it does not start there)
    build_server(str(args.log), os.environ.get("FANOUT_WORKSPACE", ".")).run()


if __name__ == "__main__":
    main()
