"""A verified head: before the branch moves, the would-be merged tree is checked out in a scratch
directory and the run's verification command runs there, in the sandbox agents' commands run
in. The batch is verified once; only when it fails is it narrowed down, by halving, to the
agent whose change makes it fail (that agent is `verify_failed`, the others land).

Each server keeps one scratch checkout per repository, with its own index, and moves it from
tree to tree: what a command left (untracked and ignored files, a planted `.git`, changed files)
is cleaned away and only the files that differ are written, so a verification costs what the
merge changes, not the size of the repository. Git runs pinned there (`toolbus.gitcmd`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import anyio

from orchestration import workspace as ws_mod
from orchestration.config import Settings
from orchestration.errors import RepositoryError
from orchestration.workspace.included import copy_included
from orchestration.workspace.pinning import pin_at
from toolbus import gitcmd
from toolbus.terminal import SandboxMode, Terminal, TerminalConfig
from toolbus.trees import remove_tree

OUTPUT_TAIL_CHARS = 2_000
_LOCKS: dict[Path, anyio.Lock] = {}
SCRATCH_DIR = "verify"


@dataclass(frozen=True)
class Verdict:
    """One run of the verification command on one tree."""

    passed: bool
    exit_code: int | None
    tail: str  # the end of its output
    timed_out: bool = False

    def describe(self) -> str:
        how = "timed out" if self.timed_out else f"exited {self.exit_code}"
        return f"the verification command {how}; the end of its output:\n{self.tail}"


def scratch_root(repo: ws_mod.GitRepo) -> Path:
    return repo.state_dir / SCRATCH_DIR


def remove_leftovers(repo: ws_mod.GitRepo, live_servers: set[str]) -> None:
    """What servers killed during a verification left (nothing of it was applied); each server
    verifies under a directory of its own."""
    root = scratch_root(repo)
    if not root.is_dir():
        return
    for owner in root.iterdir():
        if owner.name not in live_servers:
            remove_tree(owner, ignore_errors=True)


class Verifier:
    """Runs `command` on trees of `repo` (by tree id), each in its own scratch checkout."""

    def __init__(
        self,
        repo: ws_mod.GitRepo,
        settings: Settings,
        command: str,
        timeout_s: float,
        *,
        owner: str,
    ) -> None:
        self.repo = repo
        self.owner = owner
        self.settings = settings
        self.command = command
        self.timeout_s = timeout_s
        self.runs = 0

    @property
    def _base(self) -> Path:
        return scratch_root(self.repo) / self.owner

    def _checkout(self, tree_id: str) -> Path:
        """The scratch checkout at `tree_id`, clean; made anew when missing or unusable."""
        base = self._base
        work, index = base / "tree", base / "index"
        env = {"GIT_INDEX_FILE": str(index)}
        for anew in (False, True):
            fresh = anew or not (work.is_dir() and index.is_file())
            if fresh:
                remove_tree(base, ignore_errors=True)
                work.mkdir(parents=True)
            pinned = pin_at(self.repo.git_dir, work)
            if not fresh:
                # what the last command left, nested repositories included
                cleaned = gitcmd.run(work, ["clean", "-ffdxq"], pinned=pinned, env=env)
                if cleaned.returncode != 0:
                    continue
            moved = gitcmd.run(
                work, ["read-tree", "--reset", "-u", tree_id], pinned=pinned, env=env
            )
            if moved.returncode == 0:
                if self.settings.include:
                    copy_included(self.repo.root, work, self.settings.include)
                return work
            if fresh:
                raise RepositoryError(
                    f"could not check out tree {tree_id[:12]} for verification: "
                    + moved.stderr.strip()
                )
        raise RepositoryError(f"could not check out tree {tree_id[:12]} for verification")

    async def verify(self, tree_id: str) -> Verdict:
        """Run the command on a checkout of the tree (one at a time per scratch checkout)."""
        self.runs += 1
        lock = _LOCKS.setdefault(self._base, anyio.Lock())
        async with lock:
            return await self._verify_locked(tree_id)

    async def _verify_locked(self, tree_id: str) -> Verdict:
        home = self._base / "home"
        try:
            work = await anyio.to_thread.run_sync(self._checkout, tree_id)
            terminal = Terminal(
                work,
                TerminalConfig(
                    sandbox=SandboxMode(self.settings.sandbox),
                    allow_network=self.settings.allow_network,
                    env_passthrough=tuple(self.settings.env_passthrough),
                    default_timeout_s=self.timeout_s,
                    max_timeout_s=max(self.timeout_s, 1.0),
                    hidden_paths=(self.repo.state_dir,),
                    extra_ro_paths=self.settings.sandbox_ro_paths,
                    home=home,
                    limits=self.settings.command_limits,
                ),
            )
            try:
                result = await terminal.run(self.command, self.timeout_s)
            finally:
                await anyio.to_thread.run_sync(terminal.close)
            passed = result.exit_code == 0 and not result.timed_out
            return Verdict(
                passed=passed,
                exit_code=result.exit_code,
                tail=result.output[-OUTPUT_TAIL_CHARS:],
                timed_out=result.timed_out,
            )
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(partial(remove_tree, home, ignore_errors=True))


async def first_failing(
    verifier: Verifier, trees: Sequence[str], head_tree: str
) -> tuple[int, Verdict] | None:
    """The smallest k (1-based) such that the tree after the first k agents fails, with its
    verdict; None when the last tree passes. `trees[i]` is the tree after agent i+1."""
    last = await verifier.verify(trees[-1])
    if last.passed:
        return None
    low, high, failing = 0, len(trees), last  # after `low` agents passes, after `high` fails
    start = await verifier.verify(head_tree)
    if not start.passed:
        return 0, start
    while high - low > 1:
        mid = (low + high) // 2
        verdict = await verifier.verify(trees[mid - 1])
        if verdict.passed:
            low = mid
        else:
            high, failing = mid, verdict
    return high, failing
