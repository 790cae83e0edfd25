"""Running `server_proc.py` in child processes and looking at a repository from outside."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from tests.orchestration.scripts import git

ROOT = Path(__file__).resolve().parents[2]


class Child:
    """A `server_proc` child in its own process group; its output goes to files."""

    def __init__(self, mode: str, config: BaseModel, logs: Path) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.out_path = logs / f"{mode}-{os.getpid()}-{time.monotonic_ns()}.out"
        self.err_path = self.out_path.with_suffix(".err")
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.reliability.server_proc",
                    mode,
                    config.model_dump_json(),
                ],
                cwd=ROOT,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")[-4000:]

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def kill_group(self) -> None:
        """SIGKILL the whole process group (the server and any child it started)."""
        self.kill(group=True)

    def kill(self, *, group: bool) -> None:
        """SIGKILL the server, or its whole process group (then a git child dies with it)."""
        try:
            if group:
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                os.kill(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        if not group:
            self._wait_group_gone()

    def _wait_group_gone(self, timeout_s: float = 30.0) -> None:
        """Children left running by a lone SIGKILL (a git command) finish on their own."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.01)
        os.killpg(self.proc.pid, signal.SIGKILL)

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill_group()
            raise AssertionError(
                f"child did not finish in {timeout_s} s:\n{self.stderr()}"
            ) from None


def wait_for(
    child: Child, ready: Callable[[], bool], timeout_s: float = 60.0, poll_s: float = 0.005
) -> None:
    """Poll `ready` until it holds; fail (with the child's stderr) if the child exits first."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if child.proc.poll() is not None:
            raise AssertionError(
                f"child exited ({child.proc.returncode}) before the point:\n{child.stderr()}"
            )
        if time.monotonic() > deadline:
            child.kill_group()
            raise AssertionError(f"point not reached in {timeout_s} s:\n{child.stderr()}")
        time.sleep(poll_s)


def integrity(db: Path) -> str:
    """`PRAGMA integrity_check` of an SQLite file ("ok" when sound)."""
    conn = sqlite3.connect(db, timeout=30)
    try:
        rows = conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()
    return "; ".join(str(r[0]) for r in rows)


def fsck(repo: Path) -> tuple[bool, str]:
    proc = subprocess.run(
        ["git", "fsck", "--strict", "--no-progress"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
    )
    text = (proc.stdout + proc.stderr).strip()
    bad = [line for line in text.splitlines() if not line.startswith(("dangling", "notice"))]
    return proc.returncode == 0 and not bad, text[-2000:]


def trailer(message: str, key: str) -> str | None:
    for line in message.splitlines():
        if line.startswith(f"{key}: "):
            return line.split(": ", 1)[1].strip()
    return None


def blob(repo: Path, commit: str, path: str) -> str | None:
    proc = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{commit}:{path}"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout.strip() or None


def changed_paths(repo: Path, old: str, new: str) -> list[str]:
    out = git(repo, "diff", "--no-renames", "--name-only", "-z", old, new)
    return sorted(p for p in out.split("\x00") if p)


def merge_chain_problems(repo: Path, base: str, head: str) -> tuple[list[str], list[str]]:
    """Check the canonical history from `base` to `head`: linear, and each commit one whole merge
    of one agent (its trailers name the agent, its base and its commit; the commit changes exactly
    the agent's paths, to the agent's content). Returns (problems, agent ids merged)."""
    problems: list[str] = []
    agents: list[str] = []
    if git(repo, "merge-base", base, head).strip() != base:
        return [f"{head[:12]} does not descend from the old head {base[:12]}"], agents
    lines = git(repo, "rev-list", "--parents", "--reverse", f"{base}..{head}").splitlines()
    for line in lines:
        commit, *parents = line.split()
        if len(parents) != 1:
            problems.append(f"{commit[:12]} has {len(parents)} parents")
            continue
        parent = parents[0]
        message = git(repo, "log", "-1", "--format=%B", commit)
        agent = trailer(message, "Fanout-Agent")
        agent_base = trailer(message, "Fanout-Base")
        agent_commit = trailer(message, "Fanout-Agent-Commit")
        if agent is None or agent_base is None or agent_commit is None:
            problems.append(f"{commit[:12]} is not a fanout merge commit: {message[:200]!r}")
            continue
        agents.append(agent)
        theirs = changed_paths(repo, agent_base, agent_commit)
        ours = changed_paths(repo, parent, commit)
        if ours != theirs:
            problems.append(f"{commit[:12]} ({agent}) changes {ours}, the agent changed {theirs}")
            continue
        for path in ours:
            if blob(repo, commit, path) != blob(repo, agent_commit, path):
                problems.append(f"{commit[:12]} ({agent}): {path} differs from the agent's")
    return problems, agents


def fanout_refs(repo: Path) -> dict[str, str]:
    out = git(repo, "for-each-ref", "--format=%(refname) %(objectname)", "refs/heads/fanout")
    refs: dict[str, str] = {}
    for line in out.splitlines():
        name, _, sha = line.partition(" ")
        if sha:
            refs[name] = sha
    return refs


def is_ancestor(repo: Path, old: str, new: str) -> bool:
    proc = subprocess.run(["git", "merge-base", "--is-ancestor", old, new], cwd=repo, check=False)
    return proc.returncode == 0


def tree_paths(repo: Path, commit: str) -> list[str]:
    out = git(repo, "ls-tree", "-r", "--name-only", "-z", commit)
    return [p for p in out.split("\x00") if p]
