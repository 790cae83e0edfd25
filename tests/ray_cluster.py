"""A multi-node Ray cluster on this machine for tests and benchmarks, whose nodes cannot see the
server's repository.

The cluster runs in a child process (`python -m tests.ray_cluster`) inside a mount namespace of
its own where each hidden path is covered by an empty tmpfs: every raylet and every worker
process of the cluster inherits that namespace, so an agent's worker cannot reach the
repository through the filesystem, only through Ray. Each worker node gets its own cache
directory (`FANOUT_WORKER_CACHE`), as separate machines would. The child reads commands on stdin
(`kill <i>`: the i-th worker node dies at once; `add`: one more worker node; `nodes`:
their ids) and answers each
with a line of JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any


class LocalCluster:
    """`nodes` worker nodes of `cpus` CPUs each, and a head node with no CPU."""

    def __init__(self, nodes: int, cpus: int, hidden: Sequence[Path]) -> None:
        self.nodes = nodes
        self.cpus = cpus
        self.hidden = [Path(p) for p in hidden]
        self.address = ""
        self.node_ip = ""
        self.caches = Path(tempfile.mkdtemp(prefix="fanout-ray-nodes-"))
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> LocalCluster:
        unshare = shutil.which("unshare")
        if unshare is None:
            raise RuntimeError("the cluster needs util-linux's unshare")
        mounts = " && ".join(f"mount -t tmpfs tmpfs '{p}'" for p in self.hidden) or "true"
        argv = [
            unshare,
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            f'{mounts} && exec "$0" -m tests.ray_cluster "$@"',
            sys.executable,
            str(self.nodes),
            str(self.cpus),
            str(self.caches),
        ]
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        ready = self._read()
        self.address = str(ready["address"])
        self.node_ip = str(ready["node_ip"])
        return self

    def _read(self) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the cluster process ended (exit {self._proc.wait()})")
        return json.loads(line)

    def command(self, text: str) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(text + "\n")
        self._proc.stdin.flush()
        return self._read()

    def node_ids(self) -> list[str]:
        """The Ray node ids of the worker nodes, in order."""
        return [str(n) for n in self.command("nodes")["nodes"]]

    def kill_node(self, index: int) -> dict[str, Any]:
        """Kill worker node `index` (0-based) at once, as a machine that dies."""
        return self.command(f"kill {index}")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._proc is not None:
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                self.command("quit")
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            for stream in (self._proc.stdin, self._proc.stdout):
                if stream is not None:
                    stream.close()
        # the nodes' agent processes end on their own once their hosts are gone (they are
        # detached), and may still be writing their caches for a moment
        for _ in range(40):
            shutil.rmtree(self.caches, ignore_errors=True)
            if not self.caches.exists():
                break
            time.sleep(0.25)


def _main(argv: list[str]) -> None:
    from ray.cluster_utils import Cluster

    nodes, cpus, caches = int(argv[0]), int(argv[1]), Path(argv[2])
    cluster: Any = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            "env_vars": {"FANOUT_WORKER_CACHE": str(caches / "head")},
        },
    )
    workers: list[Any] = []

    def add() -> None:
        index = len(workers)
        workers.append(
            cluster.add_node(
                num_cpus=cpus,
                env_vars={"FANOUT_WORKER_CACHE": str(caches / f"node-{index}")},
            )
        )

    for _ in range(nodes):
        add()
    cluster.wait_for_nodes()
    ip = cluster.head_node.node_ip_address
    print(json.dumps({"address": cluster.address, "node_ip": ip}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "quit":
            break
        if words[0] == "kill":
            node = workers[int(words[1])]
            cluster.remove_node(node, allow_graceful=False)
            print(json.dumps({"killed": int(words[1])}), flush=True)
        elif words[0] == "nodes":
            print(json.dumps({"nodes": [node.node_id for node in workers]}), flush=True)
        elif words[0] == "add":
            add()
            cluster.wait_for_nodes()
            print(json.dumps({"nodes": len(workers)}), flush=True)
        else:
            print(json.dumps({"error": f"unknown command {words[0]!r}"}), flush=True)
    cluster.shutdown()
    print(json.dumps({"stopped": True}), flush=True)
    os._exit(0)


if __name__ == "__main__":
    _main(sys.argv[1:])
