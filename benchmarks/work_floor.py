"""The floor of an agent's durable work: what the fan-out's agents must do beside their model
calls, done as leanly as Python on this machine allows, for `benchmarks.fanout`.

Per run, once: the base commit checked out (`git read-tree -u`, as the product does) into a
directory that is every view's lower layer, and two SQLite databases in WAL mode with
`synchronous=NORMAL` (the state and the lease table, as the product opens them). Per agent:
- start: its lease row, its state row (leased), its layers, its branch, its overlay view
  mounted (when this process may mount; else the view is a plain directory), its state row
  (running);
- each turn: a transcript line and a state row;
- its write: the lease read back (the fence), the file written atomically in the view (a
  temporary file, `fsync`, rename, `fsync` of the directory) in a worker thread, an audit line;
- its read: the file read back, an audit line;
- its end: the blob hashed from the upper layer, its trees and commit written, its branch moved
  in a ref transaction, its state row (succeeded), its lease row deleted.

Nothing here is shared with the product's code beyond the mount primitive: no bus, no
permissions, no schemas, no events to wait on. The views are unmounted after the timing
(`close`)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pygit2

from orchestration.workspace import overlay

_READ_TREE = ("read-tree", "--reset", "-u")
_SIGNATURE = pygit2.Signature("fanout floor", "floor@fanout.invalid", 1700000000, 0)


def _database(path: Path, schema: str) -> sqlite3.Connection:
    # opened in a worker thread, used in the event loop's: one thread at a time
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(schema)
    return db


@dataclass
class LeanRun:
    """One run's shared part: the repository, its base checkout and the two databases."""

    root: Path
    repo: pygit2.Repository
    head: pygit2.Commit
    base: Path
    state: sqlite3.Connection
    leases: sqlite3.Connection
    mounts: bool
    mounted: list[Path] = field(default_factory=list[Path])

    @classmethod
    def open(cls, repository: Path, root: Path) -> LeanRun:
        """The run over `repository`'s HEAD, its files under `root` (made here)."""
        root.mkdir(parents=True)
        repo = pygit2.Repository(str(repository))
        head = repo.head.peel(pygit2.Commit)
        base = root / "base"
        base.mkdir()
        subprocess.run(
            ["git", "--git-dir", repo.path, "--work-tree", str(base), *_READ_TREE, str(head.id)],
            env={**os.environ, "GIT_INDEX_FILE": str(root / "index")},
            check=True,
            capture_output=True,
        )
        state = _database(
            root / "state.db",
            "CREATE TABLE agents(id TEXT PRIMARY KEY, status TEXT, doc TEXT);"
            "CREATE TABLE events(seq INTEGER PRIMARY KEY, agent TEXT, kind TEXT, doc TEXT);",
        )
        leases = _database(
            root / "leases.db", "CREATE TABLE leases(id TEXT PRIMARY KEY, scope TEXT, token INT);"
        )
        return cls(root, repo, head, base, state, leases, overlay.in_private_mounts())

    def event(self, agent: str, kind: str, status: str) -> None:
        """One state transition: the agent's row and an event, in one transaction."""
        db = self.state
        db.execute("BEGIN IMMEDIATE")
        doc = json.dumps({"id": agent, "status": status})
        db.execute("INSERT OR REPLACE INTO agents VALUES (?, ?, ?)", (agent, status, doc))
        db.execute(
            "INSERT INTO events(agent, kind, doc) VALUES (?, ?, ?)",
            (agent, kind, json.dumps({"kind": kind})),
        )
        db.execute("COMMIT")

    def start(self, n: int) -> LeanAgent:
        """Agent `n`'s lease, state, layers, branch and view."""
        name = f"a{n}"
        self.leases.execute("BEGIN IMMEDIATE")
        self.leases.execute("INSERT INTO leases VALUES (?, ?, ?)", (name, f"work/{name}", n))
        self.leases.execute("COMMIT")
        self.event(name, "leased", "queued")
        layers = self.root / "layers" / name
        upper, work, view = layers / "upper", layers / "work", self.root / "views" / name
        for d in (upper, work, view):
            d.mkdir(parents=True)
        self.repo.create_branch(f"floor/{name}", self.head)
        if self.mounts:
            overlay.mount_overlay([self.base], upper, work, view)
            self.mounted.append(view)
        self.event(name, "running", "running")
        return LeanAgent(self, n, name, layers, view if self.mounts else upper)

    def close(self) -> None:
        """Unmount the views and close the databases (after the timing)."""
        for view in self.mounted:
            overlay.unmount(view)
        self.state.close()
        self.leases.close()
        self.repo.free()


@dataclass
class LeanAgent:
    run: LeanRun
    n: int
    name: str
    layers: Path
    view: Path

    @property
    def _file(self) -> str:
        return f"work/{self.name}/out.txt"

    def turn(self, payload: str) -> None:
        with open(self.layers / "transcript.jsonl", "a", encoding="utf-8") as f:
            f.write(payload + "\n")
        self.run.event(self.name, "turn", "running")

    def _audit(self, op: str) -> None:
        with open(self.layers / "audit.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"op": op, "path": self._file}) + "\n")

    async def write(self, data: bytes) -> None:
        token = self.run.leases.execute(
            "SELECT token FROM leases WHERE id = ?", (self.name,)
        ).fetchone()
        if token is None or token[0] != self.n:
            raise RuntimeError(f"the floor's lease of {self.name} is gone")
        await anyio.to_thread.run_sync(self._write, data)
        self._audit("write_file")

    def _write(self, data: bytes) -> None:
        parent = self.view / "work" / self.name
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / ".out.txt.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, parent / "out.txt")
        dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def read(self) -> bytes:
        data = (self.view / self._file).read_bytes()
        self._audit("read_file")
        return data

    def finish(self) -> None:
        """Commit the upper layer's one file onto the base tree, move the branch, record it."""
        run, repo = self.run, self.run.repo
        blob = repo.create_blob_fromdisk(str(self.layers / "upper" / self._file))
        leaf = repo.TreeBuilder()
        leaf.insert("out.txt", blob, pygit2.GIT_FILEMODE_BLOB)
        base = run.head.tree
        agents = (
            repo.TreeBuilder(base["work"].peel(pygit2.Tree))
            if "work" in base
            else repo.TreeBuilder()
        )
        agents.insert(self.name, leaf.write(), pygit2.GIT_FILEMODE_TREE)
        top = repo.TreeBuilder(base)
        top.insert("work", agents.write(), pygit2.GIT_FILEMODE_TREE)
        commit = repo.create_commit(
            None, _SIGNATURE, _SIGNATURE, "agent work\n", top.write(), [run.head.id]
        )
        ref = f"refs/heads/floor/{self.name}"
        with repo.transaction() as txn:
            txn.lock_ref(ref)
            txn.set_target(ref, commit, message="floor: commit agent work")
        run.event(self.name, "succeeded", "succeeded")
        run.leases.execute("BEGIN IMMEDIATE")
        run.leases.execute("DELETE FROM leases WHERE id = ?", (self.name,))
        run.leases.execute("COMMIT")
