"""The lease vocabulary and its cross-process store (SQLite WAL, writes serialized by an flock).

`LeaseStore` is the synchronous core: every read-modify-write runs in one `BEGIN IMMEDIATE`
transaction taken while holding an exclusive flock on `<state_dir>/leases.lock`, so processes
queue on the kernel lock (prompt, FIFO-ish) instead of SQLite's sleeping busy handler. Reads that
decide nothing (`check`, `table`, `blockers`, `lost`, `waiters`) run without the flock on a WAL
snapshot. Time comes from the injected `clock`, so expiry and lock-delay are testable.

Tables: `leases` (one row per held resource, indexed by `(kind, resource)`; a row blocks others
until `blocks_until` = expiry + lock-delay), `grants` (one row per grant: its holder, token, expiry,
whether it was broken; expired and broken grants stay as a bounded record of lost grants), `waiters`
and `waiter_requests` (the FIFO queue of blocked acquisitions, each row kept alive by its waiter's
heartbeat), and `meta` (the fencing-token counter).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, model_validator

from toolbus.errors import LeaseLost, LeaseNotHeld, LeaseSelfConflict
from toolbus.resources import is_within, normalize_path

DEFAULT_TTL_S = 30.0
DEFAULT_LOCK_DELAY_S = 5.0
MAX_TTL_S = 3600.0
MAX_LOCK_DELAY_S = 300.0
DEFAULT_WAITER_TTL_S = 5.0
LOST_GRANTS_KEPT = 1000
SWEEP_INTERVAL_S = 1.0
MAX_NAME_LENGTH = 256
SCHEMA_VERSION = 1

ResourceKind = Literal["path", "named"]
LostReason = Literal["expired", "broken"]


class LeaseMode(StrEnum):
    """Read leases are shared; a write lease is exclusive over what it covers."""

    READ = "read"
    WRITE = "write"


class LeaseRequest(BaseModel):
    """One resource and mode to lease; a path is normalised, `""` is the whole repository."""

    model_config = ConfigDict(frozen=True)

    resource: str
    mode: LeaseMode
    kind: ResourceKind = "path"

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = dict(cast(dict[str, Any], data))
        resource = fields.get("resource")
        if isinstance(resource, str):
            if fields.get("kind", "path") == "named":
                fields["resource"] = _check_name(resource)
            else:
                fields["resource"] = normalize_path(resource)
        return fields

    @classmethod
    def read(cls, path: str) -> LeaseRequest:
        return cls(resource=path, mode=LeaseMode.READ)

    @classmethod
    def write(cls, path: str) -> LeaseRequest:
        return cls(resource=path, mode=LeaseMode.WRITE)

    @classmethod
    def named(cls, name: str, mode: LeaseMode = LeaseMode.WRITE) -> LeaseRequest:
        return cls(resource=name, mode=mode, kind="named")

    def describe(self) -> str:
        if self.kind == "named":
            return f"{self.mode} {self.resource}"
        return f"{self.mode} {self.resource + '/' if self.resource else '/'}"


def _check_name(name: str) -> str:
    text = name.strip()
    if not text or "\x00" in text or len(text) > MAX_NAME_LENGTH:
        raise ValueError(
            f"a named resource is 1 to {MAX_NAME_LENGTH} characters without NUL, got {name!r}"
        )
    return text


def _conflicts(a: tuple[str, str, str], b: tuple[str, str, str]) -> bool:
    """The rule on `(kind, resource, mode)` triples; `conflicts` and the store both use it."""
    (kind_a, resource_a, mode_a), (kind_b, resource_b, mode_b) = a, b
    if kind_a != kind_b or (mode_a == LeaseMode.READ and mode_b == LeaseMode.READ):
        return False
    if kind_a == "named" or resource_a == resource_b:
        return resource_a == resource_b
    if is_within(resource_b, resource_a):  # a is the ancestor: it must be the write
        return mode_a == LeaseMode.WRITE
    if is_within(resource_a, resource_b):
        return mode_b == LeaseMode.WRITE
    return False


def conflicts(a: LeaseRequest, b: LeaseRequest) -> bool:
    """The conflict rule: overlapping leases conflict when both write or the write is above.

    Named resources conflict only with the same name; reads never conflict with reads; a read
    on an ancestor does not block a write below it, a write on an ancestor blocks everything below.
    """
    return _conflicts((a.kind, a.resource, a.mode), (b.kind, b.resource, b.mode))


class Lease(BaseModel):
    """A lease row: who holds what, under which grant (token), until when."""

    model_config = ConfigDict(frozen=True)

    holder: str
    token: int
    resource: str
    mode: LeaseMode
    kind: ResourceKind = "path"
    expires_at: float

    @property
    def request(self) -> LeaseRequest:
        return LeaseRequest.model_construct(resource=self.resource, mode=self.mode, kind=self.kind)


class LeaseGrant(BaseModel):
    """An atomic set of leases held under one fencing token until `expires_at` (unless renewed)."""

    model_config = ConfigDict(frozen=True)

    holder: str
    token: int
    leases: tuple[LeaseRequest, ...]
    expires_at: float


class LostGrant(BaseModel):
    """A grant its holder lost: it expired unrenewed or was broken by an admin."""

    model_config = ConfigDict(frozen=True)

    holder: str
    token: int
    leases: tuple[LeaseRequest, ...]
    expires_at: float
    reason: LostReason
    lost_at: float


class Waiter(BaseModel):
    """A queued acquisition: later conflicting requests wait behind it (FIFO fairness)."""

    model_config = ConfigDict(frozen=True)

    id: int
    holder: str
    expires_at: float


class Blockers(BaseModel):
    """What stands between a request set and its grant right now."""

    model_config = ConfigDict(frozen=True)

    leases: tuple[Lease, ...] = ()
    waiters: tuple[Waiter, ...] = ()
    own: tuple[Lease, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.leases and not self.waiters

    def describe(self, now: float) -> str:
        parts: list[str] = []
        for lease in self.leases:
            if lease.expires_at > now:
                state = f"expires in {lease.expires_at - now:.1f} s unless renewed"
            else:
                state = "lost by its holder, in lock-delay"
            parts.append(
                f"{lease.holder} holds {lease.request.describe()} (token {lease.token}, {state})"
            )
        parts.extend(f"{w.holder} is queued earlier (waiter {w.id})" for w in self.waiters)
        return "; ".join(parts) if parts else "nothing (it became free)"


def normalise_requests(requests: Iterable[LeaseRequest]) -> tuple[LeaseRequest, ...]:
    """One request per resource (a write absorbs a read of the same resource), in a stable order."""
    strongest: dict[tuple[str, str], LeaseRequest] = {}
    for request in requests:
        key = (request.kind, request.resource)
        seen = strongest.get(key)
        if seen is None or (seen.mode == LeaseMode.READ and request.mode == LeaseMode.WRITE):
            strongest[key] = request
    return tuple(strongest[key] for key in sorted(strongest))


def ancestors(path: str) -> list[str]:
    """`path` and every component-wise ancestor of it, the root `""` included."""
    if path == "":
        return [""]
    parts = path.split("/")
    return ["", *("/".join(parts[: i + 1]) for i in range(len(parts)))]


def earlier_conflicts(request_sets: Sequence[Sequence[LeaseRequest]]) -> list[list[int]]:
    """For each set of requests, the indices of the earlier sets it conflicts with (`conflicts`),
    ascending. A request meets only the earlier requests on its own resource, its ancestors and,
    through a range of a sorted list, the resources below it: it never compares all pairs (a
    run of many agents, each with many paths, would make that quadratic twice over)."""
    flat: list[tuple[int, LeaseRequest]] = []  # (set index, request) of the sets seen so far
    at: dict[tuple[str, str], list[int]] = {}  # (kind, resource) -> indices into `flat`
    ordered: dict[str, list[tuple[str, int]]] = {}  # a path kind's (resource, index), sorted
    out: list[list[int]] = []
    for i, requests in enumerate(request_sets):
        met: list[tuple[int, LeaseRequest]] = []  # (index into `flat`, the request met)
        for request in requests:
            kind, resource = request.kind, request.resource
            names = [resource] if kind == "named" else ancestors(resource)
            met += [(n, request) for name in names for n in at.get((kind, name), ())]
            if kind == "named":
                continue
            entries = ordered.get(kind, [])
            if resource:  # "a/b/…" sorts from "a/b/" to before "a/b0" ("0" follows "/")
                lo = bisect.bisect_left(entries, (resource + "/", -1))
                hi = bisect.bisect_left(entries, (resource + "0", -1))
                met += [(n, request) for _, n in entries[lo:hi]]
            else:  # the whole repository is above every other path
                met += [(n, request) for below, n in entries if below]
        out.append(sorted({flat[n][0] for n, request in met if conflicts(request, flat[n][1])}))
        for request in requests:
            n = len(flat)
            flat.append((i, request))
            at.setdefault((request.kind, request.resource), []).append(n)
            if request.kind != "named":
                bisect.insort(ordered.setdefault(request.kind, []), (request.resource, n))
    return out


def _describe_requests(requests: Sequence[LeaseRequest]) -> str:
    return ", ".join(r.describe() for r in requests) or "nothing"


def _requests_from_json(text: str) -> tuple[LeaseRequest, ...]:
    rows = cast(list[list[str]], json.loads(text))
    return tuple(
        LeaseRequest.model_construct(kind=cast(ResourceKind, k), resource=r, mode=LeaseMode(m))
        for k, r, m in rows
    )


class _FileLock:
    """An exclusive advisory lock on a file, held across processes (flock on POSIX)."""

    def __init__(self, path: Path) -> None:
        if sys.platform == "win32":  # pragma: no cover - the project targets POSIX
            from filelock import FileLock

            self._filelock = FileLock(str(path))
        else:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def acquire(self) -> None:
        if sys.platform == "win32":  # pragma: no cover
            self._filelock.acquire()
        else:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if sys.platform == "win32":  # pragma: no cover
            self._filelock.release()
        else:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if sys.platform != "win32":
            os.close(self._fd)


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS grants (
        token INTEGER PRIMARY KEY, holder TEXT NOT NULL, acquired_at REAL NOT NULL,
        expires_at REAL NOT NULL, broken_at REAL, leases TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS grants_by_holder ON grants (holder)",
    """CREATE TABLE IF NOT EXISTS leases (
        token INTEGER NOT NULL, kind TEXT NOT NULL, resource TEXT NOT NULL, mode TEXT NOT NULL,
        holder TEXT NOT NULL, expires_at REAL NOT NULL, blocks_until REAL NOT NULL,
        PRIMARY KEY (token, kind, resource)) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS leases_by_resource ON leases (kind, resource)",
    """CREATE TABLE IF NOT EXISTS waiters (
        id INTEGER PRIMARY KEY AUTOINCREMENT, holder TEXT NOT NULL, expires_at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS waiter_requests (
        waiter_id INTEGER NOT NULL, kind TEXT NOT NULL, resource TEXT NOT NULL,
        mode TEXT NOT NULL, PRIMARY KEY (waiter_id, kind, resource)) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS waiter_requests_by_resource ON waiter_requests (kind, resource)",
    "INSERT OR IGNORE INTO meta (key, value) VALUES ('token', 0)",
    f"INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', {SCHEMA_VERSION})",
)

_LEASE_COLUMNS = "holder, token, resource, mode, kind, expires_at"


def _lease(row: Any) -> Lease:
    return Lease.model_construct(
        holder=row[0],
        token=row[1],
        resource=row[2],
        mode=LeaseMode(row[3]),
        kind=row[4],
        expires_at=row[5],
    )


def _overlap_clauses(request: LeaseRequest, column: str) -> list[tuple[str, list[Any]]]:
    """SQL terms selecting the rows that may conflict with `request`, each one index search.

    The rule decides; these terms only narrow the rows it sees without a table scan (and without
    reading compatible readers): writes on the path or above it (exact matches of its ancestors),
    and for a write request anything on the path and below it (the range
    `[path + '/', path + '0')`, '0' following '/'; `> ''` below the root). The caller joins the
    terms with UNION ALL: SQLite would not use the index for an OR of them.
    """
    kind, resource = f"{column}.kind", f"{column}.resource"
    writes = f"{column}.mode = 'write'"
    if request.kind == "named":
        clause = f"{kind} = 'named' AND {resource} = ?"
        if request.mode == LeaseMode.READ:
            clause += f" AND {writes}"
        return [(clause, [request.resource])]
    if request.mode == LeaseMode.READ:
        above = ancestors(request.resource)
        marks = ", ".join("?" * len(above))
        return [(f"{kind} = 'path' AND {resource} IN ({marks}) AND {writes}", list[Any](above))]
    terms: list[tuple[str, list[Any]]] = []
    above = ancestors(request.resource)[:-1]
    if above:
        marks = ", ".join("?" * len(above))
        terms.append(
            (f"{kind} = 'path' AND {resource} IN ({marks}) AND {writes}", list[Any](above))
        )
    terms.append((f"{kind} = 'path' AND {resource} = ?", [request.resource]))
    if request.resource == "":
        terms.append((f"{kind} = 'path' AND {resource} > ''", []))
    else:
        terms.append(
            (
                f"{kind} = 'path' AND {resource} >= ? AND {resource} < ?",
                [request.resource + "/", request.resource + "0"],
            )
        )
    return terms


def _union(
    select: str, where: tuple[str, Sequence[Any]], request: LeaseRequest, column: str
) -> tuple[str, list[Any]]:
    """`select WHERE where AND <term>` for each overlap term, joined by UNION ALL."""
    parts: list[str] = []
    params: list[Any] = []
    condition, condition_params = where
    for clause, clause_params in _overlap_clauses(request, column):
        parts.append(f"{select} WHERE {condition} AND {clause}")
        params.extend(condition_params)
        params.extend(clause_params)
    return " UNION ALL ".join(parts), params


class LeaseStore:
    """The cross-process lease table at `<state_dir>/leases.db`; synchronous and thread-safe.

    One SQLite connection per store, guarded by a threading lock; every read-modify-write takes
    the flock then `BEGIN IMMEDIATE`. A grant's leases are lost to its holder at `expires_at`
    and block others until `expires_at + lock_delay_s` (the grace for a stale holder's write that
    passed its fence check just before the expiry).
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        ttl_s: float = DEFAULT_TTL_S,
        lock_delay_s: float = DEFAULT_LOCK_DELAY_S,
        clock: Callable[[], float] = time.time,
        waiter_ttl_s: float = DEFAULT_WAITER_TTL_S,
    ) -> None:
        if not 0 < ttl_s <= MAX_TTL_S:
            raise ValueError(f"ttl_s must be in (0, {MAX_TTL_S}], got {ttl_s}")
        if not 0 <= lock_delay_s <= MAX_LOCK_DELAY_S:
            raise ValueError(f"lock_delay_s must be in [0, {MAX_LOCK_DELAY_S}], got {lock_delay_s}")
        if not 0 < waiter_ttl_s <= MAX_TTL_S:
            raise ValueError(f"waiter_ttl_s must be in (0, {MAX_TTL_S}], got {waiter_ttl_s}")
        self.ttl_s = ttl_s
        self.lock_delay_s = lock_delay_s
        self.waiter_ttl_s = waiter_ttl_s
        self.clock = clock
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.state_dir / "leases.db"
        self._mutex = threading.Lock()
        self._flock = _FileLock(self.state_dir / "leases.lock")
        self._conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        self._next_sweep = -float("inf")
        with self._mutex:
            self._flock.acquire()
            try:
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=NORMAL")
                self._conn.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA:
                    self._conn.execute(statement)
                self._conn.execute("COMMIT")
            finally:
                self._flock.release()

    def close(self) -> None:
        with self._mutex:
            self._conn.close()
            self._flock.close()

    def __enter__(self) -> LeaseStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Generator[tuple[sqlite3.Connection, float]]:
        """One serialized read-modify-write: flock, then BEGIN IMMEDIATE; `now` read inside."""
        with self._mutex:
            self._flock.acquire()
            try:
                conn = self._conn
                conn.execute("BEGIN IMMEDIATE")
                try:
                    now = self.clock()
                    if now >= self._next_sweep:
                        self._sweep(conn, now)
                    yield conn, now
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            finally:
                self._flock.release()

    def _sweep(self, conn: sqlite3.Connection, now: float) -> None:
        """Reclaim rows that no longer block anyone; keep the newest lost grants as a record."""
        self._next_sweep = now + SWEEP_INTERVAL_S
        conn.execute("DELETE FROM leases WHERE blocks_until <= ?", (now,))
        conn.execute(
            "DELETE FROM waiter_requests WHERE waiter_id IN "
            "(SELECT id FROM waiters WHERE expires_at <= ?)",
            (now,),
        )
        conn.execute("DELETE FROM waiters WHERE expires_at <= ?", (now,))
        conn.execute(
            "DELETE FROM grants WHERE token IN (SELECT token FROM grants "
            "WHERE broken_at IS NOT NULL OR expires_at <= ? "
            f"ORDER BY token DESC LIMIT -1 OFFSET {LOST_GRANTS_KEPT})",
            (now,),
        )

    # -- conflict detection --------------------------------------------------------------------

    def _blockers(
        self,
        conn: sqlite3.Connection,
        requests: Sequence[LeaseRequest],
        now: float,
        holder: str | None,
        before_waiter: int | None,
    ) -> Blockers:
        leases: dict[tuple[int, str, str], Lease] = {}
        own: dict[tuple[int, str, str], Lease] = {}
        queue_limit = before_waiter if before_waiter is not None else sys.maxsize
        queued = conn.execute(
            "SELECT 1 FROM waiters WHERE id < ? AND expires_at > ? LIMIT 1", (queue_limit, now)
        ).fetchone()
        waiters: dict[int, Waiter] = {}
        for request in requests:
            wanted = (request.kind, request.resource, request.mode.value)
            sql, params = _union(
                f"SELECT {_LEASE_COLUMNS} FROM leases AS l",
                ("l.blocks_until > ?", [now]),
                request,
                "l",
            )
            rows = conn.execute(sql, params).fetchall()
            for row in rows:
                if _conflicts(wanted, (row[4], row[2], row[3])):
                    lease = _lease(row)
                    key = (lease.token, lease.kind, lease.resource)
                    if lease.holder == holder and lease.expires_at > now:
                        own[key] = lease
                    leases[key] = lease
            if queued is None:
                continue
            sql, params = _union(
                "SELECT w.id, w.holder, w.expires_at, r.kind, r.resource, r.mode "
                "FROM waiter_requests AS r JOIN waiters AS w ON w.id = r.waiter_id",
                ("w.id < ? AND w.expires_at > ?", [queue_limit, now]),
                request,
                "r",
            )
            rows = conn.execute(sql, params).fetchall()
            for row in rows:
                if _conflicts(wanted, (row[3], row[4], row[5])):
                    waiters[row[0]] = Waiter(id=row[0], holder=row[1], expires_at=row[2])
        if waiters and holder is not None:
            self._drop_waiters_blocked_by(conn, waiters, holder, now)
        return Blockers(
            leases=tuple(leases[k] for k in sorted(leases)),
            waiters=tuple(waiters[k] for k in sorted(waiters)),
            own=tuple(own[k] for k in sorted(own)),
        )

    @staticmethod
    def _drop_waiters_blocked_by(
        conn: sqlite3.Connection, waiters: dict[int, Waiter], holder: str, now: float
    ) -> None:
        """Forget queued waiters that wait for `holder`'s own live leases.

        A holder that asks for more while holding a grant must not queue behind a waiter that is
        itself waiting for that grant: each would wait for the other until a timeout. Such a
        holder goes ahead of those waiters (they were blocked by it anyway).
        """
        held = conn.execute(
            "SELECT kind, resource, mode FROM leases WHERE holder = ? AND expires_at > ?",
            (holder, now),
        ).fetchall()
        if not held:
            return
        for waiter_id in list(waiters):
            wanted = conn.execute(
                "SELECT kind, resource, mode FROM waiter_requests WHERE waiter_id = ?",
                (waiter_id,),
            ).fetchall()
            if any(_conflicts(tuple(w), tuple(h)) for w in wanted for h in held):
                del waiters[waiter_id]

    def blockers(
        self,
        requests: Iterable[LeaseRequest],
        *,
        holder: str | None = None,
        before_waiter: int | None = None,
    ) -> Blockers:
        """The leases (live or in lock-delay) and earlier waiters that block these requests now.

        `before_waiter`: count only waiters queued before this one (a waiter's own view);
        by default every live waiter counts, as for a newcomer. Read-only: no flock.
        """
        normal = normalise_requests(requests)
        with self._mutex:
            return self._blockers(self._conn, normal, self.clock(), holder, before_waiter)

    # -- acquisition ---------------------------------------------------------------------------

    def try_acquire(
        self, holder: str, requests: Iterable[LeaseRequest], *, waiter_id: int | None = None
    ) -> LeaseGrant | None:
        """Grant the whole set at once under a new token, or nothing (`None`) when blocked.

        Blocked means: a conflicting lease that is live or in lock-delay, or a conflicting earlier
        live waiter (all waiters for a newcomer; those before `waiter_id` for a queued waiter).
        Raises `LeaseSelfConflict` at once when a conflicting lease is the holder's own live lease:
        there is no in-place upgrade, and waiting for oneself would never end.
        """
        normal = normalise_requests(requests)
        with self._transaction() as (conn, now):
            blockers = self._blockers(conn, normal, now, holder, waiter_id)
            if blockers.own:
                raise LeaseSelfConflict(_self_conflict_message(holder, normal, blockers.own))
            if not blockers.empty:
                if waiter_id is not None:
                    self._refresh_waiter(conn, now, waiter_id, holder, normal)
                return None
            grant = self._insert_grant(conn, now, holder, normal)
            if waiter_id is not None:
                self._delete_waiter(conn, waiter_id)
        return grant

    def retake(
        self, holder: str, token: int, requests: Iterable[LeaseRequest]
    ) -> LeaseGrant | None:
        """Take again, under a new token, the paths of `holder`'s grant `token` that lapsed
        (expired unrenewed, not broken): what a server does that takes over a dead server's agent.

        The lapsed grant's lock-delay blocks others, not its own holder: the late writes it
        guards against are that holder's own. Every other lease blocks as in `try_acquire`, and so
        do earlier waiters once the lapsed grant no longer blocks (until then they queue behind
        it). A grant still live is returned as it is. `None` when blocked.
        """
        normal = normalise_requests(requests)
        with self._transaction() as (conn, now):
            row: tuple[str, float, float | None, str] | None = conn.execute(
                "SELECT holder, expires_at, broken_at, leases FROM grants WHERE token = ?",
                (token,),
            ).fetchone()
            mine = row is not None and row[0] == holder and row[2] is None
            if row is not None and mine and row[1] > now:
                return LeaseGrant(
                    holder=holder,
                    token=token,
                    leases=_requests_from_json(row[3]),
                    expires_at=row[1],
                )
            blockers = self._blockers(conn, normal, now, holder, None)
            if blockers.own:
                raise LeaseSelfConflict(_self_conflict_message(holder, normal, blockers.own))
            others = [lease for lease in blockers.leases if not (mine and lease.token == token)]
            behind_lapsed = len(others) < len(blockers.leases)
            if others or (blockers.waiters and not behind_lapsed):
                return None
            conn.execute("DELETE FROM leases WHERE token = ?", (token,))
            return self._insert_grant(conn, now, holder, normal)

    def _insert_grant(
        self, conn: sqlite3.Connection, now: float, holder: str, normal: Sequence[LeaseRequest]
    ) -> LeaseGrant:
        (token,) = conn.execute(
            "UPDATE meta SET value = value + 1 WHERE key = 'token' RETURNING value"
        ).fetchone()
        expires_at = now + self.ttl_s
        conn.execute(
            "INSERT INTO grants (token, holder, acquired_at, expires_at, broken_at, leases) "
            "VALUES (?, ?, ?, ?, NULL, ?)",
            (
                token,
                holder,
                now,
                expires_at,
                json.dumps([[r.kind, r.resource, str(r.mode)] for r in normal]),
            ),
        )
        conn.executemany(
            "INSERT INTO leases (token, kind, resource, mode, holder, expires_at, blocks_until)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    token,
                    r.kind,
                    r.resource,
                    str(r.mode),
                    holder,
                    expires_at,
                    expires_at + self.lock_delay_s,
                )
                for r in normal
            ],
        )
        return LeaseGrant.model_construct(
            holder=holder, token=int(token), leases=tuple(normal), expires_at=expires_at
        )

    def enqueue(self, holder: str, requests: Iterable[LeaseRequest]) -> int:
        """Queue a blocked request set (FIFO); returns the waiter id to retry and dequeue with."""
        normal = normalise_requests(requests)
        with self._transaction() as (conn, now):
            (waiter_id,) = conn.execute(
                "INSERT INTO waiters (holder, expires_at) VALUES (?, ?) RETURNING id",
                (holder, now + self.waiter_ttl_s),
            ).fetchone()
            self._insert_waiter_requests(conn, int(waiter_id), normal)
        return int(waiter_id)

    def keep_waiting(self, waiter_id: int, holder: str, requests: Iterable[LeaseRequest]) -> None:
        """The waiter's heartbeat: extend its row (re-creating it, same place, if it was swept)."""
        normal = normalise_requests(requests)
        with self._transaction() as (conn, now):
            self._refresh_waiter(conn, now, waiter_id, holder, normal)

    def dequeue(self, waiter_id: int) -> None:
        """Leave the queue (granted, timed out or cancelled); a missing row is fine."""
        with self._transaction() as (conn, _now):
            self._delete_waiter(conn, waiter_id)

    def waiters(self) -> list[Waiter]:
        """The live waiter rows, oldest first."""
        with self._mutex:
            rows = self._conn.execute(
                "SELECT id, holder, expires_at FROM waiters WHERE expires_at > ? ORDER BY id",
                (self.clock(),),
            ).fetchall()
        return [Waiter(id=r[0], holder=r[1], expires_at=r[2]) for r in rows]

    def _refresh_waiter(
        self,
        conn: sqlite3.Connection,
        now: float,
        waiter_id: int,
        holder: str,
        requests: Sequence[LeaseRequest],
    ) -> None:
        updated = conn.execute(
            "UPDATE waiters SET expires_at = ? WHERE id = ?", (now + self.waiter_ttl_s, waiter_id)
        ).rowcount
        if updated == 0:
            conn.execute(
                "INSERT INTO waiters (id, holder, expires_at) VALUES (?, ?, ?)",
                (waiter_id, holder, now + self.waiter_ttl_s),
            )
            conn.execute("DELETE FROM waiter_requests WHERE waiter_id = ?", (waiter_id,))
            self._insert_waiter_requests(conn, waiter_id, requests)

    @staticmethod
    def _insert_waiter_requests(
        conn: sqlite3.Connection, waiter_id: int, requests: Sequence[LeaseRequest]
    ) -> None:
        conn.executemany(
            "INSERT INTO waiter_requests (waiter_id, kind, resource, mode) VALUES (?, ?, ?, ?)",
            [(waiter_id, r.kind, r.resource, str(r.mode)) for r in requests],
        )

    @staticmethod
    def _delete_waiter(conn: sqlite3.Connection, waiter_id: int) -> None:
        conn.execute("DELETE FROM waiter_requests WHERE waiter_id = ?", (waiter_id,))
        conn.execute("DELETE FROM waiters WHERE id = ?", (waiter_id,))

    # -- holding -------------------------------------------------------------------------------

    def renew(self, grant: LeaseGrant) -> LeaseGrant:
        """Extend a live grant by `ttl_s` from now, same token.

        Raises `LeaseLost` when the grant expired or was broken (renewal never resurrects),
        `LeaseNotHeld` when the holder has no such grant (never granted, or released).
        """
        with self._transaction() as (conn, now):
            row = conn.execute(
                "SELECT holder, expires_at, broken_at FROM grants WHERE token = ?", (grant.token,)
            ).fetchone()
            if row is None or row[0] != grant.holder:
                raise LeaseNotHeld(_not_held_message(grant, "renew"))
            if row[2] is not None or row[1] <= now:
                raise LeaseLost(_lost_message(grant, row[1], row[2], now))
            expires_at = now + self.ttl_s
            conn.execute(
                "UPDATE grants SET expires_at = ? WHERE token = ?", (expires_at, grant.token)
            )
            conn.execute(
                "UPDATE leases SET expires_at = ?, blocks_until = ? WHERE token = ?",
                (expires_at, expires_at + self.lock_delay_s, grant.token),
            )
        return grant.model_copy(update={"expires_at": expires_at})

    def release(self, grant: LeaseGrant) -> None:
        """Give the grant's leases back at once.

        Raises `LeaseNotHeld` when the holder holds no such grant: never granted, already
        released, or lost (expired or broken: its rows are then cleared, since the holder says it
        has stopped, and the lost record stays visible in `lost()`).
        """
        with self._transaction() as (conn, now):
            released = conn.execute(
                "DELETE FROM grants WHERE token = ? AND holder = ? AND broken_at IS NULL "
                "AND expires_at > ?",
                (grant.token, grant.holder, now),
            ).rowcount
            if released:  # the common case: a live grant, two statements
                conn.execute("DELETE FROM leases WHERE token = ?", (grant.token,))
                return
            row = conn.execute(
                "SELECT holder, expires_at, broken_at FROM grants WHERE token = ?", (grant.token,)
            ).fetchone()
            if row is None or row[0] != grant.holder:
                problem = _not_held_message(grant, "release")
            else:
                conn.execute("DELETE FROM leases WHERE token = ?", (grant.token,))
                problem = "release refused: " + _lost_message(grant, row[1], row[2], now)
        raise LeaseNotHeld(problem)

    def check(
        self, holder: str, token: int, path: str | None, mode: LeaseMode = LeaseMode.WRITE
    ) -> None:
        """Raise `LeaseLost` unless `holder` holds live grant `token` covering `path` in `mode`.

        A path is covered when it lies within a path lease of the grant whose mode suffices (a
        write covers reads); `path=None` asks only that the grant be live. One indexed SELECT.
        """
        normal = None if path is None else normalize_path(path)
        with self._mutex:
            now = self.clock()
            if normal is None:
                row = self._conn.execute(
                    "SELECT 1 FROM grants WHERE token = ? AND holder = ? "
                    "AND broken_at IS NULL AND expires_at > ?",
                    (token, holder, now),
                ).fetchone()
            else:
                above = ancestors(normal)
                mode_clause = " AND l.mode = 'write'" if mode == LeaseMode.WRITE else ""
                row = self._conn.execute(
                    "SELECT 1 FROM grants AS g JOIN leases AS l ON l.token = g.token "
                    "WHERE g.token = ? AND g.holder = ? AND g.broken_at IS NULL "
                    "AND g.expires_at > ? AND l.kind = 'path' "
                    f"AND l.resource IN ({', '.join('?' * len(above))}){mode_clause} LIMIT 1",
                    (token, holder, now, *above),
                ).fetchone()
            if row is not None:
                return
            grant_row = self._conn.execute(
                "SELECT holder, expires_at, broken_at, leases FROM grants WHERE token = ?", (token,)
            ).fetchone()
        raise LeaseLost(_check_failure((holder, token), normal, mode, grant_row, now))

    # -- views and administration --------------------------------------------------------------

    def table(self) -> list[Lease]:
        """The live leases (held, unexpired, unbroken), by resource."""
        with self._mutex:
            rows = self._conn.execute(
                f"SELECT {_LEASE_COLUMNS} FROM leases WHERE expires_at > ? "
                "ORDER BY kind, resource, token",
                (self.clock(),),
            ).fetchall()
        return [_lease(row) for row in rows]

    def lost(self, holder: str | None = None) -> list[LostGrant]:
        """The recorded lost grants (expired or broken), of one holder or all, oldest first."""
        query = (
            "SELECT holder, token, leases, expires_at, broken_at FROM grants "
            "WHERE (broken_at IS NOT NULL OR expires_at <= ?)"
        )
        with self._mutex:
            now = self.clock()
            if holder is None:
                rows = self._conn.execute(query + " ORDER BY token", (now,)).fetchall()
            else:
                rows = self._conn.execute(
                    query + " AND holder = ? ORDER BY token", (now, holder)
                ).fetchall()
        return [
            LostGrant(
                holder=r[0],
                token=r[1],
                leases=_requests_from_json(r[2]),
                expires_at=r[3],
                reason="expired" if r[4] is None else "broken",
                lost_at=r[3] if r[4] is None else r[4],
            )
            for r in rows
        ]

    def break_holder(self, holder: str, *, immediate: bool = False) -> list[LeaseGrant]:
        """Break every live grant of `holder` now; returns the grants broken.

        They are lost to the holder at once (`check` and `renew` raise `LeaseLost`). Others may
        take them after `lock_delay_s` (as after an expiry: a write that passed its fence check
        just before the break still lands first), or at once with `immediate=True`.
        """
        with self._transaction() as (conn, now):
            rows = conn.execute(
                "SELECT token, leases FROM grants WHERE holder = ? AND broken_at IS NULL "
                "AND expires_at > ? ORDER BY token",
                (holder, now),
            ).fetchall()
            conn.execute(
                "UPDATE grants SET broken_at = ? WHERE holder = ? AND broken_at IS NULL "
                "AND expires_at > ?",
                (now, holder, now),
            )
            until = now if immediate else now + self.lock_delay_s
            conn.execute(
                "UPDATE leases SET expires_at = MIN(expires_at, ?), "
                "blocks_until = MIN(blocks_until, ?) WHERE holder = ?",
                (now, until, holder),
            )
        return [
            LeaseGrant(holder=holder, token=r[0], leases=_requests_from_json(r[1]), expires_at=now)
            for r in rows
        ]


def _self_conflict_message(
    holder: str, requests: Sequence[LeaseRequest], own: Sequence[Lease]
) -> str:
    held = ", ".join(f"{lease.request.describe()} (token {lease.token})" for lease in own)
    return (
        f"{holder} asks for {_describe_requests(requests)} but already holds {held}, which "
        "conflicts with it; leases are not upgraded in place and waiting for oneself would never "
        "end: release that grant first, then acquire the whole set at once"
    )


def _not_held_message(grant: LeaseGrant, action: str) -> str:
    return (
        f"{action} refused: {grant.holder} holds no grant with token {grant.token} "
        "(never granted to it, or already released)"
    )


def _lost_message(grant: LeaseGrant, expires_at: float, broken_at: float | None, now: float) -> str:
    what = f"grant {grant.token} of {grant.holder} ({_describe_requests(grant.leases)})"
    if broken_at is not None:
        return f"{what} was broken by an administrator {now - broken_at:.1f} s ago"
    return f"{what} expired {now - expires_at:.1f} s ago without renewal"


def _check_failure(
    who: tuple[str, int], path: str | None, mode: LeaseMode, grant_row: Any, now: float
) -> str:
    holder, token = who
    target = "the operation" if path is None else f"{mode} of {path or '/'}"
    if grant_row is None or grant_row[0] != holder:
        return f"{target} refused: {holder} holds no lease with token {token}; acquire one first"
    grant = LeaseGrant.model_construct(
        holder=holder, token=token, leases=_requests_from_json(grant_row[3]), expires_at=0.0
    )
    if grant_row[2] is not None or grant_row[1] <= now:
        return f"{target} refused: " + _lost_message(grant, grant_row[1], grant_row[2], now)
    return (
        f"{target} refused: grant {token} of {holder} covers only "
        f"{_describe_requests(grant.leases)}"
    )
