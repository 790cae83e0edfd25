"""Resources: runs, a run's shared-context snapshot and its files at the base, each agent's
result, diff and transcript (read on demand, never pushed), and the lease table.

A plain reader per resource over the app state, and `RESOURCES`, the table that declares each
(URI or URI template, name, description, MIME type, reader)."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import MethodType
from typing import Any

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError

from mcp_server.app import App
from orchestration.errors import AgentNotFound, RunNotFound
from orchestration.join import JoinCandidate, conflict_diff
from orchestration.orchestrator import RepoContext, lease_expires_in
from orchestration.state import AgentRecord, RunRecord

MAX_TRANSCRIPT_BYTES = 2_000_000
MAX_FILE_BYTES = 1_000_000


def _json(value: Any) -> str:
    return json.dumps(value, indent=1, sort_keys=False, default=str)


def _run(ctx: RepoContext, run_id: str) -> RunRecord:
    run = ctx.store.run(run_id)
    if run is None:
        raise RunNotFound(f"no run {run_id!r}; read fanout://runs for the list")
    return run


def _agent(ctx: RepoContext, agent_id: str) -> AgentRecord:
    agent = ctx.store.agent(agent_id)
    if agent is None:
        raise AgentNotFound(f"no agent {agent_id!r}; get_status lists the agents")
    return agent


def _ls_tree(ctx: RepoContext, commit: str) -> list[dict[str, str]]:
    out = ctx.repo.git("ls-tree", "-r", "-z", commit)
    files: list[dict[str, str]] = []
    for entry in out.split("\x00"):
        if not entry:
            continue
        meta, path = entry.split("\t", 1)
        _mode, _kind, blob = meta.split(" ")
        files.append({"path": path, "blob": blob})
    return files


async def leases_json(ctx: RepoContext) -> str:
    leases = await ctx.leases.table()
    now = time.time()
    return _json(
        [
            {
                "holder": lease.holder,
                "resource": lease.resource,
                "kind": lease.kind,
                "mode": lease.mode.value,
                "token": lease.token,
                "expires_in_s": lease_expires_in(lease, now),
            }
            for lease in leases
        ]
    )


async def runs(app: App) -> str:
    ctx = await app.context()
    out: list[dict[str, Any]] = []
    for run in ctx.store.runs():
        agents = ctx.store.agents(run.run_id)
        out.append(
            {
                "run_id": run.run_id,
                "created_at": run.created_at,
                "base_commit": run.base_commit,
                "agents": {a.agent_id: a.status.value for a in agents},
                "uri": f"fanout://runs/{run.run_id}",
            }
        )
    return _json(out)


async def leases(app: App) -> str:
    return await leases_json(await app.context())


async def run(app: App, run_id: str) -> str:
    ctx = await app.context()
    record = _run(ctx, run_id)
    files = await anyio.to_thread.run_sync(_ls_tree, ctx, record.base_commit)
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
            "files": files,
            "file_uri_template": f"fanout://runs/{run_id}/files/{{+path}}",
        }
    )


async def run_file(app: App, run_id: str, path: str) -> str | bytes:
    ctx = await app.context()
    record = _run(ctx, run_id)
    blob = ctx.repo.try_git("rev-parse", "--verify", "--quiet", f"{record.base_commit}:{path}")
    if blob is None:
        raise ResourceNotFoundError(f"{path!r} does not exist at {record.base_commit[:12]}")
    size = int(ctx.repo.git("cat-file", "-s", blob.strip()).strip())
    if size > MAX_FILE_BYTES:
        return f"({size} bytes: too big to serve; read it from git: {blob.strip()})"
    return ctx.repo.git("cat-file", "blob", blob.strip())


async def agent_result(app: App, agent_id: str) -> str:
    ctx = await app.context()
    agent = _agent(ctx, agent_id)
    data = agent.model_dump(mode="json", exclude={"rerun_context", "prompt"})
    data["prompt"] = agent.prompt
    return _json(data)


async def agent_diff(app: App, agent_id: str) -> str:
    ctx = await app.context()
    agent = _agent(ctx, agent_id)
    if agent.commit is None:
        return f"# {agent_id} has no commit yet (status {agent.status.value})\n"
    base = agent.base_commit
    commit = agent.commit
    diff = await anyio.to_thread.run_sync(
        lambda: ctx.repo.git("diff", "--no-ext-diff", "--no-textconv", f"{base}..{commit}")
    )
    header = f"# {agent_id}: git diff {base[:12]}..{commit[:12]}\n"
    if agent.conflicts:
        header += "# conflicts with the canonical head in: " + ", ".join(agent.conflicts) + "\n"
        candidate = JoinCandidate(
            agent_id=agent.agent_id,
            name=agent.name,
            task_summary=agent.prompt[:72],
            base_commit=base,
            branch=agent.branch or "",
            commit=commit,
        )
        hunks = await anyio.to_thread.run_sync(lambda: conflict_diff(ctx.repo, candidate))
        header += "# the conflicting files merged onto the current head, with markers:\n"
        header += hunks + "\n# the agent's own diff:\n"
    return header + diff


async def agent_transcript(app: App, agent_id: str) -> str:
    ctx = await app.context()
    _agent(ctx, agent_id)
    path = ctx.repo.state_dir / "transcripts" / f"{agent_id}.jsonl"
    if not path.exists():
        return ""
    data = path.read_bytes()
    if len(data) > MAX_TRANSCRIPT_BYTES:
        data = data[-MAX_TRANSCRIPT_BYTES:]
        data = data[data.find(b"\n") + 1 :]
    return data.decode("utf-8", errors="replace")


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
