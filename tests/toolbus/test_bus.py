"""The agent bus: validation, dispatch, refusals as outcomes, complete audit, the write lock."""

from __future__ import annotations

import gc
import threading
import weakref
from pathlib import Path

import anyio
import pytest

from toolbus.audit import AuditLog
from toolbus.bus import SUBAGENT_TOOL_SPECS, AgentBus, FileLimits
from toolbus.errors import LeaseLost
from toolbus.fileops import QUICK_FILE_BYTES
from toolbus.resources import WriteScope
from toolbus.terminal import SandboxMode, Terminal, TerminalConfig

pytestmark = pytest.mark.anyio


class RevocableFence:
    """A real fence: passes until revoked; can signal when a check happens."""

    def __init__(self, token: int | None = 11) -> None:
        self._token = token
        self.revoked = False
        self.checked: list[str | None] = []
        self.command_checked = anyio.Event()
        self.broken = False

    @property
    def token(self) -> int | None:
        return self._token

    def check(self, path: str | None) -> None:
        self.checked.append(path)
        if self.broken:
            raise RuntimeError("fence store unreachable")
        if path is None:
            self.command_checked.set()
        if self.revoked:
            raise LeaseLost(f"lease with token {self._token} was lost; finish without writing")


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    (root / "src").mkdir(parents=True)
    (root / "src" / "a.py").write_text("def alpha():\n    return 1\n")
    (root / "docs").mkdir()
    (root / "docs" / "x.md").write_text("doc\n")
    return root


def make_bus(
    ws: Path,
    fence: RevocableFence | None = None,
    scope: tuple[str, ...] | None = ("src",),
    *,
    quick_files: bool = False,
) -> AgentBus:
    return AgentBus(
        quick_files=quick_files,
        agent_id="agent-1",
        workspace=ws,
        write_scope=WriteScope.of(scope),
        fence=fence or RevocableFence(),
        audit=AuditLog(ws.parent / "audit" / "agent-1.jsonl"),
        terminal=Terminal(ws, TerminalConfig(sandbox=SandboxMode.NONE)),
        limits=FileLimits(),
    )


def test_tool_specs() -> None:
    names = [s.name for s in SUBAGENT_TOOL_SPECS]
    assert names == ["read_file", "write_file", "edit_file", "list_files", "search", "run_command"]
    for spec in SUBAGENT_TOOL_SPECS:
        assert spec.input_schema["additionalProperties"] is False
        assert "relative to the repository root" in spec.description or spec.name == "run_command"
    write = next(s for s in SUBAGENT_TOOL_SPECS if s.name == "write_file")
    assert write.input_schema["required"] == ["path", "content"]
    assert "OutOfScope" in write.description
    command = next(s for s in SUBAGENT_TOOL_SPECS if s.name == "run_command")
    assert "outside your write scope will not be kept" in command.description


async def test_round_trip_and_rendering(ws: Path) -> None:
    bus = make_bus(ws)
    wrote = await bus.call("write_file", {"path": "src/b.py", "content": "alpha = 2\n"})
    assert not wrote.is_error and wrote.content == "Wrote 10 bytes to src/b.py (new file)."
    edited = await bus.call("edit_file", {"path": "src/b.py", "old": "2", "new": "3"})
    assert "1 replacement;" in edited.content
    read = await bus.call("read_file", {"path": "src/b.py"})
    assert read.content == "src/b.py — lines 1-1 of 1\n     1\talpha = 3"
    listed = await bus.call("list_files", {"path": "src"})
    assert listed.content.splitlines() == ["src/a.py", "src/b.py"]
    found = await bus.call("search", {"pattern": "alpha", "glob": "*.py"})
    assert found.content.splitlines()[:2] == ["src/a.py:1: def alpha():", "src/b.py:1: alpha = 3"]
    assert "2 matching lines in 2 files" in found.content
    ran = await bus.call("run_command", {"command": "cat src/b.py; exit 4"})
    assert not ran.is_error and ran.content.startswith("exit code 4") and "alpha = 3" in ran.content
    assert bus.written_paths() == ["src/b.py"]


async def test_written_and_read_paths_follow_each_call(ws: Path) -> None:
    """Asked at every turn, they take in only the calls made since they were last asked."""
    bus = make_bus(ws)
    assert bus.written_paths() == [] and bus.read_paths() == []
    await bus.call("write_file", {"path": "src/z.py", "content": "z = 1\n"})
    assert bus.written_paths() == ["src/z.py"] and bus.read_paths() == []
    await bus.call("read_file", {"path": "src/a.py"})
    await bus.call("write_file", {"path": "../out.py", "content": "x\n"})  # refused: not written
    await bus.call("edit_file", {"path": "src/z.py", "old": "1", "new": "2"})
    await bus.call("write_file", {"path": "src/b.py", "content": "b\n"})
    assert bus.written_paths() == ["src/b.py", "src/z.py"]
    assert bus.read_paths() == ["src/a.py"]
    assert bus.read_paths(limit=0) == []


INVALID: list[tuple[str, dict[str, object], str]] = [
    ("read_file", {}, "missing required argument 'path'"),
    ("read_file", {"path": "a", "offset": 0}, "argument 'offset': Input should be greater"),
    ("read_file", {"path": "a", "offset": "x"}, "argument 'offset'"),
    ("write_file", {"path": "a", "content": "x", "mode": 7}, "unknown argument 'mode'"),
    ("edit_file", {"path": "a", "old": "x"}, "missing required argument 'new'"),
    ("search", {"pattern": ""}, "argument 'pattern'"),
    ("run_command", {"command": "ls", "timeout_s": -1}, "argument 'timeout_s'"),
    ("delete_file", {"path": "a"}, "unknown tool 'delete_file'"),
]


@pytest.mark.parametrize(("name", "arguments", "message"), INVALID)
async def test_bad_arguments_become_error_outcomes(
    ws: Path, name: str, arguments: dict[str, object], message: str
) -> None:
    bus = make_bus(ws)
    outcome = await bus.call(name, arguments)
    assert outcome.is_error and message in outcome.content
    if name != "delete_file":
        assert f"Expected {name}(" in outcome.content
    (record,) = bus.audit.records()
    assert (record.op, record.outcome, record.error_type) == (name, "refused", "InvalidArguments")


REFUSALS: list[tuple[str, dict[str, object], str, str]] = [
    ("write_file", {"path": "docs/x.md", "content": "x"}, "OutOfScope", "write scope (src/)"),
    ("write_file", {"path": "../out.txt", "content": "x"}, "PathEscape", "climbs out"),
    ("write_file", {"path": "/etc/passwd", "content": "x"}, "PathEscape", "absolute path"),
    ("read_file", {"path": ".git/config"}, "PathEscape", "inside .git"),
    ("read_file", {"path": "src/none.py"}, "FileNotFound", "does not exist"),
    ("read_file", {"path": "src"}, "NotAFile", "is a directory"),
    ("edit_file", {"path": "src/a.py", "old": "zzz", "new": "y"}, "NoMatch", "does not occur"),
    ("search", {"pattern": "("}, "InvalidArguments", "invalid regular expression"),
]


@pytest.mark.parametrize(("name", "arguments", "error", "message"), REFUSALS)
async def test_refusals_are_outcomes_and_audited(
    ws: Path, name: str, arguments: dict[str, object], error: str, message: str
) -> None:
    bus = make_bus(ws)
    outcome = await bus.call(name, arguments)
    assert outcome.is_error
    assert outcome.content.startswith(f"{error}: ") and message in outcome.content
    (record,) = bus.audit.records()
    assert (record.outcome, record.error_type, record.token) == ("refused", error, 11)
    assert record.detail is not None and message in record.detail


async def test_lease_lost_refuses_writes_and_commands(ws: Path) -> None:
    fence = RevocableFence()
    fence.revoked = True
    bus = make_bus(ws, fence)
    wrote = await bus.call("write_file", {"path": "src/a.py", "content": "stale"})
    ran = await bus.call("run_command", {"command": "touch ran.txt"})
    assert wrote.is_error and wrote.content.startswith("LeaseLost: ")
    assert ran.is_error and ran.content.startswith("LeaseLost: ")
    assert (ws / "src/a.py").read_text().startswith("def alpha")
    assert not (ws / "ran.txt").exists()
    assert fence.checked == ["src/a.py", None]
    assert [r.outcome for r in bus.audit.records()] == ["refused", "refused"]
    assert bus.written_paths() == []


async def test_unexpected_exceptions_become_error_outcomes(ws: Path) -> None:
    fence = RevocableFence()
    fence.broken = True
    bus = make_bus(ws, fence)
    outcome = await bus.call("write_file", {"path": "src/a.py", "content": "x"})
    assert outcome.is_error
    assert outcome.content.startswith("internal error (RuntimeError): fence store unreachable")
    assert "Traceback" not in outcome.content
    (record,) = bus.audit.records()
    assert (record.outcome, record.error_type) == ("error", "RuntimeError")


async def test_audit_is_complete_ordered_and_brief(ws: Path) -> None:
    bus = make_bus(ws)
    big = "x" * 10_000
    calls: list[tuple[str, dict[str, object]]] = [
        ("read_file", {"path": "src/a.py"}),
        ("write_file", {"path": "src/big.py", "content": big}),
        ("write_file", {"path": "docs/no.md", "content": "x"}),
        ("nonsense", {}),
        ("edit_file", {"path": "src/big.py", "old": "x", "new": "y", "replace_all": True}),
        ("run_command", {"command": "exit 2"}),
        ("list_files", {}),
        ("search", {"pattern": "alpha"}),
    ]
    for name, arguments in calls:
        await bus.call(name, arguments)
    records = bus.audit.records()
    assert [r.op for r in records] == [name for name, _ in calls]
    assert [r.seq for r in records] == list(range(1, len(calls) + 1))
    assert [r.outcome for r in records] == [
        "ok",
        "ok",
        "refused",
        "refused",
        "ok",
        "ok",
        "ok",
        "ok",
    ]
    write, edit, command = records[1], records[4], records[5]
    assert (write.path, write.bytes_written) == ("src/big.py", 10_000)
    assert "content=<10000 chars>" in write.args_brief and big not in write.args_brief
    assert (edit.replacements, edit.bytes_written) == (10_000, 10_000)
    assert command.exit_code == 2 and command.timed_out is False
    reloaded = AuditLog.load(ws.parent / "audit" / "agent-1.jsonl")
    assert reloaded.records() == records
    assert bus.written_paths() == ["src/big.py"]


async def test_timeout_is_an_error_outcome(ws: Path) -> None:
    bus = make_bus(ws)
    with anyio.fail_after(20):
        outcome = await bus.call("run_command", {"command": "sleep 1000", "timeout_s": 0.3})
    assert outcome.is_error and outcome.content.startswith("TIMED OUT")
    assert bus.audit.records()[0].timed_out is True


async def test_reads_do_not_wait_for_a_running_command_but_writes_do(ws: Path) -> None:
    fence = RevocableFence()
    bus = make_bus(ws, fence, scope=None)
    order: list[str] = []
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:

            async def command() -> None:
                await bus.call("run_command", {"command": "until [ -e go ]; do sleep 0.02; done"})
                order.append("command done")

            async def write() -> None:
                await bus.call("write_file", {"path": "w.txt", "content": "w"})
                order.append("write done")

            tg.start_soon(command)
            await fence.command_checked.wait()  # the command holds the mutation lock now
            tg.start_soon(write)
            read = await bus.call("read_file", {"path": "src/a.py"})
            listed = await bus.call("list_files", {})
            assert not read.is_error and not listed.is_error
            order.append("reads done")
            assert not (ws / "w.txt").exists()
            (ws / "go").write_text("")
    assert order == ["reads done", "command done", "write done"]


class ThreadSafeFence(RevocableFence):
    """A fence that may be checked from any thread."""

    thread_safe = True


@pytest.mark.parametrize("thread_safe", [False, True])
async def test_a_write_checks_its_fence_in_the_loop_thread_unless_it_is_thread_safe(
    ws: Path, thread_safe: bool
) -> None:
    threads: list[int] = []
    fence = ThreadSafeFence() if thread_safe else RevocableFence()
    plain_check = fence.check

    def check(path: str | None) -> None:
        threads.append(threading.get_ident())
        plain_check(path)

    fence.check = check  # type: ignore[method-assign]
    bus = make_bus(ws, fence)
    loop_thread = threading.get_ident()
    out = await bus.call("write_file", {"path": "src/new.py", "content": "x = 1\n"})
    assert not out.is_error, out.content
    assert (ws / "src" / "new.py").read_text() == "x = 1\n"
    assert len(threads) == 1
    assert (threads[0] == loop_thread) is not thread_safe

    # revoked: refused either way, and nothing is written
    fence.revoked = True
    refused = await bus.call("write_file", {"path": "src/other.py", "content": "y = 2\n"})
    assert refused.is_error and "LeaseLost" in refused.content
    assert not (ws / "src" / "other.py").exists()


@pytest.mark.parametrize("quick", [False, True])
async def test_quick_files_run_small_calls_in_the_loop_thread_and_big_ones_in_workers(
    ws: Path, quick: bool
) -> None:
    """With `quick_files`, a small write or edit is checked (fence included) and made in the
    event loop's thread, and only synced in a worker; a file over `QUICK_FILE_BYTES` goes to a
    worker whole, as every call does without it. The results are the same either way."""
    threads: list[tuple[str, int]] = []
    fence = ThreadSafeFence()
    plain_check = fence.check

    def check(path: str | None) -> None:
        threads.append((str(path), threading.get_ident()))
        plain_check(path)

    fence.check = check  # type: ignore[method-assign]
    bus = make_bus(ws, fence, quick_files=quick)
    loop_thread = threading.get_ident()
    big = "x = 1\n" * (QUICK_FILE_BYTES // 6 + 10)

    calls: list[tuple[str, dict[str, object]]] = [
        ("write_file", {"path": "src/small.py", "content": "a = 1\n"}),
        ("edit_file", {"path": "src/small.py", "old": "a = 1", "new": "a = 2"}),
        ("write_file", {"path": "src/big.py", "content": big}),
        (
            "edit_file",
            {"path": "src/big.py", "old": "x = 1\nx = 1\nx", "new": "y", "replace_all": True},
        ),
        (
            "edit_file",
            {"path": "src/a.py", "old": "return 1", "new": "return " + "9" * QUICK_FILE_BYTES},
        ),
    ]
    for name, args in calls:
        out = await bus.call(name, args)
        assert not out.is_error, out.content
    assert (ws / "src" / "small.py").read_text() == "a = 2\n"
    assert (ws / "src" / "big.py").read_text() == big.replace("x = 1\nx = 1\nx", "y")
    assert (
        ws / "src" / "a.py"
    ).read_text() == "def alpha():\n    return " + "9" * QUICK_FILE_BYTES + "\n"
    in_loop = [(path, ident == loop_thread) for path, ident in threads]
    assert in_loop == [
        ("src/small.py", quick),
        ("src/small.py", quick),
        ("src/big.py", False),
        ("src/big.py", False),
        ("src/a.py", False),  # the file is small, its edited text is not
    ]
    assert not [p.name for p in (ws / "src").iterdir() if p.name.endswith(".tmp")]

    read = await bus.call("read_file", {"path": "src/big.py", "limit": 2})
    assert not read.is_error and "y = 1" in read.content
    small = await bus.call("read_file", {"path": "src/small.py"})
    assert not small.is_error and "a = 2" in small.content


async def test_a_quick_write_refused_or_failing_leaves_nothing_behind(ws: Path) -> None:
    fence = ThreadSafeFence()
    bus = make_bus(ws, fence, quick_files=True)
    fence.revoked = True
    refused = await bus.call("write_file", {"path": "src/a.py", "content": "gone\n"})
    assert refused.is_error and "LeaseLost" in refused.content
    fence.revoked = False
    (ws / "src" / "dir.py").mkdir()
    failed = await bus.call("write_file", {"path": "src/dir.py", "content": "x\n"})
    assert failed.is_error and "directory" in failed.content
    assert (ws / "src" / "a.py").read_text() == "def alpha():\n    return 1\n"
    assert sorted(p.name for p in (ws / "src").iterdir()) == ["a.py", "dir.py"]


async def test_a_cancelled_quick_write_waits_for_its_sync_and_leaves_no_temp_file(
    ws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelling the call while its fsyncs run in the worker thread does not leave the write
    half done: the call returns only once the sync is over (the descriptors are closed after
    it), as `anyio.to_thread.run_sync` would, and the file is then in place, no temporary file
    beside it."""
    from toolbus.fileops import PendingWrite

    entered, go = threading.Event(), threading.Event()
    plain_sync = PendingWrite.sync

    def slow_sync(self: PendingWrite) -> None:
        entered.set()
        go.wait(10)
        plain_sync(self)

    monkeypatch.setattr(PendingWrite, "sync", slow_sync)
    bus = make_bus(ws, quick_files=True)
    scope = anyio.CancelScope()
    returned = anyio.Event()

    async def write() -> None:
        with scope:
            await bus.call("write_file", {"path": "src/c.py", "content": "c = 1\n"})
        returned.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(write)
        await anyio.to_thread.run_sync(entered.wait, 10)
        scope.cancel()
        await anyio.sleep(0.1)
        assert not returned.is_set()  # the sync still runs: the call waits for it
        go.set()
    assert returned.is_set() and scope.cancel_called
    assert (ws / "src" / "c.py").read_text() == "c = 1\n"
    assert sorted(p.name for p in (ws / "src").iterdir()) == ["a.py", "c.py"]


async def test_a_bus_is_freed_without_the_cycle_collector(ws: Path) -> None:
    """A finished agent's bus (its jail, file operations, audit) goes as soon as nothing refers
    to it: no reference cycle keeps it for the cycle collector, which walks every live object
    of the server each time it runs."""
    bus = make_bus(ws)
    await bus.call("write_file", {"path": "src/b.py", "content": "b = 1\n"})
    await bus.call("read_file", {"path": "src/b.py"})
    gone = weakref.ref(bus)
    gc.disable()
    try:
        del bus
        assert gone() is None
    finally:
        gc.enable()


async def test_odd_names_and_links_get_clear_answers(ws: Path) -> None:
    bus = make_bus(ws)
    # a tool name the model made up with a lone surrogate: refused, and audited
    odd = await bus.call("\ud800", {})
    assert odd.is_error
    # a link loop: a clear refusal, not an internal error naming the server's paths
    (ws / "loop").symlink_to("loop")
    looped = await bus.call("read_file", {"path": "loop/x"})
    assert looped.is_error and "internal error" not in looped.content
    assert str(ws) not in looped.content
    # a name within the file system's 255 bytes, in multibyte characters, can be written
    name = "src/" + "€" * 85
    written = await bus.call("write_file", {"path": name, "content": "x\n"})
    assert not written.is_error, written.content
    assert (ws / name).read_text() == "x\n"
    assert [r.op for r in bus.audit.records()] == ["\\ud800", "read_file", "write_file"]
