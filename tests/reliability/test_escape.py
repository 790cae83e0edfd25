"""Hostile input on the subagent side: an escape corpus through `AgentBus.call`.

The workspace is a real git worktree under `<repo>/.git/fanout/worktrees/`, next to a sibling
agent's worktree; the fence is the orchestrator's `LeaseFence` over a real lease store. Every case
must come back as a refusal or a bounded answer: never an exception, never an "internal error",
never a byte of a file outside the workspace, never a change outside it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncGenerator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from pydantic import JsonValue

from orchestration.orchestrator import LeaseFence
from tests.orchestration.scripts import git, make_repo
from tests.reliability.conftest import Ledger
from toolbus.audit import AuditLog
from toolbus.bus import AgentBus, FileLimits
from toolbus.leases import LeaseManager, LeaseRequest, LeaseStore
from toolbus.resources import WriteScope
from toolbus.terminal import SandboxMode, Terminal, TerminalConfig
from toolbus.toolspec import ToolOutcome

pytestmark = pytest.mark.anyio

GUARANTEE = "G1 subagent hostile input refused or bounded"
OUTSIDE_MARK = "OUTSIDE-SECRET-MARK-7d1f"
SIBLING_MARK = "SIBLING-PRIVATE-MARK-93ac"
BIG_BYTES = 50 * 1024 * 1024
# The largest answer any case may produce: a read page (100k chars) plus its framing.
MAX_ANSWER_CHARS = 120_000


@dataclass
class World:
    repo: Path
    ws: Path
    sibling: Path
    outside: Path


def _tree_digest(root: Path) -> str:
    """A digest of every path, type and content under `root` (symlinks not followed)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(Path(dirpath, d))]):
            p = Path(dirpath, name)
            h.update(str(p.relative_to(root)).encode("utf-8", "surrogateescape"))
            st = p.lstat()
            h.update(str(st.st_mode).encode())
            if p.is_symlink():
                h.update(os.readlink(p).encode("utf-8", "surrogateescape"))
            elif p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def world(tmp_path: Path) -> World:
    repo = make_repo(tmp_path / "repo")
    trees = repo / ".git" / "fanout" / "worktrees" / "r1"
    trees.mkdir(parents=True)
    ws, sibling = trees / "a1", trees / "a2"
    git(repo, "worktree", "add", "-q", "-b", "fanout/r1/a1", str(ws))
    git(repo, "worktree", "add", "-q", "-b", "fanout/r1/a2", str(sibling))
    (sibling / "private.txt").write_text(SIBLING_MARK + "\n")
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret.txt").write_text(OUTSIDE_MARK + "\n")
    (outside / "dir" / "inner.txt").write_text(OUTSIDE_MARK + "\n")

    deep = ws / "src" / "deep" / "er"
    deep.mkdir(parents=True)
    (deep / "link_file").symlink_to(outside / "secret.txt")
    (deep / "link_dir").symlink_to(outside / "dir")
    (deep / "rel_up").symlink_to("../../../../../../../outside")
    (ws / "src" / "link_out").symlink_to(outside)
    (ws / "sib").symlink_to(sibling)
    (ws / "src" / "sib_rel").symlink_to("../../a2")
    (ws / "gitlink").symlink_to(ws / ".git")
    (ws / "common_git").symlink_to(repo / ".git")
    (ws / "src" / "zero").symlink_to("/dev/zero")
    (ws / "src" / "loop_a").symlink_to("loop_b")
    (ws / "src" / "loop_b").symlink_to("loop_a")
    os.link(outside / "secret.txt", ws / "src" / "hard")
    os.mkfifo(ws / "src" / "fifo")
    (ws / "sub" / ".git").mkdir(parents=True)
    (ws / "sub" / ".git" / "config").write_text("[core]\n")
    with open(ws / "big.txt", "wb") as f:
        f.truncate(BIG_BYTES - 1)
        f.write(b"\n")
    (ws / "src" / "long_line.txt").write_text("x" * 1_500_000 + "\n")
    (ws / "src" / "binary.bin").write_bytes(b"\x00\x01\x02" * 1000)
    (ws / "src" / "latin1.txt").write_bytes(b"caf\xe9\n")
    return World(repo=repo, ws=ws, sibling=sibling, outside=outside)


Check = Callable[[ToolOutcome], str | None]
"""Returns a reason when the outcome is not acceptable."""


def refused(*words: str) -> Check:
    def check(o: ToolOutcome) -> str | None:
        if not o.is_error:
            return "not refused"
        if words and not any(w.lower() in o.content.lower() for w in words):
            return f"refused without naming any of {words}"
        return None

    return check


def bounded(limit: int) -> Check:
    def check(o: ToolOutcome) -> str | None:
        return None if len(o.content) <= limit else f"answer has {len(o.content)} chars"

    return check


ESCAPE = ("PathEscape", "outside", "climbs out", "absolute")
GITDIR = ("PathEscape", ".git")
MISSING = ("FileNotFound", "does not exist")
NOT_FILE = ("NotAFile", "not a regular file", "FIFO", "device")
TOO_LARGE = ("FileTooLarge", "cap")


def corpus() -> list[tuple[str, str, dict[str, JsonValue], Check]]:
    """(case, tool, arguments, extra check) — extra to the universal checks."""
    cases: list[tuple[str, str, dict[str, JsonValue], Check]] = []

    def add(case: str, tool: str, args: dict[str, JsonValue], check: Check) -> None:
        cases.append((case, tool, args, check))

    traversal = [
        "../outside/secret.txt",
        "../../../../outside/secret.txt",
        "a/../../x",
        "src/../../x",
        "src/./../../../outside/secret.txt",
        "..",
        "../",
        "./../a2/private.txt",
        "..\\..\\..\\..\\outside\\secret.txt",
        "src\\..\\..\\x",
        "../a2/private.txt",
        "../../../a2/private.txt",
    ]
    for p in traversal:
        add(f"read traversal {p!r}", "read_file", {"path": p}, refused(*ESCAPE))
        add(f"write traversal {p!r}", "write_file", {"path": p, "content": "pwn"}, refused())
        add(f"list traversal {p!r}", "list_files", {"path": p}, refused(*ESCAPE))
        add(f"search traversal {p!r}", "search", {"pattern": "MARK", "path": p}, refused())
    for p in ["%2e%2e/%2e%2e/outside/secret.txt", "..%2f..%2foutside", "%252e%252e/x"]:
        add(f"read url-encoded {p!r}", "read_file", {"path": p}, refused(*MISSING))
        add(f"write url-encoded {p!r}", "write_file", {"path": p, "content": "x"}, refused())
    for p in ["/etc/passwd", "//etc/passwd", "/dev/zero", " /etc/passwd", "\\etc\\passwd"]:
        add(f"read absolute {p!r}", "read_file", {"path": p}, refused(*ESCAPE))
        add(f"write absolute {p!r}", "write_file", {"path": "/tmp/pwn", "content": "x"}, refused())
        add(f"list absolute {p!r}", "list_files", {"path": p}, refused(*ESCAPE))
        add(f"search absolute {p!r}", "search", {"pattern": "root", "path": p}, refused())

    symlinks = {
        "file symlink at depth": "src/deep/er/link_file",
        "dir symlink at depth": "src/deep/er/link_dir/inner.txt",
        "relative symlink climbing out": "src/deep/er/rel_up/secret.txt",
        "dir symlink near root": "src/link_out/secret.txt",
        "sibling worktree via symlink": "sib/private.txt",
        "sibling worktree via relative symlink": "src/sib_rel/private.txt",
        "device via symlink": "src/zero",
        "symlink into .git": "gitlink/config",
        "symlink to common .git": "common_git/config",
    }
    for what, p in symlinks.items():
        add(f"read {what}", "read_file", {"path": p}, refused("PathEscape", "symlink", ".git"))
        add(f"write {what}", "write_file", {"path": p, "content": "pwn"}, refused())
        add(f"edit {what}", "edit_file", {"path": p, "old": "MARK", "new": "X"}, refused())
        add(f"list {what}", "list_files", {"path": p}, refused())
        add(f"search {what}", "search", {"pattern": "MARK", "path": p}, refused())
        link = p.rsplit("/", 1)[0] if p.endswith(("inner.txt", "secret.txt", "private.txt")) else p
        add(f"list the link of {what}", "list_files", {"path": link}, refused())
    add("write new file below out-symlink", "write_file",
        {"path": "src/link_out/new.txt", "content": "x"}, refused(*ESCAPE))  # fmt: skip
    add("symlink loop", "read_file", {"path": "src/loop_a"}, refused())
    add("write through symlink loop", "write_file", {"path": "src/loop_a", "content": "x"},
        refused())  # fmt: skip

    # hard links: writing would modify the file outside the workspace
    add("write hard link to outside", "write_file", {"path": "src/hard", "content": "pwn"},
        refused("hard link"))  # fmt: skip
    add("edit hard link to outside", "edit_file",
        {"path": "src/hard", "old": OUTSIDE_MARK, "new": "pwn"}, refused("hard link"))  # fmt: skip

    for p in [".git/config", ".GIT/config", ".Git/HEAD", "./.git/config", "src/../.git/config",
              "sub/.git/config", ".git", ".git/", ".git/hooks/pre-commit"]:  # fmt: skip
        add(f"read git internals {p!r}", "read_file", {"path": p}, refused(*GITDIR))
        add(f"write git internals {p!r}", "write_file",
            {"path": p, "content": "#!/bin/sh\necho pwn\n"}, refused(*GITDIR))  # fmt: skip
        add(f"list git internals {p!r}", "list_files", {"path": p}, refused(*GITDIR))
        add(f"search git internals {p!r}", "search", {"pattern": "core", "path": p},
            refused(*GITDIR))  # fmt: skip
    add("list pattern into .git", "list_files", {"pattern": ".git/**"}, bounded(200))
    add("search glob into .git", "search", {"pattern": "repositoryformat", "glob": ".git/*"},
        bounded(400))  # fmt: skip

    # special files
    add("read FIFO", "read_file", {"path": "src/fifo"}, refused(*NOT_FILE))
    add("write FIFO", "write_file", {"path": "src/fifo", "content": "x"}, refused(*NOT_FILE))
    add("edit FIFO", "edit_file", {"path": "src/fifo", "old": "a", "new": "b"}, refused())
    add("search dir holding a FIFO", "search", {"pattern": "x", "path": "src"},
        bounded(MAX_ANSWER_CHARS))  # fmt: skip
    add("list dir holding a FIFO", "list_files", {"path": "src"}, bounded(10_000))
    add("read a directory", "read_file", {"path": "src"}, refused(*NOT_FILE, "directory"))
    add("read the root", "read_file", {"path": ""}, refused("directory"))
    add("write the root", "write_file", {"path": "", "content": "x"}, refused("directory"))
    add("write over a directory", "write_file", {"path": "src/deep", "content": "x"}, refused())
    add("write below a file", "write_file", {"path": "src/app/core.py/x", "content": "x"},
        refused())  # fmt: skip

    # size bounds
    add("read 50 MB file", "read_file", {"path": "big.txt"}, refused(*TOO_LARGE))
    add("edit 50 MB file", "write_file", {"path": "big.txt", "content": "x"}, refused())
    add("search 50 MB file", "search", {"pattern": "x", "path": "big.txt"}, bounded(400))
    add("read 1.5 MB line", "read_file", {"path": "src/long_line.txt"}, bounded(5_000))
    add("search 1.5 MB line", "search", {"pattern": "x+", "path": "src/long_line.txt"},
        bounded(1_000))  # fmt: skip
    add("write 6 MB", "write_file", {"path": "src/huge.txt", "content": "y" * (6 * 1024 * 1024)},
        refused(*TOO_LARGE))  # fmt: skip
    add("read binary", "read_file", {"path": "src/binary.bin"}, refused("BinaryFile", "binary"))
    add("read non-UTF-8", "read_file", {"path": "src/latin1.txt"}, refused("UTF-8"))
    add("read with huge limit", "read_file", {"path": "src/long_line.txt", "limit": 100_000},
        bounded(5_000))  # fmt: skip
    add("read with offset past end", "read_file", {"path": "README.md", "offset": 10**12},
        bounded(300))  # fmt: skip
    add("read with limit over cap", "read_file", {"path": "README.md", "limit": 10**9},
        refused("limit"))  # fmt: skip
    add("catastrophic regex", "search", {"pattern": "(a+)+$", "path": "src"},
        bounded(MAX_ANSWER_CHARS))  # fmt: skip
    add("invalid regex", "search", {"pattern": "(", "path": "src"}, refused("regular expression"))
    add("invalid glob", "list_files", {"pattern": "[", "path": "src"}, bounded(10_000))

    # NUL bytes, over-long paths, odd text
    add("NUL in path (read)", "read_file", {"path": "src/app/core.py\x00.txt"}, refused("NUL"))
    add("NUL in path (write)", "write_file", {"path": "src/a\x00b", "content": "x"}, refused("NUL"))
    add("NUL in search path", "search", {"pattern": "x", "path": "src\x00"}, refused("NUL"))
    add("NUL in pattern", "search", {"pattern": "\x00", "path": "src"}, bounded(MAX_ANSWER_CHARS))
    add("NUL in glob", "list_files", {"pattern": "*\x00", "path": "src"}, bounded(10_000))
    add("component over 255 bytes", "write_file", {"path": "src/" + "n" * 300, "content": "x"},
        refused("longer than"))  # fmt: skip
    add("multibyte component over 255 bytes", "read_file", {"path": "src/" + "é" * 200},
        refused("longer than"))  # fmt: skip
    add("path over 4096 chars", "read_file", {"path": "a/" * 3000}, refused("longer than"))
    # inside the workspace and the scope: allowed (openat walks avoid PATH_MAX), but bounded
    add("deep path just under the cap", "write_file",
        {"path": "src/" + "/".join(["d" * 200] * 20), "content": "x"}, bounded(5_000))  # fmt: skip
    add("unpaired surrogate in content", "write_file", {"path": "src/s.txt", "content": "\ud800"},
        bounded(400))  # fmt: skip
    add("RTL override in path", "read_file", {"path": "src/\u202etxt.exe"}, refused(*MISSING))
    add("newline in path", "write_file", {"path": "src/a\nb.py", "content": "x"}, bounded(400))
    add("write outside scope", "write_file", {"path": "docs/x.md", "content": "x"},
        refused("OutOfScope"))  # fmt: skip
    add("write scope-prefix lookalike", "write_file", {"path": "srcx/a.py", "content": "x"},
        refused("OutOfScope"))  # fmt: skip

    # bad arguments
    add("unknown tool", "rm_rf", {"path": "/"}, refused("unknown tool"))
    add("finish is not a bus tool", "finish", {"summary": "x"}, refused("unknown tool"))
    add("wrong type", "read_file", {"path": 7}, refused("invalid arguments"))
    add("missing argument", "write_file", {"path": "src/x"}, refused("missing"))
    add("unknown argument", "read_file", {"path": "README.md", "mode": "rw"}, refused("unknown"))
    add("nested object", "read_file", {"path": {"$ne": ""}}, refused("invalid arguments"))
    add("negative offset", "read_file", {"path": "README.md", "offset": -1}, refused())
    add("negative timeout", "run_command", {"command": "true", "timeout_s": -5}, refused())
    add("empty command", "run_command", {"command": ""}, refused())
    add("NaN timeout", "run_command", {"command": "true", "timeout_s": float("nan")}, refused())

    # command output bounds (without a sandbox: only output, time and processes are bounded)
    add("100 MB of output", "run_command", {"command": "yes | head -c 100000000"},
        bounded(31_000))  # fmt: skip
    add("cat 50 MB file", "run_command", {"command": "cat big.txt | tr '\\0' a"}, bounded(31_000))
    add("binary output", "run_command", {"command": "head -c 100000 /dev/urandom"},
        bounded(31_000 * 3))  # fmt: skip
    add("NUL in command", "run_command", {"command": "echo a\x00b"}, refused("NUL"))
    add("command times out", "run_command", {"command": "sleep 30", "timeout_s": 0.5},
        refused("TIMED OUT"))  # fmt: skip
    add("reads stdin", "run_command", {"command": "cat"}, bounded(400))
    add("FIFO made by a command", "run_command", {"command": "mkfifo src/fifo2 && ls src"},
        bounded(2_000))  # fmt: skip
    add("read FIFO made by a command", "read_file", {"path": "src/fifo2"}, refused(*NOT_FILE))
    add("search after FIFO made by a command", "search", {"pattern": "zzz"}, bounded(400))
    return cases


def _judge(outcome: ToolOutcome, check: Check) -> str | None:
    text = outcome.content
    if "internal error" in text or "Traceback" in text:
        return f"internal error: {text[:200]}"
    if OUTSIDE_MARK in text or SIBLING_MARK in text:
        return "disclosed a file outside the workspace"
    if len(text) > MAX_ANSWER_CHARS:
        return f"unbounded answer ({len(text)} chars)"
    reason = check(outcome)
    return None if reason is None else f"{reason} — {text[:160]!r}"


async def _run_cases(
    bus: AgentBus, cases: list[tuple[str, str, dict[str, JsonValue], Check]], ledger: Ledger,
    guarantee: str,
) -> None:  # fmt: skip
    for case, tool, args, check in cases:
        reason: str | None
        try:
            with anyio.fail_after(30):
                outcome = await bus.call(tool, args)
        except Exception as exc:  # the bus must never raise
            reason = f"raised {type(exc).__name__}: {str(exc)[:200]}"
        else:
            reason = _judge(outcome, check)
        ledger.record(guarantee, case, reason is None, reason or "")


@asynccontextmanager
async def _bus(world: World) -> AsyncGenerator[AgentBus]:
    """The agent bus of agent r1-a1: write scope `src`, a live write lease on it."""
    store = LeaseStore(world.repo / ".git" / "fanout", ttl_s=60.0, lock_delay_s=0.0)
    manager = LeaseManager(store)
    fence = LeaseFence(manager, "r1-a1")
    fence.grant = await manager.acquire("r1-a1", [LeaseRequest.write("src")])
    terminal = Terminal(world.ws, TerminalConfig(sandbox=SandboxMode.NONE, kill_grace_s=0.5))
    try:
        yield AgentBus(
            agent_id="r1-a1",
            workspace=world.ws,
            write_scope=WriteScope.of(["src"]),
            fence=fence,
            audit=AuditLog(world.repo / ".git" / "fanout" / "audit" / "r1-a1.jsonl"),
            terminal=terminal,
            limits=FileLimits(search_time_budget_s=5.0),
        )
    finally:
        terminal.close()
        store.close()


async def test_escape_corpus(world: World, ledger: Ledger) -> None:
    guarded = {
        "outside": world.outside,
        "sibling": world.sibling,
        "repo .git/hooks": world.repo / ".git" / "hooks",
    }
    before = {k: _tree_digest(v) for k, v in guarded.items()}
    config_before = (world.repo / ".git" / "config").read_bytes()
    head_before = git(world.repo, "rev-parse", "HEAD")
    cases = corpus()
    async with _bus(world) as bus:
        await _run_cases(bus, cases, ledger, GUARANTEE)
        records = bus.audit.records()
    after = {k: _tree_digest(v) for k, v in guarded.items()}
    changed = [k for k in guarded if before[k] != after[k]]
    ledger.record(GUARANTEE, "nothing outside the workspace changed", not changed, str(changed))
    config_same = (world.repo / ".git" / "config").read_bytes() == config_before
    ledger.record(GUARANTEE, "repository .git/config unchanged", config_same, "changed")
    head_same = git(world.repo, "rev-parse", "HEAD") == head_before
    ledger.record(GUARANTEE, "canonical head unchanged", head_same, "moved")
    ledger.record(
        GUARANTEE,
        "every call audited",
        len(records) == len(cases),
        f"{len(records)} records for {len(cases)} calls",
    )
    failures = ledger.failures(GUARANTEE)
    assert not failures, "\n".join(failures)
    assert len(cases) >= 200


SURROGATES = "G1b lone surrogates (valid JSON escapes) refused, not raised"


async def test_lone_surrogates_are_refused_not_raised(world: World, ledger: Ledger) -> None:
    """`json.loads('"\\ud800"')` is a lone surrogate: a model's tool input can carry one."""
    cases: list[tuple[str, str, dict[str, JsonValue], Check]] = [
        ("lone low surrogate in path", "read_file", {"path": "src/\udc80"}, refused()),
        ("lone high surrogate in path", "read_file", {"path": "src/\ud800x"}, refused()),
        ("surrogate in write path", "write_file", {"path": "src/\udfff", "content": "x"},
         refused()),
        ("lone surrogate in command", "run_command", {"command": "echo \udc80"}, bounded(400)),
    ]  # fmt: skip
    async with _bus(world) as bus:
        await _run_cases(bus, cases, ledger, SURROGATES)
    failures = ledger.failures(SURROGATES)
    assert not failures, "\n".join(failures)
