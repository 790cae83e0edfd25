"""Resources: runs, a run's shared-context snapshot and its files at the base, each agent's
result, diff and transcript (read on demand, never pushed), and the lease table.

A plain reader per resource over the app state, and `RESOURCES`, the table that declares each
(URI or URI template, name, description, MIME type, reader)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import MethodType
from typing import Any

import anyio
from mcp.server.mcpserver import MCPServer

from mcp_server.app import App
from orchestration.context import RepoContext
from orchestration.queries import RepoQueries

MAX_TRANSCRIPT_BYTES = 2_000_000
MAX_FILE_BYTES = 1_000_000


def _json(value: Any) -> str:
    return json.dumps(value, indent=1, sort_keys=False, default=str)


async def _queries(app: App) -> RepoQueries:
    return RepoQueries(await app.context())


async def leases_json(ctx: RepoContext) -> str:
    rows = await RepoQueries(ctx).leases(time.time())
    return _json([dataclasses.asdict(row) for row in rows])


async def runs(app: App) -> str:
    # every run and agent the repository had: read in a worker thread, not on the event loop
    listings = await anyio.to_thread.run_sync((await _queries(app)).runs)
    return _json(
        [
            {
                "run_id": listing.run.run_id,
                "created_at": listing.run.created_at,
                "base_commit": listing.run.base_commit,
                "agents": {agent_id: s.value for agent_id, s in listing.statuses.items()},
                "uri": f"fanout://runs/{listing.run.run_id}",
            }
            for listing in listings
        ]
    )


async def leases(app: App) -> str:
    return await leases_json(await app.context())


async def run(app: App, run_id: str) -> str:
    queries = await _queries(app)
    record = queries.run(run_id)
    files = await queries.base_files(record)
    shared = record.shared
    return _json(
        {
            "run_id": record.run_id,
            "repo": record.repo,
            "base_commit": record.base_commit,
            "snapshot_of_uncommitted_changes": record.snapshot_dirty,
            "plan": shared.plan,
            "conventions": shared.conventions,
            "shared_files": [
                {"path": f.path, "blob": f.blob, "size": f.size, "note": f.note}
                for f in shared.files
            ],
            "files": [{"path": f.path, "blob": f.blob} for f in files],
            "file_uri_template": f"fanout://runs/{run_id}/files/{{+path}}",
        }
    )


async def run_file(app: App, run_id: str, path: str) -> str | bytes:
    found = await (await _queries(app)).file_at_base(run_id, path, MAX_FILE_BYTES)
    if found.text is None:
        return f"({found.size} bytes: too big to serve; read it from git: {found.blob})"
    return found.text


async def agent_result(app: App, agent_id: str) -> str:
    agent = (await _queries(app)).agent(agent_id)
    data = agent.model_dump(mode="json", exclude={"rerun_context", "prompt"})
    data["prompt"] = agent.prompt
    return _json(data)


async def agent_diff(app: App, agent_id: str) -> str:
    queries = await _queries(app)
    agent = queries.agent(agent_id)
    if agent.commit is None:
        return f"# {agent_id} has no commit yet (status {agent.status.value})\n"
    diff = await queries.diff(agent, agent.commit)
    header = f"# {agent_id}: git diff {agent.base_commit[:12]}..{agent.commit[:12]}\n"
    if agent.conflicts:
        header += "# conflicts with the canonical head in: " + ", ".join(agent.conflicts) + "\n"
        hunks = await queries.conflict_hunks(agent, agent.commit)
        header += "# the conflicting files merged onto the current head, with markers:\n"
        header += hunks + "\n# the agent's own diff:\n"
    return header + diff


async def agent_transcript(app: App, agent_id: str) -> str:
    return await (await _queries(app)).transcript(agent_id, MAX_TRANSCRIPT_BYTES)


@dataclass(frozen=True)
class ResourceSpec:
    """One resource (or URI template) as clients list it, and the reader that answers it: an
    async function of the app and the template's variables."""

    uri: str
    name: str
    description: str
    read: Callable[..., Awaitable[str | bytes]]
    mime_type: str | None = None


RESOURCES: tuple[ResourceSpec, ...] = (
    ResourceSpec(
        uri="fanout://runs",
        name="runs",
        description="Every run of the repository with its agents' statuses.",
        mime_type="application/json",
        read=runs,
    ),
    ResourceSpec(
        uri="fanout://leases",
        name="leases",
        description="The live lease table: holder, path, mode, fencing token, expiry.",
        mime_type="application/json",
        read=leases,
    ),
    ResourceSpec(
        uri="fanout://runs/{run_id}",
        name="run",
        description="A run's shared-context snapshot: plan, conventions, shared files, the base "
        "commit and every file at the base with its blob hash.",
        mime_type="application/json",
        read=run,
    ),
    ResourceSpec(
        uri="fanout://runs/{run_id}/files/{+path}",
        name="run-file",
        description="A file's content at the run's base commit.",
        read=run_file,
    ),
    ResourceSpec(
        uri="fanout://agents/{agent_id}/result",
        name="agent-result",
        description="An agent's record and, once finished, its result (facts from the tool bus "
        "and git plus its summary).",
        mime_type="application/json",
        read=agent_result,
    ),
    ResourceSpec(
        uri="fanout://agents/{agent_id}/diff",
        name="agent-diff",
        description="An agent's diff against its base (git diff base..commit); for a conflicted "
        "agent, the conflicting paths come first.",
        mime_type="text/x-diff",
        read=agent_diff,
    ),
    ResourceSpec(
        uri="fanout://agents/{agent_id}/transcript",
        name="agent-transcript",
        description="An agent's full conversation with its model as JSON lines (large; read only "
        "when a result needs explaining).",
        mime_type="application/jsonl",
        read=agent_transcript,
    ),
)


def register_resources(server: MCPServer[App], app: App) -> None:
    """Register the table's resources on `server`, each read over `app`."""
    for spec in RESOURCES:
        # bound to the app as a method to its instance: the SDK reads the reader's name and
        # the parameters after `app`, which must be the URI template's variables
        server.resource(
            spec.uri, name=spec.name, description=spec.description, mime_type=spec.mime_type
        )(MethodType(spec.read, app))
