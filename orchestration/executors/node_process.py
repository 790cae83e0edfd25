"""The process that runs a node's agents: started by the node's host (a Ray actor) with one end
of a socket pair, it enters a private mount namespace before any thread starts, so its agents'
workspaces can be copy-on-write views, and runs every agent the host sends it in one event loop.

It knows nothing of Ray. Messages on the socket are pickled tuples:
- host to here: `("start", job, node name)`, `("cancel", agent_id)`, `("answer", rid, answer)`;
- here to host: `("ready",)`, `("call", rid, agent_id, kind, payload)`,
  `("post", agent_id, kind, payload)`, `("done", agent_id, outcome)`.
An answer is `{"ok": value}` or `{"error": message}`. The host relays calls and posts to the
head, except `pack` (the start commit's objects), which it answers itself.

`python -m orchestration.executors.node_process <fd>`; it ends when the host's end closes.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

import anyio

from orchestration.executors import remote
from orchestration.workspace.overlay import enter_private_mounts

log = logging.getLogger("fanout.worker")


@dataclass
class _Pending:
    """A request waiting for its answer: from a thread (`done`) or from the event loop."""

    done: threading.Event = field(default_factory=threading.Event)
    event: anyio.Event | None = None
    answer: Any = None


class Pipe:
    """This end of the socket: requests with answers, and messages without."""

    def __init__(
        self, conn: Connection, call_soon: Callable[[Callable[[], object]], object]
    ) -> None:
        self._conn = conn
        self._call_soon = call_soon
        self._lock = threading.Lock()
        self._next = 0
        self._pending: dict[int, _Pending] = {}

    def send(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            self._conn.send(message)

    def _register(self, pending: _Pending) -> int:
        with self._lock:
            self._next += 1
            self._pending[self._next] = pending
            return self._next

    def request(self, agent_id: str, kind: str, payload: Any, timeout: float | None) -> Any:
        pending = _Pending()
        rid = self._register(pending)
        self.send(("call", rid, agent_id, kind, payload))
        if not pending.done.wait(timeout):
            self._pending.pop(rid, None)
            return {"error": f"the head did not answer within {timeout:g} s"}
        return pending.answer

    async def arequest(self, agent_id: str, kind: str, payload: Any) -> Any:
        pending = _Pending(event=anyio.Event())
        rid = self._register(pending)
        self.send(("call", rid, agent_id, kind, payload))
        assert pending.event is not None
        await pending.event.wait()
        return pending.answer

    def resolve(self, rid: int, answer: Any) -> None:
        """An answer came (on the reader thread)."""
        with self._lock:
            pending = self._pending.pop(rid, None)
        if pending is None:
            return
        pending.answer = answer
        pending.done.set()
        if pending.event is not None:
            # never waits for the event loop: it may be blocked in a request of its own,
            # whose answer this thread brings next
            self._call_soon(pending.event.set)

    def fail_all(self, message: str) -> None:
        with self._lock:
            waiting = list(self._pending)
        for rid in waiting:
            self.resolve(rid, {"error": message})


class PipeLink:
    """`remote.HeadLink` of one agent over the pipe."""

    def __init__(self, pipe: Pipe, agent_id: str) -> None:
        self._pipe = pipe
        self._agent_id = agent_id

    @staticmethod
    def _unwrap(answer: Any) -> Any:
        if isinstance(answer, dict) and "error" in answer:
            raise remote.LinkError(str(answer["error"]))  # pyright: ignore[reportUnknownArgumentType]
        return answer["ok"]  # pyright: ignore[reportIndexIssue, reportUnknownVariableType]

    def call(self, kind: str, payload: Any = None) -> Any:
        return self._unwrap(
            self._pipe.request(self._agent_id, kind, payload, remote.LINK_TIMEOUT_S)
        )

    async def acall(self, kind: str, payload: Any = None) -> Any:
        return self._unwrap(await self._pipe.arequest(self._agent_id, kind, payload))

    def post(self, kind: str, payload: Any = None) -> None:
        self._pipe.send(("post", self._agent_id, kind, payload))

    def pack(self) -> bytes:
        """The start commit's objects, from the host (which has them through Ray)."""
        data = self._unwrap(self._pipe.request(self._agent_id, "pack", None, None))
        return bytes(data)


async def serve(conn: Connection) -> None:
    call_soon = asyncio.get_running_loop().call_soon_threadsafe
    pipe = Pipe(conn, call_soon)
    agents: dict[str, remote.RemoteAgent] = {}
    root = remote.cache_root()

    async def run_agent(job: remote.AgentJob, node: str) -> None:
        link = PipeLink(pipe, job.agent_id)
        agent = agents[job.agent_id] = remote.RemoteAgent(
            job, link, cache_root=root, base_pack=link.pack, node=node
        )
        try:
            outcome = await agent.run_async()
        finally:
            agents.pop(job.agent_id, None)
        pipe.send(("done", job.agent_id, outcome))

    # jobs from the reader thread, started as tasks here (a task group starts tasks only
    # from inside the event loop's tasks)
    starts, received = anyio.create_memory_object_stream[tuple[remote.AgentJob, str]](1000)
    async with anyio.create_task_group() as tg:

        def read() -> None:
            while True:
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    break
                kind = message[0]
                if kind == "start":
                    call_soon(partial(starts.send_nowait, (message[1], message[2])))
                elif kind == "cancel":
                    found = agents.get(message[1])
                    if found is not None:
                        found.cancel()
                elif kind == "answer":
                    pipe.resolve(message[1], message[2])
            # the host is gone: stop every agent (each commits what it can), then end
            pipe.fail_all("the node's host is gone")
            for agent in list(agents.values()):
                agent.cancel()
            call_soon(tg.cancel_scope.cancel)

        threading.Thread(target=read, name="node-pipe", daemon=True).start()
        pipe.send(("ready",))
        async for job, node in received:
            tg.start_soon(run_agent, job, node)


def main(argv: list[str]) -> None:
    reason = enter_private_mounts()  # before any thread: views need it
    if reason is not None:
        log.info("agents on this node get git worktrees: %s", reason)
    conn = Connection(int(argv[0]))
    anyio.run(serve, conn)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(sys.argv[1:])
