"""Agents on a Ray cluster; the repository, its durable state, its leases and the join stay
with this process (the head).

Each agent reserves `FANOUT_RAY_CPUS_PER_AGENT` CPUs (1 by default) in a placement group for
as long as it runs, so Ray's resource accounting decides where and how many run at once. It then
runs on that node in the node's agent process (`node_process`, started by the node's host actor
once per node and server, in a mount namespace of its own so that workspaces can be copy-on-write
views). Its start commit goes there as git objects through Ray's object store (one pack per
start commit, received once per node), never through a shared filesystem. It reaches the head
through one bridge actor: a mailbox the head drains, which carries the agent's requests (fence
checks, budget, approvals, named leases, landings of its branch) and its events (turns,
transcript, audit), in the order the agent sent them.

A node that dies takes its host with it: the head marks its agents `interrupted`, with the work
of their last checkpoint on their branches, for `rerun_subagent` on any node.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import anyio
import anyio.to_thread
import pygit2

from orchestration.agent import Transcript
from orchestration.config import Settings
from orchestration.context import RepoContext, find_agent, find_run, transcript_path
from orchestration.contracts import AgentStatus, StopReason
from orchestration.errors import ConfigError
from orchestration.executors import remote
from orchestration.executors.base import AgentRunner
from orchestration.executors.shipping import land_branch, pack_objects
from orchestration.gate import AgentGate
from orchestration.planner import run_prefix
from orchestration.prompts import FINISH_TOOL
from orchestration.records import resumes_work, task_prompt_of
from orchestration.registry import AgentRuntime
from orchestration.state import AgentRecord, EventKind
from orchestration.workspace.engine import changed_paths
from toolbus.audit import AuditLog, AuditRecord
from toolbus.bus import agent_tool_specs
from toolbus.errors import LeaseError
from toolbus.permissions import ApprovalRequest
from toolbus.resources import WriteScope

log = logging.getLogger("fanout.orchestrator")

NAMESPACE = "fanout"
STOP_WAIT_S = 60.0  # how long a cancelled agent gets to commit and ship its work
PACKS_KEPT = 16  # start commits whose packs stay in the object store


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "FANOUT_EXECUTOR=ray needs Ray: pip install 'fanout-mcp[ray]' (or ray==2.60.*)"
        ) from None
    return ray


# --- the bridge: the agents' mailbox to the head ---------------------------------------------


class Bridge:
    """A Ray actor (async): agents put requests and events in; the head takes them out in
    batches and answers the requests."""

    def __init__(self) -> None:
        self._queue: list[tuple[int | None, str, int, str, Any]] = []
        self._answers: dict[int, list[Any]] = {}
        self._next = 0
        self._wake: anyio.Event | None = None

    def _signal(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def call(self, agent_id: str, seq: int, kind: str, payload: Any) -> Any:
        rid = self._next
        self._next += 1
        done = anyio.Event()
        self._answers[rid] = [done, None]
        self._queue.append((rid, agent_id, seq, kind, payload))
        self._signal()
        await done.wait()
        return self._answers.pop(rid)[1]

    async def post(self, agent_id: str, seq: int, kind: str, payload: Any) -> None:
        self._queue.append((None, agent_id, seq, kind, payload))
        self._signal()

    async def take(self, wait_s: float) -> list[tuple[int | None, str, int, str, Any]]:
        if not self._queue:
            self._wake = anyio.Event()
            with anyio.move_on_after(wait_s):
                await self._wake.wait()
            self._wake = None
        batch, self._queue = self._queue, []
        return batch

    async def answer(self, rid: int, value: Any) -> None:
        entry = self._answers.get(rid)
        if entry is not None:
            entry[1] = value
            entry[0].set()


class NodeHost:
    """A Ray actor, one per node (no CPU of its own): it starts the node's agent process
    (`node_process`) and relays between it and the head's bridge. Each agent's messages get
    the agent's sequence numbers here, in the order the agent sent them."""

    def __init__(self, bridge: Any) -> None:
        ray = _ray()
        self._ray = ray
        self._bridge = bridge
        ours, theirs = socket.socketpair()
        # Started detached (its launcher exits at once), in a session of its own: when the host
        # dies, Ray kills the host's children and process group, which would leave the agents'
        # commands (in process groups of their own) running. Detached, the agent process sees
        # the socket close, stops its agents (their commands killed) and ends.
        launcher = subprocess.Popen(
            [
                "/bin/sh",
                "-c",
                '"$0" -m orchestration.executors.node_process "$1" </dev/null &',
                sys.executable,
                str(theirs.fileno()),
            ],
            pass_fds=[theirs.fileno()],
            start_new_session=True,
        )
        launcher.wait()
        theirs.close()
        self._gone = False
        self._conn = Connection(ours.detach())
        self._send_lock = threading.Lock()
        self._ready = threading.Event()
        self._runs: dict[str, tuple[threading.Event, list[remote.WorkerOutcome]]] = {}
        self._packs: dict[str, Any] = {}
        self._seq: dict[str, int] = {}
        self._pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="relay")
        self.node = f"{remote.node_name()}/{ray.get_runtime_context().get_node_id()[:8]}"
        threading.Thread(target=self._read, name="node-host", daemon=True).start()

    def ready(self) -> str:
        """The node's name, once its agent process is up."""
        if not self._ready.wait(120) or self._gone:
            raise RuntimeError("the node's agent process did not start")
        return self.node

    def run(self, job: remote.AgentJob, pack: list[Any]) -> remote.WorkerOutcome:
        done = threading.Event()
        box: list[remote.WorkerOutcome] = []
        self._runs[job.agent_id] = (done, box)
        self._packs[job.agent_id] = pack[0]
        self._send(("start", job, self.node))
        done.wait()
        self._packs.pop(job.agent_id, None)
        if not box:
            raise RuntimeError("the node's agent process ended while the agent ran")
        return box[0]

    def stop(self, agent_id: str) -> None:
        self._send(("cancel", agent_id))

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            self._conn.send(message)

    def _next(self, agent_id: str) -> int:
        seq = self._seq.get(agent_id, 0) + 1
        self._seq[agent_id] = seq
        return seq

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "ready":
                self._ready.set()
            elif kind == "call":
                _, rid, agent_id, what, payload = message
                if what == "pack":
                    self._pool.submit(self._answer_pack, rid, agent_id)
                else:
                    ref = self._bridge.call.remote(agent_id, self._next(agent_id), what, payload)
                    self._pool.submit(self._answer, rid, ref)
            elif kind == "post":
                _, agent_id, what, payload = message
                self._bridge.post.remote(agent_id, self._next(agent_id), what, payload)
            elif kind == "done":
                entry = self._runs.pop(message[1], None)
                if entry is not None:
                    entry[1].append(message[2])
                    entry[0].set()
        # the agent process is gone: every agent it ran ends without an outcome
        self._gone = True
        for done, _ in list(self._runs.values()):
            done.set()

    def _answer(self, rid: int, ref: Any) -> None:
        try:
            answer = self._ray.get(ref)
        except self._ray.exceptions.RayError as exc:
            answer = {"error": f"the head did not answer ({type(exc).__name__})"}
        self._send(("answer", rid, answer))

    def _answer_pack(self, rid: int, agent_id: str) -> None:
        try:
            answer: dict[str, Any] = {"ok": self._ray.get(self._packs[agent_id])}
        except (KeyError, self._ray.exceptions.RayError) as exc:
            answer = {"error": f"the start commit's objects are not available ({exc})"}
        self._send(("answer", rid, answer))


# --- the head ---------------------------------------------------------------------------------


@dataclass
class _Session:
    """One remote agent as the head serves it."""

    runner: AgentRunner
    ctx: RepoContext
    runtime: AgentRuntime
    agent: AgentRecord
    start: str
    gate: AgentGate
    transcript: Transcript
    expected: int = 1
    parked: dict[int, tuple[int | None, str, Any]] = field(
        default_factory=dict[int, tuple[int | None, str, Any]]
    )
    holds: dict[int, anyio.Event] = field(default_factory=dict[int, anyio.Event])
    next_hold: int = 0


class RayExecutor:
    """Runs agents on a Ray cluster (`FANOUT_RAY_ADDRESS`, or a local one started on demand)."""

    name = "ray"
    offers_mcp = False

    def __init__(self, settings: Settings, start_soon: Callable[..., None]) -> None:
        self._settings = settings
        self._start_soon = start_soon
        self._bridge: Any = None
        self._hosts: dict[str, Any] = {}
        self._host_locks: dict[str, anyio.Lock] = {}
        self._sessions: dict[str, _Session] = {}
        self._packs: dict[tuple[str, str], Any] = {}
        self._pack_locks: dict[tuple[str, str], anyio.Lock] = {}
        self._lock = anyio.Lock()
        self.address = ""
        # what shipping cost: packs of start commits made here, objects received by the
        # workers, branches packed and landed (ms), and the agents that ran
        self.stats: dict[str, float] = {"pack_ms": 0.0, "receive_ms": 0.0, "ship_ms": 0.0}
        self.stats.update(prepare_ms=0.0, hosts_ms=0.0, hosts=0)
        self.stats["agents"] = 0

    def describe(self) -> str:
        if not self.address:
            return f"ray (not connected yet: {self._settings.ray_address or 'a local cluster'})"
        ray = _ray()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        cpus = sum(float(n.get("Resources", {}).get("CPU", 0)) for n in nodes)
        return f"ray at {self.address}: {len(nodes)} nodes, {cpus:g} CPUs"

    async def _connect(self) -> None:
        async with self._lock:
            if self._bridge is not None:
                return
            ray = _ray()

            def connect() -> None:
                if not ray.is_initialized():
                    address = self._settings.ray_address
                    ray.init(
                        address=None if address in (None, "", "local") else address,
                        namespace=NAMESPACE,
                        log_to_driver=False,
                        include_dashboard=False if address in (None, "", "local") else None,
                        _node_ip_address=os.environ.get("FANOUT_RAY_NODE_IP") or None,
                    )
                context = ray.get_runtime_context()
                self.address = str(context.gcs_address)

            await anyio.to_thread.run_sync(connect)
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            here = ray.get_runtime_context().get_node_id()
            self._bridge = (
                ray.remote(Bridge)
                .options(
                    num_cpus=0,
                    max_concurrency=1000,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
                )
                .remote()
            )
            self._start_soon(self._serve)

    async def prepare(self) -> None:
        """Connect, and start a host on every node that can run agents and has none yet (a
        host's process takes seconds to start; agents then start in milliseconds)."""
        await self._connect()
        ray = _ray()
        nodes = await anyio.to_thread.run_sync(ray.nodes)
        wanted = [
            str(n["NodeID"])
            for n in nodes
            if n.get("Alive")
            and float(n.get("Resources", {}).get("CPU", 0)) >= self._settings.ray_cpus_per_agent
            and str(n["NodeID"]) not in self._hosts
        ]
        if wanted:
            async with anyio.create_task_group() as tg:
                for node_id in wanted:
                    tg.start_soon(self._host, node_id)

    async def aclose(self) -> None:
        self._sessions.clear()
        self._hosts.clear()

    # --- one agent ----------------------------------------------------------------------------

    async def run(self, runner: AgentRunner, ctx: RepoContext, runtime: AgentRuntime) -> None:
        await self._connect()
        ray = _ray()
        settings = self._settings
        agent = find_agent(ctx, runtime.agent_id)
        run = find_run(ctx, agent.run_id)
        start = await runner.start_commit(ctx, agent)
        pack = await self._pack(ctx, start)
        branch = agent.branch or f"fanout/{agent.run_id}/{agent.agent_id}"
        await anyio.to_thread.run_sync(_make_branch, ctx, branch, start)
        holder = agent.lease_holder or agent.agent_id
        job = remote.AgentJob(
            repo_id=_repo_id(ctx),
            agent_id=agent.agent_id,
            run_id=agent.run_id,
            name=agent.name,
            start_commit=start,
            base_commit=agent.base_commit,
            branch=branch,
            system_prefix=await run_prefix(ctx, run),
            system_task=task_prompt_of(agent),
            tools=(*agent_tool_specs(()), FINISH_TOOL),
            model=remote.ModelSpec(
                name=agent.model,
                base_url=os.environ.get("ANTHROPIC_BASE_URL") or None,
                timeout_s=settings.model_timeout_s,
                http_client=settings.http_client,
            ),
            max_turns=agent.max_turns,
            max_output_tokens=settings.max_output_tokens,
            retry_max_attempts=settings.retry_max_attempts,
            retry_after_cap_s=settings.retry_after_cap_s,
            cache_ttl=run.cache_ttl or "5m",
            write_scope=tuple(agent.write_scope) if agent.write_scope is not None else None,
            policy=runner.policy(run, agent),
            sandbox=settings.sandbox,
            allow_network=settings.allow_network,
            network=agent.network,
            env_passthrough=tuple(settings.env_passthrough),
            command_timeout_s=settings.command_timeout_s,
            limits=settings.command_limits,
            resources=tuple(r.name for r in agent.resources),
            held_resources=tuple(r.name for r in agent.resources if r.hold == "agent"),
            commit_message=agent.prompt.strip().splitlines()[0][:72] if agent.prompt else "",
            workspaces=settings.workspaces,
            agents_work=resumes_work(agent, start),
        )
        audit = AuditLog(ctx.repo.state_dir / "audit" / f"{agent.agent_id}.jsonl")
        transcript = Transcript(transcript_path(ctx, agent.agent_id))
        await anyio.to_thread.run_sync(audit.touch)
        await anyio.to_thread.run_sync(transcript.touch)
        runtime.audit = audit
        runtime.started_at = runner.clock.monotonic()
        session = _Session(
            runner=runner,
            ctx=ctx,
            runtime=runtime,
            agent=agent,
            start=start,
            gate=AgentGate(ctx, agent.agent_id, holder, settings.approval_timeout_s),
            transcript=transcript,
        )
        self._sessions[agent.agent_id] = session
        outcome: remote.WorkerOutcome | None = None
        status: AgentStatus | None = None
        # the agent's CPUs, reserved on a node by Ray's accounting for as long as it runs
        pg = ray.util.placement_group(
            [{"CPU": settings.ray_cpus_per_agent}], strategy="STRICT_PACK"
        )
        host: Any = None
        ref: Any = None
        node_id = ""
        try:
            try:
                await pg.ready()
                table = await anyio.to_thread.run_sync(ray.util.placement_group_table, pg)
                node_id = str(table["bundles_to_node_id"][0])
                host = await self._host(node_id)
                ref = host.run.remote(job, [pack])
                outcome = await ref
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                # the node, its host, or its agent process died: the next agent there gets a
                # new host
                self._hosts.pop(node_id, None)
                status = AgentStatus.INTERRUPTED
                outcome = remote.WorkerOutcome(
                    stop_reason=StopReason.INTERRUPTED.value,
                    error="the Ray node running this agent died or became unreachable "
                    f"({type(exc).__name__}); its work up to its last checkpoint is on its "
                    "branch: rerun_subagent resumes it, on any node",
                )
        except BaseException:
            # cancelled (cancel_subagents, a lost lease, the server stopping): the agent
            # commits and ships its work before it stops
            if ref is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(STOP_WAIT_S):
                    host.stop.remote(agent.agent_id)
                    with contextlib.suppress(Exception):
                        await ref
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await self._end_session(session)
                ray.util.remove_placement_group(pg)
        assert outcome is not None
        self.stats["agents"] += 1
        self.stats["receive_ms"] += outcome.receive_ms
        self.stats["ship_ms"] += outcome.ship_ms
        self.stats["prepare_ms"] += outcome.prepare_ms
        await runner.finish(
            ctx,
            runtime,
            outcome.loop_outcome(),
            status=status,
            remote_dropped=[*outcome.dropped],
            remote_refused=dict(outcome.refused),
        )

    async def _host(self, node_id: str) -> Any:
        """The node's host actor (made on first use; one per node and server)."""
        async with self._host_locks.setdefault(node_id, anyio.Lock()):
            host = self._hosts.get(node_id)
            if host is not None:
                return host
            ray = _ray()
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            env = {
                k: v
                for k, v in os.environ.items()
                if k in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "FANOUT_WORKER_CACHE")
            }
            started = time.perf_counter()
            host = (
                ray.remote(NodeHost)
                .options(
                    num_cpus=0,
                    max_concurrency=1000,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                    runtime_env={"env_vars": env} if env else None,
                )
                .remote(self._bridge)
            )
            await host.ready.remote()
            self.stats["hosts_ms"] += (time.perf_counter() - started) * 1000
            self.stats["hosts"] += 1
            self._hosts[node_id] = host
            return host

    async def _end_session(self, session: _Session) -> None:
        self._sessions.pop(session.agent.agent_id, None)
        for release in session.holds.values():
            release.set()

    async def _pack(self, ctx: RepoContext, commit: str) -> Any:
        key = (str(ctx.repo.root), commit)
        # the run's agents start together: one of them packs, the others wait for it
        async with self._pack_locks.setdefault(key, anyio.Lock()):
            return await self._pack_locked(ctx, commit, key)

    async def _pack_locked(self, ctx: RepoContext, commit: str, key: tuple[str, str]) -> Any:
        ref = self._packs.get(key)
        if ref is None:
            ray = _ray()
            started = time.perf_counter()
            data = await anyio.to_thread.run_sync(pack_objects, ctx.repo.git_dir, [commit])
            self.stats["pack_ms"] += (time.perf_counter() - started) * 1000
            ref = await anyio.to_thread.run_sync(ray.put, data)
            self._packs[key] = ref
            while len(self._packs) > PACKS_KEPT:
                oldest = next(iter(self._packs))
                self._packs.pop(oldest)
                self._pack_locks.pop(oldest, None)
        return ref

    # --- serving the bridge -------------------------------------------------------------------

    async def _serve(self) -> None:
        while True:
            try:
                batch = await self._bridge.take.remote(1.0)
            except Exception:
                log.exception("the Ray bridge failed; retrying")
                await anyio.sleep(1.0)
                continue
            for rid, agent_id, seq, kind, payload in batch:
                session = self._sessions.get(agent_id)
                if session is None:
                    if rid is not None:
                        self._bridge.answer.remote(
                            rid, {"error": f"agent {agent_id} no longer runs on this head"}
                        )
                    continue
                session.parked[seq] = (rid, kind, payload)
                while session.expected in session.parked:
                    rid_, kind_, payload_ = session.parked.pop(session.expected)
                    session.expected += 1
                    self._start_soon(self._handle, session, rid_, kind_, payload_)

    async def _handle(self, session: _Session, rid: int | None, kind: str, payload: Any) -> None:
        try:
            value = await self._dispatch(session, kind, payload)
            answer: dict[str, Any] = {"ok": value}
        except (LeaseError, remote.LinkError, ValueError, RuntimeError) as exc:
            answer = {"error": str(exc)}
        except Exception as exc:
            log.exception("agent %s: serving %s failed", session.agent.agent_id, kind)
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        if rid is not None:
            self._bridge.answer.remote(rid, answer)

    async def _dispatch(self, session: _Session, kind: str, payload: Any) -> Any:
        ctx, runtime, runner = session.ctx, session.runtime, session.runner
        agent_id = session.agent.agent_id
        store = ctx.store
        if kind == "token":
            return runtime.fence.token if runtime.fence is not None else None
        if kind == "check":
            fence = runtime.fence
            if fence is None:
                raise RuntimeError("the agent holds no fence")
            await anyio.to_thread.run_sync(fence.check, payload)
            return None
        if kind == "reserve":
            return runner.budget(ctx, session.agent.run_id).reserve(int(payload))
        if kind == "describe":
            return runner.budget(ctx, session.agent.run_id).describe()
        if kind == "settle":
            runner.budget(ctx, session.agent.run_id).settle(int(payload[0]), int(payload[1]))
            return None
        if kind == "turn":
            runner.record_remote_turn(ctx, agent_id, payload)
            return None
        if kind == "records":
            lines: list[str] = payload["transcript"]
            for line in lines:
                tag, _, data = line.partition("\t")
                session.transcript.append_json(tag.strip('"'), data)
            if runtime.audit is not None:
                runtime.audit.adopt([AuditRecord.model_validate_json(r) for r in payload["audit"]])
            return None
        if kind == "running":
            store.mark_running(
                agent_id,
                started_at=runner.clock.time(),
                workspace=f"ray:{payload['workspace']}",
                branch=f"fanout/{session.agent.run_id}/{agent_id}",
                base_commit=session.agent.base_commit
                if session.agent.start_commit
                else session.start,
                start_commit=session.start,
                commit=None,
            )
            store.apply(
                agent_id,
                EventKind.NOTE,
                f"runs on node {payload['node']}, in {payload.get('kind', 'a workspace')}",
                node=payload["node"],
            )
            return None
        if kind == "approve":
            request = ApprovalRequest(
                agent_id=agent_id,
                kind=payload["kind"],
                subject=payload["subject"],
                why=payload["why"],
                rule=payload["rule"],
            )
            answer = await session.gate.approve(request)
            return {"allowed": answer.allowed, "by": answer.by, "note": answer.note}
        if kind == "hold":
            return await self._hold(session, list(payload["names"]), bool(payload["shared"]))
        if kind == "release":
            release = session.holds.pop(int(payload), None)
            if release is not None:
                release.set()
            return None
        if kind == "land":
            return await self._land(session, payload["pack"], payload["commit"], payload["old"])
        raise ValueError(f"unknown request {kind!r}")

    async def _hold(self, session: _Session, names: list[str], shared: bool) -> int:
        held = anyio.Event()
        release = anyio.Event()
        failed: list[BaseException] = []

        async def holding() -> None:
            try:
                async with session.gate.hold(names, shared=shared):
                    held.set()
                    await release.wait()
            except Exception as exc:
                failed.append(exc)
                held.set()

        hold_id = session.next_hold
        session.next_hold += 1
        session.holds[hold_id] = release
        self._start_soon(holding)
        await held.wait()
        if failed:
            session.holds.pop(hold_id, None)
            raise RuntimeError(str(failed[0]))
        return hold_id

    async def _land(self, session: _Session, pack: bytes, commit: str, old: str) -> None:
        """Land a checkpoint of the agent's branch: under its live lease, objects verified, only
        in-scope paths changed, the ref moved from the commit it was at."""
        ctx, runtime = session.ctx, session.runtime
        agent = session.agent
        if runtime.fence is not None:
            await anyio.to_thread.run_sync(runtime.fence.check, None)
        branch = f"refs/heads/fanout/{agent.run_id}/{agent.agent_id}"
        scope = WriteScope.of(agent.write_scope)

        def land() -> None:
            land_branch(
                ctx.repo.git_dir,
                pack,
                commit=commit,
                base=session.start,
                ref=branch,
                expected_old=old,
            )
            pyrepo = ctx.repo.open()
            try:
                outside = [
                    path
                    for path in _changed_paths(pyrepo, session.start, commit)
                    if not scope.allows(path)
                ]
                if outside:
                    pyrepo.references[branch].set_target(old)
                    raise ValueError(
                        "the agent's branch changes paths outside its write scope: "
                        + ", ".join(outside[:10])
                    )
            finally:
                pyrepo.free()

        await anyio.to_thread.run_sync(land)
        ctx.store.apply(agent.agent_id, EventKind.NOTE, f"checkpoint {commit[:12]}", commit=commit)


def _changed_paths(pyrepo: pygit2.Repository, old: str, new: str) -> list[str]:
    tree = str(pyrepo.revparse_single(new).peel(pygit2.Commit).tree_id)
    return changed_paths(pyrepo, old, tree)


def _make_branch(ctx: RepoContext, branch: str, start: str) -> None:
    """The agent's branch on the head, at its start: checkpoints move it forward."""
    pyrepo = ctx.repo.open()
    try:
        ref = f"refs/heads/{branch}"
        if ref in pyrepo.references:
            pyrepo.references[ref].set_target(start)
        else:
            pyrepo.references.create(ref, start)
    finally:
        pyrepo.free()


def _repo_id(ctx: RepoContext) -> str:
    """A name for the repository that the workers' caches use (never a path of the head)."""
    import hashlib

    return hashlib.sha256(str(ctx.repo.git_dir).encode()).hexdigest()[:16]


def cluster_summary(address: str | None) -> str:
    """The cluster at `address` as `fanout-mcp status` shows it: its nodes, alive or dead, and
    their CPUs (connects as a driver for the time of the look)."""
    if address in (None, "", "local"):
        return "ray, a local cluster started by the server on demand (FANOUT_RAY_ADDRESS unset)"
    try:
        ray = _ray()
    except ConfigError as exc:
        return str(exc)
    try:
        ray.init(
            address=address,
            namespace=NAMESPACE,
            log_to_driver=False,
            _node_ip_address=os.environ.get("FANOUT_RAY_NODE_IP") or None,
        )
    except Exception as exc:
        return f"ray at {address}: cannot be reached ({type(exc).__name__}: {exc})"
    try:
        lines = [f"ray at {address}:"]
        for node in ray.nodes():
            cpus = float(node.get("Resources", {}).get("CPU", 0))
            state = "alive" if node.get("Alive") else "dead"
            node_id = str(node.get("NodeID", ""))[:8]
            lines.append(
                f"  node {node_id} {node.get('NodeManagerAddress', '?')}: {state}, {cpus:g} CPUs"
            )
        return "\n".join(lines)
    finally:
        ray.shutdown()
