"""The read side of a repository's runs and agents, for readers outside the engine (the MCP
resources): the same look-ups and messages as the engine's own, git and files read off the
event loop, typed answers."""

from __future__ import annotations

from dataclasses import dataclass

import anyio

from orchestration.context import RepoContext, find_agent, find_run, transcript_path
from orchestration.contracts import AgentStatus
from orchestration.errors import PathNotFound
from orchestration.join import JoinCandidate, conflict_diff
from orchestration.state import AgentRecord, RunRecord
from orchestration.status_view import lease_expires_in


@dataclass(frozen=True)
class RunListing:
    """A run and its agents' statuses."""

    run: RunRecord
    statuses: dict[str, AgentStatus]


@dataclass(frozen=True)
class BaseFile:
    """A file of a run's base commit."""

    path: str
    blob: str


@dataclass(frozen=True)
class BaseFileContent:
    """A file at a run's base: its blob, its size, its text (None when too big to serve)."""

    blob: str
    size: int
    text: str | None


@dataclass(frozen=True)
class LeaseRow:
    """A live lease as readers show it."""

    holder: str
    resource: str
    kind: str
    mode: str
    token: int
    expires_in_s: float


class RepoQueries:
    """Read-only questions about one repository's runs, agents and leases."""

    def __init__(self, ctx: RepoContext) -> None:
        self._ctx = ctx

    def runs(self) -> list[RunListing]:
        store = self._ctx.store
        return [
            RunListing(run, {a.agent_id: a.status for a in store.agents(run.run_id)})
            for run in store.runs()
        ]

    def run(self, run_id: str) -> RunRecord:
        return find_run(self._ctx, run_id)

    def agent(self, agent_id: str) -> AgentRecord:
        return find_agent(self._ctx, agent_id)

    async def leases(self, now: float) -> list[LeaseRow]:
        """The live lease table, expiries as seen at `now` (wall clock)."""
        return [
            LeaseRow(
                holder=lease.holder,
                resource=lease.resource,
                kind=lease.kind,
                mode=lease.mode.value,
                token=lease.token,
                expires_in_s=lease_expires_in(lease, now),
            )
            for lease in await self._ctx.leases.table()
        ]

    async def base_files(self, run: RunRecord) -> list[BaseFile]:
        """Every file of the run's base commit with its blob id."""
        return await anyio.to_thread.run_sync(self._ls_tree, run.base_commit)

    def _ls_tree(self, commit: str) -> list[BaseFile]:
        out = self._ctx.repo.git("ls-tree", "-r", "-z", commit)
        files: list[BaseFile] = []
        for entry in out.split("\x00"):
            if not entry:
                continue
            meta, path = entry.split("\t", 1)
            _mode, _kind, blob = meta.split(" ")
            files.append(BaseFile(path, blob))
        return files

    async def file_at_base(self, run_id: str, path: str, max_bytes: int) -> BaseFileContent:
        """The file at the run's base: its blob, size, and text unless over `max_bytes`."""
        run = self.run(run_id)

        def read() -> BaseFileContent:
            repo = self._ctx.repo
            found = repo.blob_at(run.base_commit, path)
            if found is None:
                raise PathNotFound(f"{path!r} does not exist at {run.base_commit[:12]}")
            blob, size = found
            text = repo.git("cat-file", "blob", blob) if size <= max_bytes else None
            return BaseFileContent(blob, size, text)

        return await anyio.to_thread.run_sync(read)

    async def diff(self, agent: AgentRecord, commit: str) -> str:
        """The agent's diff against its base (no external diff or text conversion)."""
        base = agent.base_commit
        return await anyio.to_thread.run_sync(
            lambda: self._ctx.repo.git(
                "diff", "--no-ext-diff", "--no-textconv", f"{base}..{commit}"
            )
        )

    async def conflict_hunks(self, agent: AgentRecord, commit: str) -> str:
        """The agent's conflicting files merged onto the current head, with markers."""
        candidate = JoinCandidate(
            agent_id=agent.agent_id,
            name=agent.name,
            task_summary=agent.prompt[:72],
            base_commit=agent.base_commit,
            branch=agent.branch or "",
            commit=commit,
        )
        return await anyio.to_thread.run_sync(lambda: conflict_diff(self._ctx.repo, candidate))

    async def transcript(self, agent_id: str, max_bytes: int) -> str:
        """The agent's transcript (JSON lines), its last `max_bytes` at most, whole lines."""
        self.agent(agent_id)
        path = transcript_path(self._ctx, agent_id)

        def read() -> bytes:
            if not path.exists():
                return b""
            data = path.read_bytes()
            if len(data) > max_bytes:
                data = data[-max_bytes:]
                data = data[data.find(b"\n") + 1 :]
            return data

        return (await anyio.to_thread.run_sync(read)).decode("utf-8", errors="replace")
