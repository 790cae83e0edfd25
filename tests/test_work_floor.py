"""The fan-out benchmark's work floor does the work it stands for: each lean agent's branch holds
its file on top of the base, its state and lease rows say so, and its file was read back."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio.lowlevel
import pygit2
import pytest

from benchmarks.common import build_repo
from benchmarks.work_floor import LeanRun

pytestmark = pytest.mark.anyio


async def test_lean_agents_commit_their_files_on_their_branches(tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    build_repo(repository, 5, extra={"work/keep.txt": "kept\n"})
    run = LeanRun.open(repository, tmp_path / "floor")
    try:
        agents = [run.start(n) for n in range(3)]
        for agent in agents:
            agent.turn('{"turn": 0}')
            await agent.write(b"floor %d\n" % agent.n)
        assert [agent.read() for agent in agents] == [b"floor %d\n" % n for n in range(3)]
        for agent in agents:
            agent.finish()
    finally:
        run.close()
    repo = pygit2.Repository(str(repository))
    base = repo.revparse_single("main").peel(pygit2.Commit)
    for n in range(3):
        head = repo.revparse_single(f"floor/a{n}").peel(pygit2.Commit)
        assert head.parents[0].id == base.id
        tree = head.tree
        assert tree[f"work/a{n}/out.txt"].peel(pygit2.Blob).data == b"floor %d\n" % n
        assert tree["work/keep.txt"].peel(pygit2.Blob).data == b"kept\n"  # the base's kept
        assert len(head.tree.diff_to_tree(base.tree)) == 1
    state = sqlite3.connect(tmp_path / "floor" / "state.db")
    statuses = dict(state.execute("SELECT id, status FROM agents").fetchall())
    assert statuses == {f"a{n}": "succeeded" for n in range(3)}
    kinds = [k for (k,) in state.execute("SELECT kind FROM events WHERE agent = 'a0'")]
    assert kinds == ["leased", "running", "turn", "succeeded"]
    leases = sqlite3.connect(tmp_path / "floor" / "leases.db")
    assert leases.execute("SELECT count(*) FROM leases").fetchone() == (0,)
    transcript = (tmp_path / "floor" / "layers" / "a1" / "transcript.jsonl").read_text()
    assert transcript == '{"turn": 0}\n'


async def test_a_lean_write_refuses_once_its_lease_is_gone(tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    build_repo(repository, 2)
    run = LeanRun.open(repository, tmp_path / "floor")
    try:
        agent = run.start(0)
        run.leases.execute("DELETE FROM leases")
        with pytest.raises(RuntimeError, match="lease"):
            await agent.write(b"x\n")
        assert not (agent.view / "work" / "a0" / "out.txt").exists()
    finally:
        run.close()
    await anyio.lowlevel.checkpoint()
