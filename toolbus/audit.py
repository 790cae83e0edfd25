"""The audit log: one record per bus call, in order, as JSON lines and in memory.

An agent's result (changed files, commands and exit codes) is built from these records, so every
call is recorded, refusals included. Arguments are kept only as a short brief, never whole file
contents.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

logger = logging.getLogger(__name__)

Outcome = Literal["ok", "refused", "error"]
MAX_BRIEF_CHARS = 300
MAX_COMMAND_CHARS = 2_000
MAX_DETAIL_CHARS = 2000
_APPEND_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


def append_text(path: Path, text: str, *, fsync: bool = False, parents: bool = False) -> None:
    """Append `text` to the file at `path` (made if missing) by one descriptor, no file object:
    the logs of every agent append a line at each step, and a Python file object costs more to
    build than the write. `fsync`: durable before this returns. `parents`: its directories are
    made if missing (only then: a log's directory exists at every write but its first)."""
    data = text.encode("utf-8")
    try:
        fd = os.open(path, _APPEND_FLAGS, 0o666)
    except FileNotFoundError:
        if not parents:
            raise
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, _APPEND_FLAGS, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


class AuditRecord(BaseModel):
    """One bus call: what was asked, what came of it, under which fencing token."""

    model_config = ConfigDict(frozen=True)

    seq: int
    ts: float
    """Unix time at the start of the call."""
    agent_id: str
    op: str
    args_brief: str
    outcome: Outcome
    detail: str | None = None
    error_type: str | None = None
    duration_ms: float
    token: int | None = None
    path: str | None = None
    command: str | None = None
    exit_code: int | None = None
    timed_out: bool | None = None
    bytes_written: int | None = None
    replacements: int | None = None
    reads: list[str] | None = None
    """Files whose contents the call showed besides `path` (a search's files with matches)."""
    permission: str | None = None
    """The permission policy's decision on a gated call: `allow (<rule>)`, `deny (<rule>)`,
    `ask (<rule>): allowed by <who>`, `ask (<rule>): refused by <who>`."""

    def paths_read(self) -> list[str]:
        """The files whose contents this call showed the agent."""
        if self.outcome != "ok":
            return []
        if self.op == "read_file":
            return [self.path] if self.path else []
        return list(self.reads or [])


def printable(text: str) -> str:
    """`text` with lone surrogates escaped, so it always encodes as UTF-8 (JSON, the log file)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def brief(text: str, limit: int = MAX_BRIEF_CHARS) -> str:
    """`text` cut to `limit` characters, saying how much was cut."""
    text = printable(text)
    if len(text) <= limit:
        return text
    return text[:limit] + f"…[+{len(text) - limit} chars]"


class AuditLog:
    """Append-only record of an agent's bus calls; `path=None` keeps them in memory only."""

    def __init__(self, path: Path | None, *, fsync: bool = False) -> None:
        self.path = path
        self._fsync = fsync
        self._records: list[AuditRecord] = []
        self._lock = threading.Lock()

    def touch(self) -> None:
        """Create the log file now (blocking; from a worker thread), so that the first record
        does not allocate it on the caller's thread."""
        if self.path is not None:
            append_text(self.path, "", parents=True)

    @classmethod
    def load(cls, path: Path, *, fsync: bool = False) -> AuditLog:
        """Reopen a log after a restart: records read back, a torn last line cut off."""
        log = cls(path, fsync=fsync)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return log
        good_end = 0
        position = 0
        for line in raw.splitlines(keepends=True):
            position += len(line)
            if not line.endswith(b"\n"):
                logger.warning("audit log %s: dropping a torn last line", path)
                break
            try:
                record = AuditRecord.model_validate(json.loads(line))
            except (ValueError, ValidationError):
                logger.warning("audit log %s: skipping an unreadable line", path)
                good_end = position
                continue
            log._records.append(record)
            good_end = position
        if good_end < len(raw):
            with path.open("r+b") as f:
                f.truncate(good_end)
        return log

    def append(
        self,
        *,
        agent_id: str,
        op: str,
        args_brief: str,
        outcome: Outcome,
        started: float,
        duration_ms: float,
        detail: str | None = None,
        error_type: str | None = None,
        token: int | None = None,
        path: str | None = None,
        command: str | None = None,
        exit_code: int | None = None,
        timed_out: bool | None = None,
        bytes_written: int | None = None,
        replacements: int | None = None,
        reads: list[str] | None = None,
        permission: str | None = None,
    ) -> AuditRecord:
        """Record one call (the sequence number is assigned here) and persist it."""
        with self._lock:
            record = AuditRecord(
                seq=(self._records[-1].seq + 1) if self._records else 1,
                ts=started,
                agent_id=agent_id,
                op=brief(op, MAX_DETAIL_CHARS),  # (the tool's name as the model sent it)
                args_brief=brief(args_brief),
                outcome=outcome,
                detail=None if detail is None else brief(detail, MAX_DETAIL_CHARS),
                error_type=error_type,
                duration_ms=round(duration_ms, 3),
                token=token,
                path=None if path is None else printable(path),
                command=None if command is None else brief(command, MAX_COMMAND_CHARS),
                exit_code=exit_code,
                timed_out=timed_out,
                bytes_written=bytes_written,
                replacements=replacements,
                reads=None if reads is None else [printable(p) for p in reads],
                permission=None if permission is None else brief(permission, MAX_DETAIL_CHARS),
            )
            if self.path is not None:
                line = record.model_dump_json(exclude_none=True) + "\n"
                append_text(self.path, line, fsync=self._fsync, parents=True)
            self._records.append(record)
            return record

    def adopt(self, records: list[AuditRecord]) -> None:
        """Add records made by another log (an agent's bus on another machine), as they came:
        the records of the agent with its own sequence numbers."""
        if not records:
            return
        with self._lock:
            if self.path is not None:
                lines = "".join(r.model_dump_json(exclude_none=True) + "\n" for r in records)
                append_text(self.path, lines, fsync=self._fsync, parents=True)
            self._records.extend(records)

    def records(self) -> list[AuditRecord]:
        """Every record so far, in order."""
        with self._lock:
            return list(self._records)

    def records_after(self, count: int) -> list[AuditRecord]:
        """The records after the first `count`, in order (a reader that keeps up reads only
        what is new)."""
        with self._lock:
            return self._records[count:]

    def __len__(self) -> int:
        return len(self._records)


def reads_of(path: Path) -> tuple[frozenset[str], bool]:
    """From an agent's audit log on disk, without changing it: the files whose contents the bus
    showed it, and whether it ran commands (which read what the bus does not see)."""
    reads: set[str] = set()
    ran = False
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return frozenset(), False
    for line in raw.splitlines():
        try:
            record = AuditRecord.model_validate(json.loads(line))
        except (ValueError, ValidationError):
            continue  # a torn or unreadable line: what it would say is not known
        reads.update(record.paths_read())
        ran = ran or record.op == "run_command"
    return frozenset(reads), ran


def now() -> float:
    """Wall-clock time for `AuditRecord.ts`."""
    return time.time()
