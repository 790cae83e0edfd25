"""One agent's gate: its calls that need the person's approval, and the named leases around its
commands and downstream MCP calls.

An approval lives in the agent's durable record (`AgentRecord.approval`) while it waits: the agent
shows `waiting`, a long-poll of `get_status` wakes on it, and whichever server process the
orchestrator talks to can answer it (`Orchestrator.answer_approval`). No answer by the approval's
`expires_at` refuses the call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Sequence
from contextlib import asynccontextmanager

import anyio

from orchestration.context import RepoContext
from orchestration.contracts import AgentStatus, Approval
from toolbus.errors import LeaseLost
from toolbus.lease_store import LeaseMode, LeaseRequest
from toolbus.permissions import ApprovalAnswer, ApprovalRequest

log = logging.getLogger("fanout.orchestrator")

MAX_WHY_CHARS = 600
MAX_SUBJECT_CHARS = 1_000


class AgentGate:
    """Approvals and named leases for one agent's bus (a `toolbus.permissions.CallGate`)."""

    def __init__(self, ctx: RepoContext, agent_id: str, holder: str, timeout_s: float) -> None:
        self._ctx = ctx
        self._agent_id = agent_id
        self._holder = holder
        self._timeout_s = timeout_s
        self._asked = 0

    async def approve(self, request: ApprovalRequest) -> ApprovalAnswer:
        store = self._ctx.store
        record = store.agent(self._agent_id)
        if record is None:
            return ApprovalAnswer(allowed=False, by="server", note="the agent is gone")
        self._asked += 1
        now = time.time()
        approval = Approval(
            approval_id=f"{self._agent_id}-p{self._asked}",
            agent_id=self._agent_id,
            kind=request.kind,
            subject=request.subject[:MAX_SUBJECT_CHARS],
            why=request.why.strip()[:MAX_WHY_CHARS],
            rule=request.rule,
            requested_at=now,
            expires_at=now + self._timeout_s,
        )
        store.hold_for_approval(self._agent_id, approval)
        decided: Approval | None = None
        try:
            with anyio.move_on_after(self._timeout_s):
                decided = await self._answer(approval.approval_id, record.run_id)
            if decided is None:
                decided = store.decide_approval(
                    self._agent_id, approval.approval_id, allowed=False, by="timeout", note=None
                ) or await self._answer(approval.approval_id, record.run_id)
        finally:
            if decided is None:  # cancelled while it waited: the approval is void
                store.decide_approval(
                    self._agent_id, approval.approval_id, allowed=False, by="cancelled", note=None
                )
        current = store.agent(self._agent_id)
        if current is not None and current.status is AgentStatus.WAITING:
            store.resume_running(self._agent_id)
        assert decided is not None
        return ApprovalAnswer(
            allowed=decided.decision == "allowed", by=decided.by or "?", note=decided.note
        )

    async def _answer(self, approval_id: str, run_id: str) -> Approval:
        """Wait until the approval is decided (by any server process on the repository)."""
        store = self._ctx.store
        while True:
            cursor = store.cursor()
            record = store.agent(self._agent_id)
            pending = record.approval if record is not None else None
            if pending is None or pending.approval_id != approval_id:
                raise RuntimeError(f"approval {approval_id} vanished from the agent's record")
            if pending.decision is not None:
                return pending
            await store.wait_for_change(cursor, 1.0, run_id)

    @asynccontextmanager
    async def hold(self, names: Sequence[str], *, shared: bool = False) -> AsyncGenerator[None]:
        reads = self._ctx.shared_reads
        if reads is not None and len(names) == 1 and names[0].startswith("mcp:"):
            # a downstream server's connection: reads share this process's lease
            if shared:
                async with reads.read(names[0], self._holder):
                    yield
                return
            async with reads.before_write(names[0]), self._hold(names, shared=False):
                yield
            return
        async with self._hold(names, shared=shared):
            yield

    @asynccontextmanager
    async def _hold(self, names: Sequence[str], *, shared: bool) -> AsyncGenerator[None]:
        mode = LeaseMode.READ if shared else LeaseMode.WRITE
        requests = [LeaseRequest.named(name, mode) for name in names]
        leases = self._ctx.leases
        store = self._ctx.store
        shown = [False]
        # a resource another agent's command holds shows as a wait naming the holder (a
        # downstream server's connection is held for one call: not worth an event)
        visible = not shared and not all(n.startswith("mcp:") for n in names)

        def on_wait() -> None:
            if visible:
                shown[0] = True
                show_resource_wait(self._ctx, self._agent_id, self._holder, requests, "a command")

        grant = await leases.acquire(self._holder, requests, on_wait=on_wait)
        if shown[0]:
            current = store.agent(self._agent_id)
            if current is not None and current.status is AgentStatus.WAITING:
                store.resume_running(self._agent_id)

        def lost(error: LeaseLost) -> None:
            log.warning("agent %s lost its lease on %s: %s", self._agent_id, names, error)

        self._ctx.keeper.track(grant, lost)
        try:
            yield
        finally:
            self._ctx.keeper.untrack(grant)
            with anyio.CancelScope(shield=True):
                await leases.release(grant)


def show_resource_wait(
    ctx: RepoContext, agent_id: str, holder: str, requests: Sequence[LeaseRequest], who: str
) -> None:
    """Mark the agent waiting for named resources, naming their holders as the lease store
    has them when the request queues (a look before the request could miss one)."""
    found = ctx.leases.store.blockers(requests, holder=holder).leases
    holders = sorted({lease.holder for lease in found}) or ["another agent"]
    what = ", ".join(r.resource for r in requests)
    ctx.store.mark_waiting(
        agent_id,
        f"waits for {what} held by {', '.join(holders)}",
        f"{who} waits for {what}, held by {', '.join(holders)}; it goes on once they are free",
    )
