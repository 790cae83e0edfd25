"""Durable state of runs and agents under `<repo>/.git/fanout/state.db`.

Written as it changes, shared by every server process on the repository (SQLite WAL; each change
is one short transaction). Each change appends an event whose sequence number is the `get_status`
cursor. Waiters in this process are woken by an event; waiters for changes made by another process
notice them by a light poll of the newest sequence number.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Collection, Generator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Literal, TypedDict, TypeVar, Unpack

import anyio
import filelock
from pydantic import BaseModel, ConfigDict, Field

from orchestration.contracts import (
    AgentResult,
    AgentStatus,
    Approval,
    ResourceSpec,
    StopReason,
    TokenUsage,
)
from toolbus.permissions import PermissionRules

# An agents snapshot reads again only the rows of agents that changed since the last one, up to
# this many (or half the run's agents), and else every row of the run.
_SNAPSHOT_ROWS_READ = 64
_SQL_VARIABLES = 500  # (SQLite before 3.32 takes at most 999 in one statement)
_APPLIED_KEPT = 4096  # records `apply` keeps parsed (`StateStore._applied`)

_Record = TypeVar("_Record", bound=BaseModel)


def _reparsed(
    cached: tuple[str, _Record] | None, text: str, model: type[_Record]
) -> tuple[str, _Record]:
    """`cached` (stored JSON, the record parsed from it) while the stored JSON is still `text`;
    else `text` parsed: the snapshots parse only rows that changed."""
    if cached is not None and cached[0] == text:
        return cached
    return text, model.model_validate_json(text)


# Events are never deleted, so a new event's `seq` (its rowid: the largest one plus one) only
# grows, as cursors need; AUTOINCREMENT would keep the same promise at the price of writing its
# counter's page in every transaction that records one (stores made before keep theirs).
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, created_at REAL NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS agents (
    agent_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, ord INTEGER NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS agents_run ON agents(run_id, ord);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY, ts REAL NOT NULL, run_id TEXT, agent_id TEXT,
    kind TEXT NOT NULL, detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_run ON events(run_id, seq);
CREATE TABLE IF NOT EXISTS budgets (
    run_id TEXT PRIMARY KEY, total INTEGER NOT NULL, used INTEGER NOT NULL DEFAULT 0,
    reserved INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS servers (
    server_id TEXT PRIMARY KEY, pid INTEGER NOT NULL, host TEXT NOT NULL, started_at REAL NOT NULL,
    heartbeat REAL NOT NULL);
"""

# A server whose heartbeat is older than this is taken for dead: its running agents are
# marked interrupted by another server of the store. A server on this machine (same host, boot
# and PID namespace) whose process is gone is taken for dead at once.
SERVER_STALE_S = 20.0
CROSS_PROCESS_POLL_S = 0.25
UNCHANGED_KEPT = 1024  # answers of that query kept (distinct cursors and runs waited on)


class EventKind(StrEnum):
    """What an event of the store records; its value is the stored `kind`."""

    RUN_CREATED = "run_created"
    AGENT_ADDED = "agent_added"
    CLAIMED = "claimed"
    LEASED = "leased"
    WAITING = "waiting"
    RUNNING = "running"
    TURN = "turn"
    LEASE_LOST = "lease_lost"
    CANCEL_REQUESTED = "cancel_requested"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    CONFLICTED = "conflicted"
    STALE = "stale"
    VERIFY_FAILED = "verify_failed"
    MERGED = "merged"
    DISCARDED = "discarded"
    NOTE = "note"
    APPROVAL = "approval"  # a call waits for the person's answer
    APPROVED = "approved"  # the answer (or the timeout)

    @classmethod
    def finished_as(cls, status: AgentStatus) -> EventKind:
        """The event of an agent's loop ending in `status` (a final status)."""
        return cls(status.value)


class SharedFile(BaseModel):
    """A file of the shared context, at the run's base."""

    path: str
    blob: str | None
    size: int
    content: str | None = Field(default=None, description="None when binary, missing or too big")
    note: str | None = None


class SharedSnapshot(BaseModel):
    """The immutable shared context of a run."""

    model_config = ConfigDict(frozen=True)

    base_commit: str
    plan: str | None = None
    conventions: str | None = None
    files: list[SharedFile] = Field(default_factory=list[SharedFile])
    file_count: int = 0


class RunRecord(BaseModel, frozen=True):
    """A run as stored."""

    run_id: str
    repo: str
    created_at: float
    base_commit: str
    head_commit: str | None
    branch_ref: str | None
    snapshot_dirty: bool
    shared: SharedSnapshot
    max_concurrency: int
    budget_tokens: int
    model: str
    owner: str
    # the estimate at spawn (billed-equivalent tokens); the shared prefix's cache lifetime (None:
    # too short to be cached) and how it is cached; the estimated size of a first request
    # (which calibrates later estimates)
    estimate_tokens: int | None = None
    verify_command: str | None = None
    cache_ttl: Literal["5m", "1h"] | None = "5m"
    cache_note: str = ""
    first_request_tokens: int | None = None
    permissions: PermissionRules | None = None
    mcp_servers: list[str] = Field(default_factory=list[str])


class AgentRecord(BaseModel, frozen=True):
    """An agent as stored (frozen: a change is a new record, made by `StateStore.apply`)."""

    agent_id: str
    run_id: str
    index: int
    name: str
    prompt: str
    write_scope: list[str] | None
    model: str
    max_turns: int
    status: AgentStatus = AgentStatus.QUEUED
    status_reason: str | None = None
    stop_reason: StopReason | None = None
    turns: int = 0
    tokens: TokenUsage = Field(default_factory=TokenUsage)
    # files whose contents the bus showed it while it ran (read_file, search hits)
    read_files: list[str] = Field(default_factory=list[str])
    # the input side (plain, cache reads and writes) of its first turn, as the API counted it
    first_input_tokens: int | None = None
    base_commit: str
    start_commit: str | None = None
    branch: str | None = None
    workspace: str | None = None
    # the user's ignored files copied (or laid) into its workspace: never its commits' to take
    included: list[str] = Field(default_factory=list[str])
    commit: str | None = None
    result: AgentResult | None = None
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    finish_seq: int | None = None
    owner: str
    rerun_of: str | None = None
    rerun_context: str | None = None
    waits_for: list[str] = Field(default_factory=list[str])
    depends_on: list[str] = Field(default_factory=list[str])  # agent ids, merged before it runs
    lease_holder: str | None = None
    lease_token: int | None = None
    lease_lost: bool = False
    conflicts: list[str] = Field(default_factory=list[str])
    # files it read that changed on the canonical branch since (the join found it stale)
    stale_reads: list[str] = Field(default_factory=list[str])
    merged_commit: str | None = None  # its merge commit on the canonical branch
    changed_files: list[str] = Field(default_factory=list[str])
    resources: list[ResourceSpec] = Field(default_factory=list[ResourceSpec])
    network: bool = False
    permissions: PermissionRules | None = None
    approval: Approval | None = None  # the call it holds for the person's answer
    node: str | None = None  # the machine it runs on, when not this server's (an executor's)


class Event(BaseModel):
    """One change, as the status cursor counts it."""

    seq: int
    ts: float
    run_id: str | None
    agent_id: str | None
    kind: str
    detail: str


class FinalChanges(TypedDict, total=False):
    """What an agent's final record may carry besides its status and reasons."""

    result: AgentResult | None
    commit: str | None
    finished_at: float | None
    turns: int
    tokens: TokenUsage
    changed_files: list[str]


class AgentChanges(FinalChanges, total=False):
    """The fields of an agent record that change after it is created."""

    status: AgentStatus
    status_reason: str | None
    stop_reason: StopReason | None
    base_commit: str
    start_commit: str | None
    branch: str | None
    workspace: str | None
    included: list[str]
    started_at: float | None
    owner: str
    lease_token: int | None
    lease_lost: bool
    conflicts: list[str]
    stale_reads: list[str]
    read_files: list[str]
    merged_commit: str | None
    first_input_tokens: int | None
    approval: Approval | None
    node: str | None


@dataclass(frozen=True)
class LastTurn:
    """An agent's last turn, recorded with its final state (`StateStore.mark_final`): its
    budget reservation to settle (reserved, used), the files read through its bus, and the
    agent's turns and tokens with it."""

    settle: tuple[int, int]
    read_files: list[str]
    turns: int
    tokens: TokenUsage


def _turn_changes(turns: int, tokens: TokenUsage, read_files: list[str] | None) -> AgentChanges:
    """What recording a turn changes in the agent's record, but for its changed files."""
    changes: AgentChanges = {"turns": turns, "tokens": tokens}
    if read_files is not None:
        changes["read_files"] = read_files
    if turns == 1:
        changes["first_input_tokens"] = tokens.input + tokens.cache_read + tokens.cache_write
    return changes


@functools.cache
def host_identity() -> str:
    """This machine and PID namespace (host name, boot id and PID namespace where the system
    tells them): servers registered under the same identity can be checked by process id."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip())
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return ":".join(parts)


def pid_running(pid: int) -> bool:
    """Whether a process of this id exists and has not exited (a zombie has)."""
    if pid <= 0:
        return False
    if sys.platform == "win32":  # pragma: no cover - os.kill would end the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, as another user's
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return True  # no /proc (macOS): it exists
    fields = stat.rsplit(")", 1)[-1].split()
    return not fields or fields[0] != "Z"


@dataclass
class _LastChanges:
    """Each run's newest event (run_id -> seq), read through the cursor `through`."""

    seqs: dict[str, int] = field(default_factory=dict[str, int])
    through: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class StateStore:
    """The durable store of one repository's runs (one per process and repository)."""

    def __init__(self, state_dir: Path, *, stale_s: float = SERVER_STALE_S) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.stale_s = stale_s
        self.path = state_dir / "state.db"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        # Set up by one process at a time: two processes opening a new store at once could both
        # read it and then both want to write (WAL mode, schema); SQLite then refuses one at once
        # ("database is locked") instead of letting it wait, to avoid a deadlock.
        with filelock.FileLock(str(state_dir / "state.lock"), timeout=120):
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=30000")
            with self._lock:
                self._db.executescript(SCHEMA)
        self._changed = anyio.Event()
        # The newest event this store recorded, per run and of any run (key None), with when it
        # was committed (time.monotonic()): a waiter woken by this process's own change finds it
        # here without a query. `_recording`: the events of the open transaction.
        self._recorded: dict[str | None, tuple[int, float]] = {}
        self._recording: list[tuple[str | None, int]] = []
        # (since, run_id) -> when the database last showed no change after `since` for `run_id`:
        # waiters asking the same share that query for CROSS_PROCESS_POLL_S
        self._unchanged: dict[tuple[int, str | None], float] = {}
        # the largest rowid of `runs` when every run's snapshot was read, and that snapshot's
        # cursor (see `runs_snapshot`)
        self._all_runs_rowid: tuple[object, int] | None = None
        self.server_id = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns():x}"

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Generator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._recording.clear()
            try:
                yield self._db
            except BaseException:
                self._recording.clear()
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            if self._recording:
                now = time.monotonic()
                for run_id, seq in self._recording:
                    self._recorded[run_id] = (seq, now)
                self._recorded[None] = (max(seq for _, seq in self._recording), now)
                self._recording.clear()

    def _query(self, sql: str, args: Sequence[object] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            return list(self._db.execute(sql, tuple(args)).fetchall())

    # --- events and the change cursor -------------------------------------------------------

    def _append_event(
        self,
        db: sqlite3.Connection,
        run_id: str | None,
        agent_id: str | None,
        kind: EventKind,
        detail: str,
    ) -> int:
        cur = db.execute(
            "INSERT INTO events (ts, run_id, agent_id, kind, detail) VALUES (?, ?, ?, ?, ?)",
            (time.time(), run_id, agent_id, kind.value, detail),
        )
        seq = int(cur.lastrowid or 0)
        self._recording.append((run_id, seq))
        return seq

    def _notify(self) -> None:
        event, self._changed = self._changed, anyio.Event()
        event.set()

    def record_event(
        self, run_id: str | None, agent_id: str | None, kind: EventKind, detail: str
    ) -> int:
        with self._tx() as db:
            seq = self._append_event(db, run_id, agent_id, kind, detail)
        self._notify()
        return seq

    def cursor(self) -> int:
        rows = self._query("SELECT COALESCE(MAX(seq), 0) FROM events")
        return int(str(rows[0][0]))

    def events(
        self, *, since: int = 0, run_id: str | None = None, limit: int = 1000
    ) -> list[Event]:
        sql = "SELECT seq, ts, run_id, agent_id, kind, detail FROM events WHERE seq > ?"
        args: list[object] = [since]
        if run_id is not None:
            sql += " AND run_id = ?"
            args.append(run_id)
        sql += " ORDER BY seq LIMIT ?"
        args.append(limit)
        return [
            Event(
                seq=int(str(r[0])),
                ts=float(str(r[1])),
                run_id=None if r[2] is None else str(r[2]),
                agent_id=None if r[3] is None else str(r[3]),
                kind=str(r[4]),
                detail=str(r[5]),
            )
            for r in self._query(sql, args)
        ]

    def events_of_kind(self, kind: EventKind, *, since: int) -> list[tuple[int, str, str]]:
        """(seq, agent_id, detail) of the events of `kind` after `since`, in order."""
        rows = self._query(
            "SELECT seq, agent_id, detail FROM events WHERE seq > ? AND kind = ? ORDER BY seq",
            (since, kind),
        )
        return [(int(str(r[0])), str(r[1]), str(r[2])) for r in rows]

    def changes_after(
        self, since: int, upto: int, run_id: str | None = None
    ) -> list[tuple[str | None, str]]:
        """The distinct (agent_id, kind) of the events after `since` up to `upto` (of `run_id`,
        or of every run)."""
        sql = "SELECT DISTINCT agent_id, kind FROM events WHERE seq > ? AND seq <= ?"
        args: list[object] = [since, upto]
        if run_id is not None:
            sql += " AND run_id = ?"
            args.append(run_id)
        rows = self._query(sql, args)
        return [(None if r[0] is None else str(r[0]), str(r[1])) for r in rows]

    async def wait_for_change(
        self, since: int, timeout_s: float, run_id: str | None = None
    ) -> bool:
        """Wait until an event newer than `since` exists (for `run_id` if given), or time out."""
        return await self.change_after(since, timeout_s, run_id) is not None

    async def change_after(
        self, since: int, timeout_s: float, run_id: str | None = None
    ) -> float | None:
        """`wait_for_change`, telling when the change became known (`time.monotonic()`): state
        read at or after that moment shows it. None if there was none within `timeout_s`."""
        with anyio.move_on_after(timeout_s):
            while True:
                known = self._change_known_at(since, run_id)
                if known is not None:
                    return known
                waiter = self._changed
                with anyio.move_on_after(CROSS_PROCESS_POLL_S):
                    await waiter.wait()
        return self._change_known_at(since, run_id)

    def _change_known_at(self, since: int, run_id: str | None) -> float | None:
        """When an event after `since` (of `run_id`, or of any run) became known: when this
        store committed its newest such event, or now if the database shows one; None if none.

        Many waiters wake at each change: those of other runs find nothing here and skip the
        query while another waiter of the same question ran it less than CROSS_PROCESS_POLL_S
        ago (the delay after which a change made by another process is seen anyway)."""
        recorded = self._recorded.get(run_id)
        if recorded is not None and recorded[0] > since:
            return recorded[1]
        now = time.monotonic()
        question = (since, run_id)
        checked = self._unchanged.get(question)
        if checked is not None and now - checked < CROSS_PROCESS_POLL_S:
            return None
        if run_id is None:
            found = self.cursor() > since
        else:
            found = bool(
                self._query(
                    "SELECT 1 FROM events WHERE seq > ? AND run_id = ? LIMIT 1", (since, run_id)
                )
            )
        if found:
            self._unchanged.pop(question, None)
            return time.monotonic()  # (after the query: state read from now on shows it)
        if len(self._unchanged) >= UNCHANGED_KEPT:
            self._unchanged = {
                q: at for q, at in self._unchanged.items() if now - at < CROSS_PROCESS_POLL_S
            }
        self._unchanged[question] = now
        return None

    # --- runs -------------------------------------------------------------------------------

    def create_run(self, run: RunRecord, agents: Sequence[AgentRecord]) -> None:
        """Store the run and its agents. The records stored are kept as `apply` keeps its own
        (and as the run's first snapshot), so that neither the agents' first reads nor that
        snapshot parse the JSON just made from them."""
        with self._tx() as db:
            version = self._data_version(db)
            db.execute(
                "INSERT INTO runs (run_id, created_at, data) VALUES (?, ?, ?)",
                (run.run_id, run.created_at, run.model_dump_json()),
            )
            db.execute(
                "INSERT INTO budgets (run_id, total) VALUES (?, ?)", (run.run_id, run.budget_tokens)
            )
            stored = {agent.agent_id: (self._insert_agent(db, agent), agent) for agent in agents}
            self._append_event(db, run.run_id, None, EventKind.RUN_CREATED, f"{len(agents)} agents")
        for agent_id, kept in stored.items():
            self._keep_applied(agent_id, kept, version)
        self._parsed_agents.setdefault(run.run_id, stored)
        self._notify()

    def run(self, run_id: str) -> RunRecord | None:
        """The run, None when there is none. A run is never changed once stored: its record is
        parsed once, then shared with every caller and `runs_snapshot` (read it, never mutate
        it)."""
        known = self._parsed_runs.get(run_id)
        if known is not None:
            return known[1]
        rows = self._query("SELECT data FROM runs WHERE run_id = ?", (run_id,))
        if not rows:
            return None
        text = str(rows[0][0])
        known = self._parsed_runs[run_id] = (text, RunRecord.model_validate_json(text))
        return known[1]

    def runs(self) -> list[RunRecord]:
        rows = self._query("SELECT data FROM runs ORDER BY created_at, rowid")
        return [RunRecord.model_validate_json(str(r[0])) for r in rows]

    # --- agents -----------------------------------------------------------------------------

    def _insert_agent(self, db: sqlite3.Connection, agent: AgentRecord) -> str:
        """Insert the agent's row; the JSON stored."""
        text = agent.model_dump_json()
        db.execute(
            "INSERT INTO agents (agent_id, run_id, ord, data) VALUES (?, ?, ?, ?)",
            (agent.agent_id, agent.run_id, agent.index, text),
        )
        return text

    def add_agent(self, agent: AgentRecord) -> None:
        with self._tx() as db:
            self._insert_agent(db, agent)
            self._append_event(db, agent.run_id, agent.agent_id, EventKind.AGENT_ADDED, agent.name)
        self._notify()

    def agent(self, agent_id: str) -> AgentRecord | None:
        """The agent as stored now, None when there is none; parsed only when its row is not
        the one `apply` (or this) last parsed."""
        with self._lock:
            return self._current(self._db, agent_id)[1]

    def _current(self, db: sqlite3.Connection, agent_id: str) -> tuple[int, AgentRecord | None]:
        """(SQLite's `data_version` now, the agent as stored): the record kept from this
        store's last write or read of the row while no other connection has committed since,
        else the row read, and kept, at that version. Under `_lock`."""
        version = self._data_version(db)  # (read before the row: never newer)
        known = self._applied.get(agent_id)
        if known is not None and self._valid_at.get(agent_id) == version:
            return version, known[1]
        row = db.execute("SELECT data FROM agents WHERE agent_id = ?", (agent_id,)).fetchone()
        if row is None:
            return version, None
        parsed = _reparsed(known, str(row[0]), AgentRecord)
        self._keep_applied(agent_id, parsed, version)
        return version, parsed[1]

    def agents(self, run_id: str) -> list[AgentRecord]:
        rows = self._query("SELECT data FROM agents WHERE run_id = ? ORDER BY ord", (run_id,))
        return [AgentRecord.model_validate_json(str(r[0])) for r in rows]

    def apply(
        self,
        agent_id: str,
        kind: EventKind,
        detail: str = "",
        *,
        settle: tuple[int, int] | None = None,
        **changes: Unpack[AgentChanges],
    ) -> AgentRecord:
        """Apply `changes` to the agent and record an event of `kind`, in one transaction; with
        `settle` (reserved, used), settle a reservation of the agent's run in it too (one per
        turn). The named transitions below are the ones the engine makes; this is their one
        write path (and the way tests set up a state)."""
        with self._tx() as db:
            version, current = self._current(db, agent_id)
            if current is None:
                raise KeyError(agent_id)
            update: dict[str, object] = dict(changes)
            new_status = changes.get("status", current.status)
            if new_status != current.status and not new_status.active and current.status.active:
                seq_row = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events").fetchone()
                update["finish_seq"] = int(seq_row[0])
            # the changes validated with the record's other fields as they are (its nested
            # records are taken as they stand, not dumped and parsed again)
            updated = AgentRecord.model_validate({**current.__dict__, **update})
            text = updated.model_dump_json()
            db.execute("UPDATE agents SET data = ? WHERE agent_id = ?", (text, agent_id))
            self._append_event(db, updated.run_id, agent_id, kind, detail or updated.status.value)
            if settle is not None:
                self._settle(db, updated.run_id, *settle)
        self._remember(updated.run_id, agent_id, (text, updated), version)
        self._notify()
        return updated

    @functools.cached_property
    def _applied(self) -> dict[str, tuple[str, AgentRecord]]:
        """agent_id -> (the JSON `apply` last stored for it, or `agent` last read, and that
        record): the next `apply` or `agent` parses the row only when it changed since."""
        return {}

    def _keep_applied(self, agent_id: str, parsed: tuple[str, AgentRecord], version: int) -> None:
        """Keep `parsed` (stored JSON, its record) as the agent's in `_applied`, valid at
        `data_version` `version` (`_valid_at`: a write of this connection's own leaves the
        version as it was), at most `_APPLIED_KEPT` agents' at a time."""
        if len(self._applied) >= _APPLIED_KEPT and agent_id not in self._applied:
            self._applied.clear()
            self._valid_at.clear()
        self._applied[agent_id] = parsed
        self._valid_at[agent_id] = version

    @functools.cached_property
    def _valid_at(self) -> dict[str, int]:
        """agent_id -> the `data_version` at which its `_applied` record was the stored row:
        while the database's version is still that one, no other connection has committed
        since, and the row is read from there, not from the database. This connection's
        other writes of an agent's row drop its entry (`_forget`)."""
        return {}

    def _forget(self, agent_id: str) -> None:
        self._valid_at.pop(agent_id, None)

    @staticmethod
    def _data_version(db: sqlite3.Connection) -> int:
        """SQLite's count of the changes other connections committed, as this one sees it."""
        return int(db.execute("PRAGMA data_version").fetchone()[0])

    def _remember(
        self, run_id: str, agent_id: str, stored: tuple[str, AgentRecord], version: int
    ) -> None:
        """Keep the record `apply` just stored (at `version`, see `_keep_applied`), so that
        neither the next `apply` nor a snapshot parses the JSON it was made from. A snapshot's
        row is replaced, never added (a snapshot may be copying that dict in another thread:
        its size must not change)."""
        self._keep_applied(agent_id, stored, version)
        rows = self._parsed_agents.get(run_id)
        if rows is not None and agent_id in rows:
            rows[agent_id] = stored

    # --- the transitions the engine makes -----------------------------------------------------

    def record_lease(self, agent_id: str, token: int, *, queued: bool = False) -> AgentRecord:
        """The agent holds its write leases under `token`; `queued`: it waited for them and
        is queued to start now."""
        if queued:
            return self.apply(
                agent_id,
                EventKind.LEASED,
                f"token {token}",
                lease_token=token,
                status=AgentStatus.QUEUED,
                status_reason=None,
            )
        return self.apply(agent_id, EventKind.LEASED, f"token {token}", lease_token=token)

    def mark_waiting(self, agent_id: str, detail: str, reason: str) -> AgentRecord:
        """The agent waits (for leases, or for an overlapping agent to be merged)."""
        return self.apply(
            agent_id, EventKind.WAITING, detail, status=AgentStatus.WAITING, status_reason=reason
        )

    def hold_for_approval(self, agent_id: str, approval: Approval) -> AgentRecord:
        """A call of the running agent waits for the person's answer: it shows `waiting`."""
        what = f"{approval.kind} {approval.subject}".strip()
        return self.apply(
            agent_id,
            EventKind.APPROVAL,
            approval.approval_id,
            status=AgentStatus.WAITING,
            status_reason=f"waits for approval {approval.approval_id}: {what[:300]}",
            approval=approval,
        )

    def decide_approval(
        self, agent_id: str, approval_id: str, *, allowed: bool, by: str, note: str | None
    ) -> Approval | None:
        """Record the answer to a pending approval, once: None when the agent holds no such
        undecided approval (answered already, timed out, or never asked)."""
        with self._tx() as db:
            row = db.execute("SELECT data FROM agents WHERE agent_id = ?", (agent_id,)).fetchone()
            if row is None:
                return None
            current = AgentRecord.model_validate_json(str(row[0]))
            pending = current.approval
            if pending is None or pending.approval_id != approval_id or pending.decision:
                return None
            decided = pending.model_copy(
                update={"decision": "allowed" if allowed else "refused", "by": by, "note": note}
            )
            updated = current.model_copy(update={"approval": decided})
            self._forget(agent_id)
            db.execute(
                "UPDATE agents SET data = ? WHERE agent_id = ?",
                (updated.model_dump_json(), agent_id),
            )
            self._append_event(
                db,
                updated.run_id,
                agent_id,
                EventKind.APPROVED,
                f"{approval_id} {decided.decision}",
            )
        self._notify()
        return decided

    def resume_running(self, agent_id: str) -> AgentRecord:
        """The agent runs again (its call was answered, or its command got its resources); an
        answered approval stays on the record, so a second answer is told who answered."""
        return self.apply(
            agent_id,
            EventKind.RUNNING,
            "approval answered",
            status=AgentStatus.RUNNING,
            status_reason=None,
        )

    def mark_running(
        self,
        agent_id: str,
        *,
        workspace: str,
        branch: str | None,
        base_commit: str,
        start_commit: str,
        commit: str | None,
        started_at: float,
        included: Sequence[str] = (),
    ) -> AgentRecord:
        """The agent's workspace is ready (`included`: the user's files copied or laid into
        it) and its loop starts."""
        return self.apply(
            agent_id,
            EventKind.RUNNING,
            status=AgentStatus.RUNNING,
            status_reason=None,
            started_at=started_at,
            workspace=workspace,
            included=list(included),
            branch=branch,
            base_commit=base_commit,
            start_commit=start_commit,
            commit=commit,
        )

    def record_turn(
        self,
        agent_id: str,
        *,
        turns: int,
        tokens: TokenUsage,
        changed_files: list[str],
        settle: tuple[int, int],
        read_files: list[str] | None = None,
    ) -> AgentRecord:
        """One model turn of the agent ended; its reservation of the budget is settled."""
        changes = _turn_changes(turns, tokens, read_files)
        changes["changed_files"] = changed_files
        return self.apply(agent_id, EventKind.TURN, f"turn {turns}", settle=settle, **changes)

    def mark_lease_lost(self, agent_id: str, detail: str) -> AgentRecord:
        """The agent's write lease was lost: what it writes can no longer land."""
        return self.apply(agent_id, EventKind.LEASE_LOST, detail, lease_lost=True)

    def request_cancel(self, agent_id: str, requested_by: str, reason: str) -> AgentRecord:
        """Ask the server running the agent to cancel it (it looks for these events)."""
        return self.apply(agent_id, EventKind.CANCEL_REQUESTED, requested_by, status_reason=reason)

    def mark_final(
        self,
        agent_id: str,
        status: AgentStatus,
        detail: str,
        *,
        stop_reason: StopReason,
        reason: str | None,
        last_turn: LastTurn | None = None,
        **changes: Unpack[FinalChanges],
    ) -> AgentRecord:
        """The agent's loop ended in `status` (a final status), for `stop_reason`. With
        `last_turn`, the loop's last turn is recorded in the same step, as `record_turn` would
        (its reservation settled)."""
        if status.active:
            raise ValueError(f"mark_final: {status.value} is not a final status")
        update: AgentChanges = {
            "status": status,
            "stop_reason": stop_reason,
            "status_reason": reason,
            **changes,
        }
        settle = None
        if last_turn is not None:
            turn = _turn_changes(last_turn.turns, last_turn.tokens, last_turn.read_files)
            update = {**turn, **update}
            settle = last_turn.settle
        return self.apply(agent_id, EventKind.finished_as(status), detail, settle=settle, **update)

    def mark_conflicted(self, agent_id: str, conflicts: list[str], reason: str) -> AgentRecord:
        """The join found the agent's change conflicting with the canonical head."""
        return self.apply(
            agent_id,
            EventKind.CONFLICTED,
            ", ".join(conflicts),
            status=AgentStatus.CONFLICTED,
            status_reason=reason,
            conflicts=conflicts,
        )

    def mark_stale(self, agent_id: str, paths: list[str], reason: str) -> AgentRecord:
        """The join found that the agent read files changed on the canonical branch since."""
        return self.apply(
            agent_id,
            EventKind.STALE,
            ", ".join(paths),
            status=AgentStatus.STALE,
            status_reason=reason,
            stale_reads=paths,
        )

    def mark_verify_failed(self, agent_id: str, reason: str) -> AgentRecord:
        """The verification command failed on the canonical head with the agent's change."""
        return self.apply(
            agent_id,
            EventKind.VERIFY_FAILED,
            "verification failed",
            status=AgentStatus.VERIFY_FAILED,
            status_reason=reason,
        )

    def mark_merged(self, agent_id: str, commit: str | None, reason: str) -> AgentRecord:
        """The agent's change is on the canonical branch (or it had none); its workspace is
        gone."""
        return self.apply(
            agent_id,
            EventKind.MERGED,
            commit or "no changes",
            status=AgentStatus.MERGED,
            status_reason=reason,
            workspace=None,
            merged_commit=commit,
        )

    def mark_discarded(self, agent_id: str, detail: str, reason: str) -> AgentRecord:
        """The agent's change will not be merged; its workspace is gone, its branch kept."""
        return self.apply(
            agent_id,
            EventKind.DISCARDED,
            detail,
            status=AgentStatus.DISCARDED,
            status_reason=reason,
            workspace=None,
        )

    def claim_agent(
        self, agent_id: str, from_owner: str, statuses: Collection[AgentStatus]
    ) -> AgentRecord | None:
        """Make this server the agent's owner if it still belongs to `from_owner` and has one of
        `statuses`, in one transaction; `None` if it does not (another server claimed it first,
        or it moved on, e.g. was merged). Two servers that find the same dead server's agent
        cannot both take it."""
        with self._tx() as db:
            row = db.execute("SELECT data FROM agents WHERE agent_id = ?", (agent_id,)).fetchone()
            if row is None:
                return None
            current = AgentRecord.model_validate_json(str(row[0]))
            if current.owner != from_owner or current.status not in statuses:
                return None
            updated = current.model_copy(update={"owner": self.server_id})
            self._forget(agent_id)
            db.execute(
                "UPDATE agents SET data = ? WHERE agent_id = ?",
                (updated.model_dump_json(), agent_id),
            )
            self._append_event(db, updated.run_id, agent_id, EventKind.CLAIMED, self.server_id)
        self._notify()
        return updated

    # --- the shared token budget ------------------------------------------------------------

    def budget(self, run_id: str) -> tuple[int, int, int]:
        """(total, used, reserved) of the run's budget."""
        rows = self._query("SELECT total, used, reserved FROM budgets WHERE run_id = ?", (run_id,))
        if not rows:
            return (0, 0, 0)
        total, used, reserved = rows[0]
        return (int(str(total)), int(str(used)), int(str(reserved)))

    def budgets(self) -> dict[str, tuple[int, int, int]]:
        """run_id -> (total, used, reserved) of every run's budget."""
        rows = self._query("SELECT run_id, total, used, reserved FROM budgets")
        return {str(r[0]): (int(str(r[1])), int(str(r[2])), int(str(r[3]))) for r in rows}

    def reserve_budget(self, run_id: str, amount: int) -> bool:
        """Reserve `amount` tokens from the run's pool; False when the pool cannot cover it.
        One statement, so its own transaction (the check and the change are atomic)."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE budgets SET reserved = reserved + ? "
                "WHERE run_id = ? AND used + reserved + ? <= total",
                (amount, run_id, amount),
            )
            return cur.rowcount == 1

    def settle_budget(self, run_id: str, reserved: int, used: int) -> None:
        """Turn a reservation into actual use (which may be more or less than reserved)."""
        with self._tx() as db:
            self._settle(db, run_id, reserved, used)

    @staticmethod
    def _settle(db: sqlite3.Connection, run_id: str, reserved: int, used: int) -> None:
        db.execute(
            "UPDATE budgets SET reserved = MAX(reserved - ?, 0), used = used + ? WHERE run_id = ?",
            (reserved, used, run_id),
        )

    def reset_reservations(self, run_id: str) -> None:
        """Drop reservations left by a process that died mid-turn."""
        with self._tx() as db:
            db.execute("UPDATE budgets SET reserved = 0 WHERE run_id = ?", (run_id,))

    # --- servers (liveness of the processes owning agents) ------------------------------------

    def register_server(self) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO servers (server_id, pid, host, started_at, heartbeat) "
                "VALUES (?, ?, ?, ?, ?)",
                (self.server_id, os.getpid(), host_identity(), now, now),
            )

    def heartbeat(self) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE servers SET heartbeat = ? WHERE server_id = ?",
                (time.time(), self.server_id),
            )

    def unregister_server(self) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM servers WHERE server_id = ?", (self.server_id,))

    def live_servers(self) -> set[str]:
        """The servers whose heartbeat is recent, except those of this machine whose process has
        exited (a server restarted at once after a crash need not wait for the heartbeat of the
        killed one to go stale)."""
        cutoff = time.time() - self.stale_s
        rows = self._query(
            "SELECT server_id, pid, host FROM servers WHERE heartbeat >= ?", (cutoff,)
        )
        here = host_identity()
        return {
            str(server_id)
            for server_id, pid, host in rows
            if server_id == self.server_id or host != here or pid_running(int(str(pid)))
        }

    def orphaned(self, live: Collection[str]) -> bool:
        """Whether an agent of a server not in `live` needs a live one: it is still active, or it
        finished unmerged holding a write lease that nobody renews now."""
        rows = self._query(
            "SELECT json_extract(data, '$.owner'), json_extract(data, '$.status'), "
            "json_extract(data, '$.lease_token'), json_extract(data, '$.lease_lost') "
            "FROM agents WHERE json_extract(data, '$.status') NOT IN (?, ?)",
            (AgentStatus.MERGED.value, AgentStatus.DISCARDED.value),
        )
        for owner, status, token, lost in rows:
            if owner in live:
                continue
            if AgentStatus(str(status)).active or (token is not None and not lost):
                return True
        return False

    def agent_ids(self) -> set[str]:
        """The ids of every agent the repository has, without reading their records."""
        return {str(r[0]) for r in self._query("SELECT agent_id FROM agents")}

    def latest_runs(self, count: int) -> list[RunRecord]:
        """The `count` latest runs, oldest first (as `runs` orders them)."""
        rows = self._query(
            "SELECT data FROM runs ORDER BY created_at DESC, rowid DESC LIMIT ?", (count,)
        )
        return [RunRecord.model_validate_json(str(r[0])) for r in reversed(rows)]

    def all_agents(self) -> list[AgentRecord]:
        rows = self._query("SELECT data FROM agents ORDER BY run_id, ord")
        return [AgentRecord.model_validate_json(str(r[0])) for r in rows]

    def dump(self) -> str:
        """A JSON dump of runs and agents, for debugging and the CLI."""
        runs = [r.model_dump(mode="json") for r in self.runs()]
        agents = [a.model_dump(mode="json") for a in self.all_agents()]
        return json.dumps({"runs": runs, "agents": agents}, indent=1)

    # --- read-only snapshots for status polls -----------------------------------------------

    @functools.cached_property
    def _parsed_agents(self) -> dict[str, dict[str, tuple[str, AgentRecord]]]:
        """run_id -> agent_id -> (stored JSON, the record parsed from it)."""
        return {}

    @functools.cached_property
    def _snapshots(self) -> dict[str, tuple[int, list[AgentRecord]]]:
        """run_id -> (the cursor read before its rows, the snapshot of them)."""
        return {}

    @functools.cached_property
    def _parsed_runs(self) -> dict[str, tuple[str, RunRecord]]:
        """run_id -> (stored JSON, the record parsed from it)."""
        return {}

    @functools.cached_property
    def _run_snapshots(self) -> dict[str | None, tuple[int, list[RunRecord]]]:
        """run_id (None: every run) -> (the cursor read before the rows, the snapshot)."""
        return {}

    @functools.cached_property
    def _last_changes(self) -> _LastChanges:
        return _LastChanges()

    def last_change(self, run_id: str, cursor: int) -> int | None:
        """The seq of the run's newest event up to `cursor` (0: it has none), or None when that
        is not known without reading the run's own events (`cursor` is older than what was read
        since). The runs' newest events are read once, then only those after the cursor read up
        to last: at a new cursor, one query over the new events tells every run that changed, so
        the server's history of runs is not read again at each event."""
        known = self._last_changes
        if cursor > known.through:
            with known.lock:
                if cursor > known.through:
                    rows = self._query(
                        "SELECT run_id, MAX(seq) FROM events"
                        " WHERE seq > ? AND seq <= ? GROUP BY run_id",
                        (known.through, cursor),
                    )
                    for key, seq in rows:
                        if key is not None:
                            known.seqs[str(key)] = int(str(seq))
                    known.through = cursor
        seq = known.seqs.get(run_id, 0)
        return seq if seq <= cursor else None

    def runs_snapshot(
        self, run_id: str | None = None, cursor: int | None = None
    ) -> list[RunRecord]:
        """The run (`[]` if there is none), or every run, as `runs` returns them, but parsed
        again only when its stored JSON changed (a run carries its shared context, the files'
        contents included), and not even read while no event was recorded since (creating a run
        appends one in the same transaction). `cursor`: the caller's `cursor()`, read just
        before (saves reading it again). The records are shared between calls: read them,
        never mutate them."""
        if cursor is None:
            cursor = self.cursor()  # before the rows: a change committed after it moves it
        last = self._run_snapshots.get(run_id)
        if last is not None and last[0] == cursor:
            return list(last[1])
        # Runs are only ever added, never changed or removed: a run's snapshot stands once the
        # run is there, and every run's while no row was added.
        if last is not None and run_id is not None and last[1]:
            return list(last[1])
        newest = None
        if run_id is None:
            newest = self._query("SELECT MAX(rowid) FROM runs")[0][0]
            if last is not None and self._all_runs_rowid == (newest, last[0]):
                self._run_snapshots[None] = (cursor, last[1])
                self._all_runs_rowid = (newest, cursor)
                return list(last[1])
            rows = self._query("SELECT run_id, data FROM runs ORDER BY created_at, rowid")
        else:
            rows = self._query("SELECT run_id, data FROM runs WHERE run_id = ?", (run_id,))
        records: list[RunRecord] = []
        for key, data in rows:
            found, text = str(key), str(data)
            cached = _reparsed(self._parsed_runs.get(found), text, RunRecord)
            self._parsed_runs[found] = cached
            records.append(cached[1])
        self._run_snapshots[run_id] = (cursor, records)
        if run_id is None:
            self._all_runs_rowid = (newest, cursor)
        return list(records)

    def _agents_changed_since(
        self, run_id: str, seen: int, before: dict[str, tuple[str, AgentRecord]]
    ) -> dict[str, tuple[str, AgentRecord]] | None:
        """`before` (the run's rows as of the cursor `seen`) with the rows of the agents that
        have an event after `seen` read again: every change of an agent's row appends an event
        in the same transaction, and every event up to `seen` was committed when it was read,
        so no other row changed. A poll of a large run then reads the one or two rows that
        changed, not all of them, at each new cursor. None when many changed: read them all."""
        changed = [
            str(r[0])
            for r in self._query(
                "SELECT DISTINCT agent_id FROM events"
                " WHERE run_id = ? AND seq > ? AND agent_id IS NOT NULL",
                (run_id, seen),
            )
        ]
        if len(changed) > min(max(_SNAPSHOT_ROWS_READ, len(before) // 2), _SQL_VARIABLES):
            return None
        now = dict(before)
        if not changed:
            return now
        marks = ", ".join("?" * len(changed))
        rows = self._query(
            f"SELECT agent_id, data FROM agents WHERE agent_id IN ({marks}) AND run_id = ?",
            (*changed, run_id),
        )
        added = False
        for agent_id, data in rows:
            key = str(agent_id)
            cached = now.get(key)
            added = added or cached is None
            now[key] = _reparsed(cached, str(data), AgentRecord)
        if added:  # in the order of `ORDER BY ord`, as a whole read gives it
            now = dict(sorted(now.items(), key=lambda item: item[1][1].index))
        return now

    def agents_snapshot(self, run_id: str, cursor: int | None = None) -> list[AgentRecord]:
        """The run's agents, as `agents` returns them, but reading again only the rows of the
        agents with an event since the previous call for this run (`_agents_changed_since`),
        and re-parsing only those whose stored JSON changed; when no event at all was recorded
        since (every change of an agent appends one, in the same transaction), no row is read.
        `cursor` as for `runs_snapshot`. The records are shared between calls: read them,
        never mutate them (changes go through `apply`)."""
        return list(self._agents_snapshot(run_id, cursor))

    def _agents_snapshot(self, run_id: str, cursor: int | None) -> list[AgentRecord]:
        """`agents_snapshot`'s list itself, not a copy of it: kept from cursor to cursor while
        the run has no event."""
        if cursor is None:
            cursor = self.cursor()  # before the rows: a change committed after it moves it
        last = self._snapshots.get(run_id)
        if last is not None and last[0] == cursor:
            return last[1]
        if last is not None and last[0] < cursor:
            newest = self.last_change(run_id, cursor)
            if newest is not None and newest <= last[0]:
                # no event of the run since: no row of it changed (see `_agents_changed_since`)
                self._snapshots[run_id] = (cursor, last[1])
                return last[1]
        before = self._parsed_agents.get(run_id, {})
        now = self._agents_changed_since(run_id, last[0], before) if last is not None else None
        if now is None:
            rows = self._query(
                "SELECT agent_id, data FROM agents WHERE run_id = ? ORDER BY ord", (run_id,)
            )
            now = {
                str(key): _reparsed(before.get(str(key)), str(data), AgentRecord)
                for key, data in rows
            }
        self._parsed_agents[run_id] = now
        records = [record for _, record in now.values()]
        self._snapshots[run_id] = (cursor, records)
        return records
