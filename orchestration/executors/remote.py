"""One agent on a machine that shares nothing with the server but a link to it.

The head (the server on the repository) hands the worker an `AgentJob`: everything the agent
needs, as data. The worker builds a node-local repository from the shipped git objects, makes
the agent's workspace there, and runs the agent's loop and bus locally: its jail, write scope,
sandbox and permission policy are enforced where its commands run. What belongs to the
repository stays with the head and is reached through the `HeadLink`: the write lease's fence
(checked at every write; a head that cannot be reached is a lost lease), the run's token budget,
the person's approvals and named leases, and the durable record (turns, transcript, audit). The
agent's branch goes back as git objects at every checkpoint (a turn that may have changed files)
and at the end, and the head lands it under `refs/heads/fanout/<run>/<agent>`.

Nothing here imports Ray: `ray_executor` carries the link over Ray, and tests can carry it in
memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.to_thread

from orchestration import workspace as ws_mod
from orchestration.agent import AgentLoop, Budget, LoopOutcome, Progress, Transcript
from orchestration.caching import CacheTtl
from orchestration.contracts import StopReason
from orchestration.executors.shipping import NodeRepo
from orchestration.model import Model, ModelRequest, ModelResponse
from orchestration.retry import RetryPolicy
from toolbus.audit import AuditLog
from toolbus.bus import AgentBus
from toolbus.errors import LeaseLost
from toolbus.limits import CommandLimits
from toolbus.permissions import ApprovalAnswer, ApprovalRequest, GuardedScope, PermissionPolicy
from toolbus.resources import WriteScope
from toolbus.terminal import SandboxMode, Terminal, TerminalConfig
from toolbus.toolspec import ToolSpec

log = logging.getLogger("fanout.worker")

LINK_TIMEOUT_S = 30.0  # a head silent for this long has, for the worker, lost its leases


class LinkError(RuntimeError):
    """The head refused a request (its message says why) or could not be reached."""


class HeadLink(Protocol):
    """The worker's way to the head. `call` blocks (from a worker thread or the loop's thread,
    for short requests); `acall` awaits; `post` sends without waiting, in order."""

    def call(self, kind: str, payload: Any = None) -> Any: ...

    async def acall(self, kind: str, payload: Any = None) -> Any: ...

    def post(self, kind: str, payload: Any = None) -> None: ...


@dataclass(frozen=True)
class ModelSpec:
    """How the worker makes its model: the Anthropic provider, from the head's settings."""

    name: str
    base_url: str | None
    timeout_s: float
    http_client: str


@dataclass(frozen=True)
class AgentJob:
    """Everything an agent needs to run away from the repository, as data."""

    repo_id: str
    agent_id: str
    run_id: str
    name: str
    start_commit: str
    base_commit: str
    branch: str
    system_prefix: str
    system_task: str
    tools: tuple[ToolSpec, ...]
    model: ModelSpec
    max_turns: int
    max_output_tokens: int
    retry_max_attempts: int
    retry_after_cap_s: float
    cache_ttl: CacheTtl
    write_scope: tuple[str, ...] | None
    policy: PermissionPolicy
    sandbox: str
    allow_network: bool
    network: bool
    env_passthrough: tuple[str, ...]
    command_timeout_s: float
    limits: CommandLimits
    resources: tuple[str, ...]
    held_resources: tuple[str, ...]
    commit_message: str
    # the server's `workspaces` setting: "auto" leaves the choice to the node (its
    # FANOUT_WORKSPACES, else the first kind that works there)
    workspaces: str = "auto"
    # `start_commit` is an agent's own work, not the user's (`runner.resumes_work`): checked
    # out without the user's filters
    agents_work: bool = False

    def scope(self) -> WriteScope:
        """The agent's write scope (`write_scope`)."""
        return WriteScope.of(None if self.write_scope is None else list(self.write_scope))


@dataclass
class WorkerOutcome:
    """How the agent ended on the worker, and what of it reached the head."""

    stop_reason: str
    summary: str = ""
    follow_ups: list[str] = field(default_factory=list[str])
    failed_by_model: bool = False
    error: str | None = None
    dropped: list[str] = field(default_factory=list[str])
    refused: dict[str, str] = field(default_factory=dict[str, str])
    node: str = ""
    receive_ms: float = 0.0  # receiving the start commit's objects (0: the node had them)
    ship_ms: float = 0.0  # packing and landing its branch, all checkpoints
    prepare_ms: float = 0.0  # its node-local repository, workspace and bus, on the worker

    def loop_outcome(self) -> LoopOutcome:
        return LoopOutcome(
            StopReason(self.stop_reason),
            summary=self.summary,
            follow_ups=list(self.follow_ups),
            failed_by_model=self.failed_by_model,
            error=self.error,
        )


class RemoteFence:
    """The agent's write fence, checked by the head against its lease store at every write.
    A head that does not answer is a lost lease: the worker stops writing."""

    thread_safe = True

    def __init__(self, link: HeadLink, token: int | None) -> None:
        self._link = link
        self._token = token

    @property
    def token(self) -> int | None:
        return self._token

    def check(self, path: str | None) -> None:
        if self._token is None:
            if path is None:
                return
            raise LeaseLost(f"no write lease is held for {path!r}")
        try:
            self._link.call("check", path)
        except LinkError as exc:
            raise LeaseLost(str(exc)) from None


class RemoteGate:
    """Approvals and named leases, held by the head for the agent."""

    def __init__(self, link: HeadLink) -> None:
        self._link = link

    async def approve(self, request: ApprovalRequest) -> ApprovalAnswer:
        answer = await self._link.acall(
            "approve",
            {
                "kind": request.kind,
                "subject": request.subject,
                "why": request.why,
                "rule": request.rule,
            },
        )
        return ApprovalAnswer(allowed=bool(answer["allowed"]), by=answer["by"], note=answer["note"])

    @asynccontextmanager
    async def hold(self, names: Sequence[str], *, shared: bool = False) -> AsyncGenerator[None]:
        hold_id = await self._link.acall("hold", {"names": list(names), "shared": shared})
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                await self._link.acall("release", hold_id)


class _ForwardedTranscript(Transcript):
    """The transcript kept on the head: lines are buffered and sent with each turn."""

    def __init__(self) -> None:
        super().__init__(None)
        self.pending: list[str] = []

    def append(self, kind: str, payload: object) -> None:
        self.append_json(kind, json.dumps(payload, default=str))

    def append_json(self, kind: str, data: str) -> None:
        self.pending.append(json.dumps(kind) + "\t" + data)

    def take(self) -> list[str]:
        lines, self.pending = self.pending, []
        return lines


def node_name() -> str:
    return socket.gethostname()


class _Checkpointing:
    """The worker's model: before each call after the first, the work so far is committed and
    shipped to the head (a tool turn just ended), so a dead worker loses at most a turn."""

    def __init__(self, inner: Model, checkpoint: Callable[[], Any]) -> None:
        self._inner = inner
        self._checkpoint = checkpoint
        self._calls = 0

    @property
    def name(self) -> str:
        return self._inner.name

    async def complete(self, request: ModelRequest) -> ModelResponse:
        self._calls += 1
        if self._calls > 1:
            await self._checkpoint()
        return await self._inner.complete(request)

    async def aclose(self) -> None:
        close = getattr(self._inner, "aclose", None)
        if close is not None:
            await close()


def make_model(spec: ModelSpec) -> Model:
    from orchestration.providers.anthropic import AnthropicModel

    return AnthropicModel(
        model=spec.name,
        timeout_s=spec.timeout_s,
        http_client=spec.http_client,  # type: ignore[arg-type]
        base_url=spec.base_url,
    )


class RemoteAgent:
    """Runs one `AgentJob` on this machine; `cancel` (from any thread) stops it, after which
    its work is committed and shipped like at any other end."""

    def __init__(
        self,
        job: AgentJob,
        link: HeadLink,
        *,
        cache_root: Path,
        base_pack: Callable[[], bytes],
        model_factory: Callable[[ModelSpec], Model] = make_model,
        node: str | None = None,
    ) -> None:
        self.job = job
        self.node = node or node_name()
        self._link = link
        self._cache_root = cache_root
        self._base_pack = base_pack
        self._model_factory = model_factory
        self._scope: anyio.CancelScope | None = None
        # schedules a call on the agent's event loop from another thread, without waiting
        self._call_soon: Callable[[Callable[[], object]], object] | None = None
        self._cancel_requested = False
        self._landed: str | None = None
        self._shipped: str | None = None
        self._repo: NodeRepo | None = None
        self._workspace: ws_mod.Workspace | None = None
        self._bus: AgentBus | None = None
        self._audit: AuditLog | None = None
        self._audit_sent = 0
        self._transcript = _ForwardedTranscript()
        self._dropped: list[str] = []
        self._refused: dict[str, str] = {}
        self._commit_lock = anyio.Lock()
        self._receive_ms = 0.0
        self._ship_ms = 0.0
        self._all_landed = False  # its last commit is on the head (its workspace may go)

    def cancel(self) -> None:
        """Stop the loop (thread-safe); the agent then commits and ships its work."""
        self._cancel_requested = True
        scope, call_soon = self._scope, self._call_soon
        if scope is not None and call_soon is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                call_soon(scope.cancel)

    def run(self) -> WorkerOutcome:
        """Run the agent to its end (blocking; its own event loop)."""
        return anyio.run(self.run_async)

    async def run_async(self) -> WorkerOutcome:
        """`run` in the caller's event loop."""
        self._call_soon = asyncio.get_running_loop().call_soon_threadsafe
        job = self.job
        outcome = LoopOutcome(StopReason.INTERNAL_ERROR, error="the loop did not run")
        prepare_ms = 0.0
        try:
            started = time.perf_counter()
            bus = await anyio.to_thread.run_sync(self._prepare)
            prepare_ms = (time.perf_counter() - started) * 1000
            self._link.post(
                "running",
                {
                    "workspace": f"{self.node}:{self._workspace.path if self._workspace else ''}",
                    "node": self.node,
                    "kind": "a copy-on-write view"
                    if self._workspace is not None and ws_mod.layer_of(self._workspace) is not None
                    else "a git worktree",
                },
            )
            loop = self._loop(bus)
            self._scope = anyio.CancelScope()
            if self._cancel_requested:
                self._scope.cancel()
            with self._scope:
                try:
                    outcome = await loop.run()
                except Exception as exc:  # a defect of ours: contained to this agent
                    log.exception("agent %s crashed", job.agent_id)
                    outcome = LoopOutcome(
                        StopReason.INTERNAL_ERROR, error=f"{type(exc).__name__}: {exc}"
                    )
            if self._scope.cancelled_caught:
                outcome = LoopOutcome(StopReason.CANCELLED, error="cancelled")
            with anyio.CancelScope(shield=True):
                await self._checkpoint(final=True)
        except Exception as exc:
            log.exception("agent %s: the worker failed", job.agent_id)
            outcome = LoopOutcome(
                StopReason.INTERNAL_ERROR, error=f"on the worker: {type(exc).__name__}: {exc}"
            )
        finally:
            self._send_records()
            if self._bus is not None:
                self._bus.terminal.close()
            if self._repo is not None and self._workspace is not None and self._all_landed:
                # its work is on the head: the workspace goes when the node's next agent has
                # made its own (a view's base is checked out again only for a new commit)
                with _finished_lock:
                    _finished.append((ws_mod.GitRepo(self._repo.path), self._workspace))
        return WorkerOutcome(
            stop_reason=outcome.stop_reason.value,
            summary=outcome.summary,
            follow_ups=outcome.follow_ups,
            failed_by_model=outcome.failed_by_model,
            error=outcome.error,
            dropped=self._dropped,
            refused=self._refused,
            node=self.node,
            receive_ms=round(self._receive_ms, 3),
            ship_ms=round(self._ship_ms, 3),
            prepare_ms=round(prepare_ms, 3),
        )

    # --- on the worker ------------------------------------------------------------------------

    def _prepare(self) -> AgentBus:
        """The node-local repository (the base's objects received once per node), the agent's
        workspace in it, and its bus."""
        job = self.job
        repo = self._repo = NodeRepo(self._cache_root, job.repo_id)
        with _receiving(repo.path):  # the agents of a run arrive together: one receives
            if not repo.has(job.start_commit):
                started = time.perf_counter()
                repo.receive(self._base_pack())
                self._receive_ms = (time.perf_counter() - started) * 1000
        git = ws_mod.GitRepo(repo.path)
        workspace = self._workspace = ws_mod.create_workspace(
            git,
            base_commit=job.start_commit,
            run_id=job.run_id,
            agent_id=job.agent_id,
            kind=ws_mod.view_support(git, job.workspaces).kind,
            agents_work=job.agents_work,
        )
        _remove_finished()  # after this view stands on the base, which then stays
        audit = self._audit = AuditLog(git.state_dir / "audit" / f"{job.agent_id}.jsonl")
        audit.touch()
        terminal = Terminal(
            workspace.path,
            TerminalConfig(
                sandbox=SandboxMode(job.sandbox),
                allow_network=job.allow_network,
                env_passthrough=job.env_passthrough,
                default_timeout_s=job.command_timeout_s,
                hidden_paths=(git.state_dir,),
                git_common_dir=git.git_dir,
                home=git.state_dir / "homes" / job.agent_id,
                limits=job.limits,
            ),
            register_git=partial(ws_mod.ensure_registered, workspace),
        )
        bus = self._bus = AgentBus(
            agent_id=job.agent_id,
            workspace=workspace.path,
            write_scope=job.scope(),
            fence=RemoteFence(self._link, self._link.call("token")),
            audit=audit,
            terminal=terminal,
            git_dir=partial(ws_mod.listing_git_dir, workspace),
            policy=job.policy,
            gate=RemoteGate(self._link),
            resources=job.resources,
            held_resources=job.held_resources,
            network=job.network and not job.allow_network,
        )
        return bus

    def _loop(self, bus: AgentBus) -> AgentLoop:
        job = self.job
        link = self._link

        def on_turn(progress: Progress, reserved: int, used: int) -> None:
            link.post(
                "turn",
                {
                    "turns": progress.turns,
                    "tokens": progress.tokens.model_dump(),
                    "settle": (reserved, used),
                    "written": bus.written_paths(),
                    "read": bus.read_paths(),
                },
            )
            self._send_records()

        return AgentLoop(
            model=_Checkpointing(self._model_factory(job.model), self._checkpoint),
            model_name=job.model.name,
            bus=bus,
            budget=Budget(
                reserve=lambda tokens: bool(link.call("reserve", tokens)),
                settle=lambda reserved, used: link.post("settle", (reserved, used)),
                describe=lambda: str(link.call("describe")),
            ),
            # (no pace shared with the node's other agents: each has its own event loop, so a
            # refusal for the rate limit counts as an attempt, as any other error)
            retry=RetryPolicy(
                max_attempts=job.retry_max_attempts,
                retry_after_cap_s=job.retry_after_cap_s,
                rate_limited_max_s=0,
            ),
            system_prefix=job.system_prefix,
            system_task=job.system_task,
            tools=list(job.tools),
            max_turns=job.max_turns,
            max_output_tokens=job.max_output_tokens,
            on_turn=on_turn,
            transcript=self._transcript,
            cache_ttl=job.cache_ttl,
        )

    def _send_records(self) -> None:
        """The transcript lines and audit records the head does not have yet."""
        lines = self._transcript.take()
        records: list[str] = []
        if self._audit is not None:
            every = self._audit.records()
            records = [r.model_dump_json() for r in every[self._audit_sent :]]
            self._audit_sent = len(every)
        if lines or records:
            self._link.post("records", {"transcript": lines, "audit": records})

    async def _checkpoint(self, *, final: bool = False) -> None:
        """Commit the workspace's in-scope work and ship what the head does not have."""
        if self._workspace is None or self._repo is None:
            return
        async with self._commit_lock:
            job = self.job
            guarded = self._guarded()
            workspace = self._workspace
            work = await anyio.to_thread.run_sync(
                lambda: ws_mod.commit_workspace(
                    workspace,
                    message=f"fanout: {job.name}: {job.commit_message}"
                    + ("" if final else " (checkpoint)"),
                    write_scope=guarded,
                    keep_working=not final,
                )
            )
            self._dropped = [*work.dropped, *work.planted]
            self._refused = dict(guarded.refused)
            commit = work.commit or self._shipped
            self._all_landed = False
            if commit is None or commit == (self._shipped or job.start_commit):
                self._all_landed = True  # nothing new: what it made is on the head
                return
            repo = self._repo
            have = [self._shipped or job.start_commit]
            started = time.perf_counter()
            pack = await anyio.to_thread.run_sync(lambda: repo.pack_branch(commit, have))
            try:
                await self._link.acall(
                    "land",
                    {"pack": pack, "commit": commit, "old": self._landed or job.start_commit},
                )
            finally:
                self._ship_ms += (time.perf_counter() - started) * 1000
            self._shipped = self._landed = commit
            self._all_landed = True

    def _guarded(self) -> GuardedScope:
        records = self._audit.records() if self._audit is not None else []
        return GuardedScope.after(self.job.scope(), self.job.policy, records)


# workspaces of agents whose work is all on the head, removed by the node's next agent
_finished: list[tuple[ws_mod.GitRepo, ws_mod.Workspace]] = []
_finished_lock = threading.Lock()


def _remove_finished() -> None:
    with _finished_lock:
        done = list(_finished)
        _finished.clear()
    for git, workspace in done:
        try:
            ws_mod.remove_workspace(git, workspace, delete_branch=True)
        except Exception:
            log.exception("removing the finished workspace %s failed", workspace.path)


_receive_locks: dict[Path, threading.Lock] = {}
_receive_locks_lock = threading.Lock()


def _receiving(path: Path) -> threading.Lock:
    """This process's lock on receiving objects into the node repository at `path` (the
    repository's own file lock keeps other processes apart)."""
    with _receive_locks_lock:
        return _receive_locks.setdefault(path, threading.Lock())


def cache_root() -> Path:
    """Where a worker keeps its node-local repositories (one per canonical repository)."""
    root = os.environ.get("FANOUT_WORKER_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("TMPDIR", "/tmp")) / f"fanout-worker-{os.getuid()}"
