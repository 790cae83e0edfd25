"""The audit log: ordered, persisted as JSON lines, reloadable after a torn write."""

from __future__ import annotations

import json
from pathlib import Path

from toolbus.audit import AuditLog, brief


def _append(log: AuditLog, op: str, **extra: object) -> None:
    log.append(
        agent_id="a1",
        op=op,
        args_brief=str(extra.pop("args_brief", "path='x'")),
        outcome="ok",
        started=1.0,
        duration_ms=0.5,
        **extra,  # type: ignore[arg-type]
    )


def test_records_are_ordered_and_persisted(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "a1.jsonl"
    log = AuditLog(path)
    _append(log, "write_file", path="src/a.py", bytes_written=3, token=5)
    _append(log, "run_command", exit_code=2)
    assert [r.seq for r in log.records()] == [1, 2]
    lines = path.read_text().splitlines()
    assert [json.loads(line)["op"] for line in lines] == ["write_file", "run_command"]
    assert json.loads(lines[0])["token"] == 5


def test_load_after_restart_tolerates_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "a1.jsonl"
    log = AuditLog(path)
    _append(log, "read_file")
    _append(log, "write_file", path="b", bytes_written=1)
    with path.open("a") as f:
        f.write('{"seq": 3, "ts": 1.0, "agent_id": "a1", "op": "wri')  # crash mid-line
    reloaded = AuditLog.load(path)
    assert [r.op for r in reloaded.records()] == ["read_file", "write_file"]
    _append(reloaded, "edit_file")
    again = AuditLog.load(path)
    assert [(r.seq, r.op) for r in again.records()] == [
        (1, "read_file"),
        (2, "write_file"),
        (3, "edit_file"),
    ]


def test_load_missing_file_is_empty(tmp_path: Path) -> None:
    assert AuditLog.load(tmp_path / "none.jsonl").records() == []


def test_memory_only_and_brief(tmp_path: Path) -> None:
    log = AuditLog(None)
    _append(log, "write_file", args_brief="x" * 1000)
    (record,) = log.records()
    assert len(record.args_brief) < 400 and record.args_brief.endswith("[+700 chars]")
    assert brief("short") == "short"
