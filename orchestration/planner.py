"""Planning a run before it starts: its shared context, its waves, its cost, its warnings."""

from __future__ import annotations

import os
from collections.abc import Sequence

import anyio

from orchestration import workspace as ws_mod
from orchestration.config import Settings
from orchestration.context import RepoContext
from orchestration.contracts import SpawnRequest, shown_paths
from orchestration.errors import InvalidRequest
from orchestration.prompts import shared_prefix
from orchestration.records import scope_requests
from orchestration.state import AgentRecord, RunRecord, SharedFile, SharedSnapshot
from toolbus.lease_store import earlier_conflicts
from toolbus.leases import LeaseManager
from toolbus.sandbox import probe_bwrap
from toolbus.terminal import describe_commands

MAX_SHARED_FILE_BYTES = 200_000


def new_run(
    settings: Settings,
    request: SpawnRequest,
    run_id: str,
    snap: ws_mod.Snapshot,
    shared: SharedSnapshot,
    *,
    repo: str,
    owner: str,
    now: float,
    mcp_servers: list[str] | None = None,
) -> RunRecord:
    """The record of a run about to be created, its options from the request or the settings."""
    return RunRecord(
        run_id=run_id,
        repo=repo,
        created_at=now,
        base_commit=snap.base_commit,
        head_commit=snap.head_commit,
        branch_ref=snap.branch_ref,
        snapshot_dirty=snap.dirty,
        shared=shared,
        max_concurrency=request.max_concurrency or settings.max_concurrency,
        budget_tokens=request.budget_tokens or settings.budget_tokens,
        model=settings.model,
        owner=owner,
        verify_command=request.verify_command,
        permissions=request.permissions,
        mcp_servers=mcp_servers or [],
    )


def resolve_dependencies(
    request: SpawnRequest, run_id: str, names: list[str], known: set[str]
) -> list[list[str]]:
    """Each task's `depends_on` as agent ids: names of this spawn's tasks, or ids of agents
    already in the repository. Unknown names and cycles are refused, naming them."""
    ids = {name: f"{run_id}-a{i + 1}" for i, name in enumerate(names)}
    resolved: list[list[str]] = []
    unknown: list[str] = []
    for i, task in enumerate(request.tasks):
        deps: list[str] = []
        for ref in task.depends_on:
            target = ids.get(ref) or (ref if ref in known else None)
            if target is None:
                unknown.append(f"{names[i]} -> {ref!r}")
            elif target == ids[names[i]]:
                unknown.append(f"{names[i]} -> itself")
            elif target not in deps:
                deps.append(target)
        resolved.append(deps)
    if unknown:
        raise InvalidRequest(
            "tasks[].depends_on: no such task or agent: "
            + ", ".join(unknown)
            + "; name a task of this spawn (its name) or an agent id that get_status lists"
        )
    cycle = _cycle({ids[n]: d for n, d in zip(names, resolved, strict=True)})
    if cycle:
        by_id = {v: k for k, v in ids.items()}
        raise InvalidRequest(
            "tasks[].depends_on: a cycle, which would wait for ever: "
            + " -> ".join(by_id[a] for a in cycle)
            + "; remove one of these dependencies"
        )
    return resolved


def _cycle(graph: dict[str, list[str]]) -> list[str]:
    """A cycle of `graph` (first node repeated at the end), or []."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt in graph and state.get(nxt) is None:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return []

    for node in graph:
        if state.get(node) is None:
            found = visit(node)
            if found:
                return found
    return []


def new_agents(
    settings: Settings,
    request: SpawnRequest,
    run: RunRecord,
    names: list[str],
    *,
    known: set[str] | None = None,
) -> list[AgentRecord]:
    """The records of the run's agents, one per task, with their dependencies resolved (see
    `resolve_dependencies`), in waves: each waits for every earlier agent of the run whose write
    scope overlaps its own."""
    dependencies = resolve_dependencies(request, run.run_id, names, known or set())
    ids = [f"{run.run_id}-a{i + 1}" for i in range(len(request.tasks))]
    waves = earlier_conflicts([scope_requests(task.write_scope) for task in request.tasks])
    return [
        AgentRecord(
            agent_id=ids[i],
            run_id=run.run_id,
            index=i + 1,
            name=names[i],
            prompt=task.prompt,
            write_scope=task.write_scope,
            model=task.model or settings.model,
            max_turns=task.max_turns or settings.max_turns,
            base_commit=run.base_commit,
            owner=run.owner,
            lease_holder=ids[i],
            depends_on=dependencies[i],
            waits_for=[ids[j] for j in waves[i]],
            resources=task.resource_specs(),
            network=task.network,
            permissions=task.permissions,
        )
        for i, task in enumerate(request.tasks)
    ]


def shared_snapshot(
    repo: ws_mod.GitRepo,
    base: str,
    plan: str | None,
    conventions: str | None,
    files: list[str],
) -> tuple[SharedSnapshot, list[str]]:
    """The run's shared context, and the paths at the base (for the shared prefix)."""
    paths = repo.paths_at(base)
    shared_files: list[SharedFile] = []
    for path in files:
        found = repo.blob_at(base, path)
        if found is None:
            raise InvalidRequest(
                f"shared_context.files: {path!r} does not exist at the base commit "
                f"{base[:12]}; list files that are in the repository"
            )
        blob, size = found
        content: str | None = None
        note: str | None = None
        if size > MAX_SHARED_FILE_BYTES:
            note = f"{size} bytes, over the {MAX_SHARED_FILE_BYTES}-byte limit: read it"
        else:
            raw = repo.git("cat-file", "blob", blob)
            if "\x00" in raw:
                note = "binary file"
            else:
                content = raw
        shared_files.append(SharedFile(path=path, blob=blob, size=size, content=content, note=note))
    shared = SharedSnapshot(
        base_commit=base,
        plan=plan,
        conventions=conventions,
        files=shared_files,
        file_count=len(paths),
    )
    return shared, paths


async def run_prefix(ctx: RepoContext, run: RunRecord) -> str:
    """The run's shared prefix (byte-identical for its agents), made once per process."""
    prefix = ctx.prefixes.get(run.run_id)
    if prefix is None:
        async with ctx.prefix_lock:  # agents of a run (rerun, restart) list the base once
            prefix = ctx.prefixes.get(run.run_id)
            if prefix is None:
                paths = await anyio.to_thread.run_sync(ctx.repo.paths_at, run.base_commit)
                prefix = ctx.prefixes[run.run_id] = shared_prefix(run.shared, paths)
    return prefix


async def sandbox_problem(settings: Settings) -> str | None:
    """Why commands would run without the sandbox the settings take when it works here
    (`auto`), None otherwise (the probe's answer is cached per process)."""
    return await probe_bwrap() if settings.sandbox == "auto" else None


def sandbox_warnings(settings: Settings, problem: str | None) -> list[str]:
    """What spawn's answer says of the commands agents run: where the sandbox the settings
    take when it works here does not (`problem`, see `sandbox_problem`), and what they run in
    (reads the file system: for a worker thread)."""
    warnings: list[str] = []
    if settings.sandbox == "auto" and problem is not None:
        warnings.append(
            f"commands run WITHOUT a sandbox ({problem}): they can write outside their "
            "worktree, reach the network and read the server's environment; install "
            "bubblewrap, or set FANOUT_SANDBOX=none to accept this"
        )
    sandboxed = settings.sandbox == "bwrap" or (settings.sandbox == "auto" and problem is None)
    warnings.append(
        describe_commands(
            sandboxed=sandboxed,
            extra_ro_paths=settings.sandbox_ro_paths,
            limits=settings.command_limits,
            path=os.environ.get("PATH", ""),
        )
    )
    return warnings


# how far back spawn looks for a run of the same tasks
REPEAT_WINDOW_S = 600.0


def repeat_warning(
    latest: Sequence[tuple[RunRecord, Sequence[AgentRecord]]],
    run_id: str,
    agents: list[AgentRecord],
    now: float,
) -> str | None:
    """A warning when the new run's tasks (prompts and write scopes) are those of a run of
    the last `REPEAT_WINDOW_S` not yet all merged or discarded: a client that lost spawn's
    answer and called again would otherwise run every task twice, the second run waiting on
    the first's scopes. `latest`: the latest runs with their agents, oldest first, as spawn
    read them already (`estimates.history`)."""

    def tasks(of: Sequence[AgentRecord]) -> list[tuple[str, tuple[str, ...]]]:
        return sorted((a.prompt, tuple(a.write_scope or ())) for a in of if a.rerun_of is None)

    mine = tasks(agents)
    for run, theirs in reversed(latest):
        if now - run.created_at > REPEAT_WINDOW_S:
            break
        if tasks(theirs) == mine and any(not a.status.closed for a in theirs):
            ago = max(0, round(now - run.created_at))
            return (
                f"these tasks are those of run {run.run_id}, spawned {ago} s ago and not all "
                f"merged: if this call repeats that one (a retry), cancel_subagents"
                f'(run_id="{run_id}") and follow {run.run_id}'
            )
    return None


def base_warnings(snap: ws_mod.Snapshot) -> list[str]:
    """What spawn's answer says of the run's base: files with unresolved conflicts in the
    user's checkout, which the base holds with their conflict markers."""
    if not snap.unmerged:
        return []
    return [
        f"your checkout has unresolved conflicts (a merge, rebase or cherry-pick under way) in "
        f"{shown_paths(snap.unmerged)}: the run's base holds these files as your working tree "
        "does, with their conflict markers; unless the agents are to resolve them, "
        "cancel_subagents, finish or abort that in your checkout, and spawn again"
    ]


async def spawn_warnings(leases: LeaseManager, agents: list[AgentRecord]) -> list[str]:
    """What else spawn's answer warns of (see `sandbox_warnings`): scopes that serialize,
    leases held."""
    warnings: list[str] = []
    for agent in agents:
        if agent.write_scope is None:
            warnings.append(
                f"{agent.name} has no write_scope: it may change the whole repository and "
                "so serializes with every other writer; give it path prefixes to run it in "
                "parallel"
            )
        if agent.depends_on:
            named = {a.agent_id: a.name for a in agents}
            deps = ", ".join(named.get(d, d) for d in agent.depends_on)
            warnings.append(
                f"{agent.name} depends on {deps}: it waits until they are merged "
                "(merge_results), then starts from the head that contains them"
            )
        if agent.waits_for:
            names = ", ".join(a.name for a in agents if a.agent_id in agent.waits_for)
            warnings.append(
                f"{agent.name} overlaps the write scope of {names}: it waits until they are "
                "merged or discarded, then starts from the new head"
            )
    # one look at the lease table for every agent's scope: a lease blocks the run if it
    # blocks any of them
    wanted = [request for agent in agents for request in scope_requests(agent.write_scope)]
    blockers: set[str] = (
        {lease.holder for lease in await leases.blockers(wanted)} if wanted else set()
    )
    if blockers:
        warnings.append(
            "agents of earlier runs hold overlapping write leases ("
            + ", ".join(sorted(blockers))
            + "): the overlapping agents wait until those are merged or discarded"
        )
    return warnings
