"""Shared helpers of the run benchmarks: a temporary git repository, the fake Messages API (in a
thread or in a child process), driving an `Orchestrator` until its agents are final, percentiles.

The agents of these benchmarks are told `BENCH-AGENT-<n>` in their task; `three_turns` (the fake's
handler) answers, by the number of assistant turns in the request: `write_file work/a<n>/out.txt`,
then `read_file` of it, then `finish` — three requests per agent.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncGenerator, Callable, Generator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

import anyio

from fakeapi import (
    FakeAnthropic,
    FakeRequest,
    Handler,
    Reply,
    count_input_tokens,
    finish,
    text,
    tool_use,
)
from orchestration.config import Settings
from orchestration.contracts import (
    AgentStatus,
    AgentView,
    SpawnRequest,
    SpawnResult,
    TaskSpec,
)
from orchestration.model import Model
from orchestration.orchestrator import ModelFactory, Orchestrator
from orchestration.providers.anthropic import AnthropicModel
from orchestration.workspace import Identity, run_git
from orchestration.workspace.overlay import unmount_below

IDENTITY = Identity("fanout bench", "bench@localhost")
FILES_PER_DIR = 100
AGENT_TAG = re.compile(r"BENCH-AGENT-(\d+)")
STARTED = frozenset({AgentStatus.QUEUED, AgentStatus.WAITING})  # not yet running


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by the nearest-rank method; 0.0 for no samples."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --------------------------------------------------------------------------- scratch space

SCRATCH_ENV = "FANOUT_BENCH_DIR"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def scratch_root() -> Path:
    """Where the benchmarks make their repositories: `$FANOUT_BENCH_DIR`, else `.bench-tmp/` in
    the project checkout (git-ignored). Not the system temporary directory: users' repositories
    live in ordinary directories, and a temporary directory that tests churn can be far slower
    to create files in (see `file_create_ms`, printed beside the figures)."""
    configured = os.environ.get(SCRATCH_ENV)
    root = Path(configured) if configured else PROJECT_ROOT / ".bench-tmp"
    root.mkdir(parents=True, exist_ok=True)
    return root


_LEFT_FOR_LATER: list[Path] = []


@contextmanager
def scratch(prefix: str) -> Generator[str]:
    """A new directory under `scratch_root()`. It is deleted by `remove_scratch()` (which
    `python -m benchmarks` calls after the last benchmark), not on leaving the block: ext4
    skips recently freed inodes when it allocates new ones, so deleting a benchmark's hundreds
    of thousands of files would slow down the file creation of the next one for minutes."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=scratch_root()))
    _LEFT_FOR_LATER.append(path)
    try:
        yield str(path)
    finally:
        # the agents' views: deleting through them would write a whiteout per base file
        unmount_below(path)


def remove_scratch() -> None:
    """Delete the directories `scratch()` made in this process."""
    while _LEFT_FOR_LATER:
        path = _LEFT_FOR_LATER.pop()
        unmount_below(path)
        shutil.rmtree(path, ignore_errors=True)


def file_create_ms(where: Path, files: int = 200) -> float:
    """Milliseconds to create one small file (in a new directory of `where`, then removed): the
    disk's part of every worktree, measured in the same run as the figures it explains."""
    with tempfile.TemporaryDirectory(prefix="bench-files-", dir=where) as tmp:
        target = Path(tmp) / "d"
        target.mkdir()
        started = time.perf_counter()
        for n in range(files):
            (target / f"f{n}.py").write_bytes(b"x = 1\n")
        return (time.perf_counter() - started) * 1000 / files


# --------------------------------------------------------------------------- repositories


def module_file(n: int) -> tuple[str, str]:
    """The `n`th file of a benchmark repository: a small Python module, 100 to a directory."""
    body = f'"""module {n}"""\n\n\ndef f{n}() -> int:\n    return {n}\n'
    return f"src/d{n // FILES_PER_DIR:03d}/m{n:05d}.py", body


def build_repo(
    root: Path,
    files: int,
    *,
    extra: dict[str, str] | None = None,
    file: Callable[[int], tuple[str, str]] = module_file,
) -> str:
    """A repository at `root` of `files` small files (`file(n)` gives each path and text) plus
    `extra`, checked out on main with one commit (fast-import, then a checkout); returns the
    commit id."""
    root.mkdir(parents=True, exist_ok=True)
    run_git(root, "init", "-q", "-b", "main")
    stream: list[str] = [
        "commit refs/heads/main",
        f"committer {IDENTITY.name} <{IDENTITY.email}> 1700000000 +0000",
        "data 8",
        "initial",
    ]
    contents: dict[str, str] = {"README.md": "# bench repository\n", **(extra or {})}
    contents.update(file(n) for n in range(files))
    for path, body in contents.items():
        data = body.encode()
        stream += [f"M 100644 inline {path}", f"data {len(data)}", body]
    run_git(root, "fast-import", "--quiet", input="\n".join(stream) + "\n")
    run_git(root, "reset", "-q", "--hard", "main")
    return run_git(root, "rev-parse", "HEAD").stdout.strip()


# --------------------------------------------------------------------------- a stdio server

# the `initialize` parameters of the bare JSON-RPC drivers
INITIALIZE: dict[str, Any] = {
    "protocolVersion": "2025-11-25",
    "capabilities": {},
    "clientInfo": {"name": "bench", "version": "0"},
}


class StdioRpc:
    """A server process spoken to over its stdin/stdout with bare JSON-RPC lines, one request
    at a time (what a benchmark times is then the server, the pipe and this reading)."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            env=env,
        )
        self._ids = iter(range(1, 1_000_000))
        self.last_line = ""  # the answer line of the last request, as it came

    def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """The whole answer (`result` or `error`) to one request; notifications are skipped."""
        stdin, stdout = self.proc.stdin, self.proc.stdout
        assert stdin is not None and stdout is not None
        msg_id = next(self._ids)
        message = {"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params}
        stdin.write(json.dumps(message) + "\n")
        stdin.flush()
        while True:
            line = stdout.readline()
            if not line:
                raise RuntimeError(f"the server exited (code {self.proc.poll()}) during {method}")
            answer: dict[str, Any] = json.loads(line)
            if answer.get("id") == msg_id:
                self.last_line = line
                return answer

    def initialize(self) -> None:
        """The handshake: `initialize`, then `notifications/initialized`."""
        answer = self.request("initialize", INITIALIZE)
        if "error" in answer:
            raise RuntimeError(f"initialize failed: {answer['error']}")
        assert self.proc.stdin is not None
        initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        self.proc.stdin.write(json.dumps(initialized) + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        """Close stdin (the server's cue to exit) and wait for it, killing it after 30 s."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# --------------------------------------------------------------------------- the fake API


def agent_number(request: FakeRequest) -> str:
    found = AGENT_TAG.search(request.system_text)
    return found.group(1) if found else "0"


def three_turns(request: FakeRequest) -> Reply:
    """write_file (in the agent's own scope) → read_file → finish."""
    n = agent_number(request)
    turn = request.assistant_turns
    if turn == 0:
        return tool_use("write_file", path=f"work/a{n}/out.txt", content=f"agent {n}\n")
    if turn == 1:
        return tool_use("read_file", path=f"work/a{n}/out.txt")
    if turn == 2:
        return finish(f"agent {n}: wrote and read work/a{n}/out.txt")
    return text("done")


@dataclass
class FakeStats:
    """What the fake saw: requests and the input side of their usage, summed."""

    requests: int = 0
    errors: int = 0
    input_tokens: int = 0
    cache_write_tokens: int = 0
    cache_read_tokens: int = 0
    # per answered request, in arrival order: (a hash of its shared system prefix, the agent's
    # bench number, the tokens of its tools and shared prefix, how many of them were read from
    # the cache)
    prefix_reads: list[tuple[str, str, int, int]] = field(
        default_factory=list[tuple[str, str, int, int]]
    )


def _prefix_read(body: dict[str, Any], read: int) -> tuple[str, int, int] | None:
    system = body.get("system")
    if not isinstance(system, list) or not system:
        return None
    first: Any = cast(list[Any], system)[0]
    if not isinstance(first, dict):
        return None
    block = cast(dict[str, Any], first)
    shared: dict[str, Any] = {
        "model": body.get("model"),
        "tools": body.get("tools"),
        "system": [block],
    }
    tokens = count_input_tokens(shared)
    key = hashlib.sha256(str(block.get("text")).encode()).hexdigest()
    return key[:16], tokens, min(read, tokens)


def _stats(fake: FakeAnthropic) -> FakeStats:
    stats = FakeStats()
    for entry in fake.requests:
        stats.requests += 1
        if entry.status != 200:
            stats.errors += 1
        if entry.usage is not None:
            stats.input_tokens += entry.usage.input_tokens
            stats.cache_write_tokens += entry.usage.cache_creation_input_tokens
            stats.cache_read_tokens += entry.usage.cache_read_input_tokens
            shared = _prefix_read(
                cast(dict[str, Any], entry.body), entry.usage.cache_read_input_tokens
            )
            if shared is not None:
                key, tokens, read = shared
                agent = agent_number(FakeRequest(body=entry.body, headers={}, index=entry.index))
                stats.prefix_reads.append((key, agent, tokens, read))
    return stats


@dataclass
class FakeHandle:
    """A running fake: its base URL, its process when it runs in a child (None in a thread) and,
    once it has stopped, what it saw."""

    base_url: str
    stats: FakeStats = field(default_factory=FakeStats)
    pid: int | None = None


def self_cpu_s() -> float:
    """CPU seconds of this process (every thread, user and system) and of its waited-for
    children (git) so far."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 where /proc is not available)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command name: state is field 3, utime 14 and stime 15 (1-based, man proc).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def fake_in_thread(handler: Handler = three_turns, latency_s: float = 0.0) -> Generator[FakeHandle]:
    """The fake served from an event loop of its own in a thread of this process."""
    fake = FakeAnthropic(handler, latency_s=latency_s)
    with fake.running():
        handle = FakeHandle(fake.base_url)
        try:
            yield handle
        finally:
            handle.stats = _stats(fake)


def _serve_child(conn: Connection, handler: Handler, latency_s: float) -> None:
    """The child process: serve until the parent says stop, then send back the stats."""
    fake = FakeAnthropic(handler, latency_s=latency_s)

    async def serve() -> None:
        async with fake.serve():
            conn.send(fake.base_url)
            await anyio.to_thread.run_sync(conn.recv)
        conn.send(_stats(fake))

    anyio.run(serve)


@contextmanager
def fake_in_process(
    handler: Handler = three_turns, latency_s: float = 0.0
) -> Generator[FakeHandle]:
    """The fake in a child process (its CPU and memory kept apart from the orchestrator's);
    `handler` must be picklable (a module-level function)."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_serve_child, args=(child, handler, latency_s), daemon=True)
    process.start()
    try:
        if not parent.poll(60):
            raise RuntimeError("the fake API process did not start within 60 s")
        handle = FakeHandle(str(parent.recv()), pid=process.pid)
        yield handle
        parent.send("stop")
        if parent.poll(30):
            handle.stats = cast(FakeStats, parent.recv())
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
            process.join()


def anthropic_factory(base_url: str) -> ModelFactory:
    """Real `AnthropicModel`s (the `anthropic` SDK) pointed at the fake."""

    def make(name: str) -> Model:
        return AnthropicModel(model=name, api_key="bench", base_url=base_url)

    return make


# --------------------------------------------------------------------------- driving runs


def bench_settings(repo: Path, concurrency: int, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "repo": repo,
        "sandbox": "none",
        "max_concurrency": concurrency,
        "budget_tokens": 1_000_000_000,
    }
    values.update(overrides)
    return Settings.model_validate(values)


def tasks(count: int, start: int = 1) -> list[TaskSpec]:
    """`count` agents, each with its own write scope `work/a<n>`."""
    return [
        TaskSpec(
            prompt=f"BENCH-AGENT-{n}: write work/a{n}/out.txt, read it back, then finish.",
            name=f"a{n}",
            write_scope=[f"work/a{n}"],
        )
        for n in range(start, start + count)
    ]


@dataclass
class RunTiming:
    """One driven run (or several spawned together): times from just before the first spawn."""

    spawned: list[SpawnResult]
    spawn_s: float = 0.0  # until the last spawn() returned
    all_running_s: float = 0.0  # until every agent was seen running (or past it)
    makespan_s: float = 0.0  # until every agent was final
    agents: list[AgentView] = field(default_factory=list[AgentView])
    status_calls: int = 0

    @property
    def failed(self) -> int:
        return sum(1 for a in self.agents if a.status != AgentStatus.SUCCEEDED)


async def drive(
    orch: Orchestrator,
    requests: Sequence[SpawnRequest],
    *,
    timeout_s: float = 300.0,
    wait_s: float = 10.0,
    until_running: bool = False,
) -> RunTiming:
    """Spawn every request, then long-poll `status(since=cursor, wait_s=…)` until every agent is
    final (or, with `until_running`, poll until every agent has been seen past queued/waiting: a
    long-poll answers when the run needs the orchestrator, not on a start). The polls come every
    5 ms, or four times the last answer's time if longer, so that the observer takes at most a
    fifth of a core from what it measures (a whole status answer of 64 agents takes a few ms)."""
    started = time.perf_counter()
    spawned = [await orch.spawn(r) for r in requests]
    timing = RunTiming(spawned=spawned, spawn_s=time.perf_counter() - started)
    run_ids = {s.run_id for s in spawned}
    expected = sum(len(s.agents) for s in spawned)
    cursor: int | None = None
    answer_s = 0.0
    with anyio.fail_after(timeout_s):
        while True:
            if until_running:
                if timing.status_calls:
                    await anyio.sleep(max(0.005, 4 * answer_s))
                asked = time.perf_counter()
                status = await orch.status()
                answer_s = time.perf_counter() - asked
            else:
                status = await orch.status(since=cursor, wait_s=wait_s)
            timing.status_calls += 1
            now = time.perf_counter() - started
            cursor = status.cursor
            agents = [a for r in status.runs if r.run_id in run_ids for a in r.agents]
            if len(agents) < expected:
                continue
            if not timing.all_running_s and all(a.status not in STARTED for a in agents):
                timing.all_running_s = now
                if until_running:
                    timing.agents = agents
                    return timing
            if not any(a.status.active for a in agents):
                timing.makespan_s = now
                timing.agents = agents
                return timing


@asynccontextmanager
async def orchestrator(settings: Settings, factory: ModelFactory) -> AsyncGenerator[Orchestrator]:
    async with Orchestrator(settings, factory) as orch:
        yield orch


def rss_bytes() -> int:
    """This process's resident set size now (Linux /proc)."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def table(rows: Sequence[tuple[str, Any, str]]) -> None:
    """Print (figure, value, note) rows."""
    print(f"{'figure':<34}{'value':>12}  note")
    for name, value, note in rows:
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"{name:<34}{shown:>12}  {note}")
