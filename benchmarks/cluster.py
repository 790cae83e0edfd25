"""Agents on a Ray cluster: does the run use the cluster's capacity, and what does shipping cost?

A local cluster of 4 worker nodes declaring 2 CPUs each (made by `tests.ray_cluster`, its
processes unable to see the repository), against one node of 2 CPUs. 16 agents (quick: 8),
each of which writes a file, runs one command that sleeps for a fixed time and finishes. Each
agent reserves one CPU, so Ray's resource accounting decides how many run at once where. On
this 2-core machine the figure measures that the cluster's capacity is used, not the cores.

Figures:
- `cluster_speedup_4_nodes`: makespan (spawn until every agent is final) on one node / on 4
  nodes, on a small repository (50 files); target >= 3.2. Beside it, `floor_speedup_4_nodes`:
  the same sleeps as plain Ray tasks of one CPU on the same clusters, which is what Ray itself
  gives on this machine.
- `ship_ms_per_agent`: the same 4-node run on a repository of 10,000 files: packing the start
  commit (once per commit), receiving it on the nodes (once per node), and packing and landing
  each agent's branch (every checkpoint), summed and divided by its agents; target <= 300.
  `makespan_4_nodes_10k_over_small` compares the two 4-node makespans: each node checks the
  10,000-file base out once for its views, and on this machine the 4 nodes share 2 cores.
- `agents_lost`: agents of both runs that did not succeed and merge; target 0.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import anyio

from benchmarks.common import build_repo, fake_in_process, scratch, table
from fakeapi import FakeRequest, Reply, finish, tool_use
from orchestration.config import Settings
from orchestration.contracts import (
    AgentStatus,
    MergeOutcome,
    MergeRequest,
    SpawnRequest,
    TaskSpec,
)
from orchestration.orchestrator import Orchestrator

FILES = 10_000
SMALL_FILES = 50
_SLEEP = re.compile(r"SLEEP-(\d+(?:\.\d+)?)")
_OUT = re.compile(r"WRITE-(out/a\d+)")


def _ray() -> Any:
    import ray

    return ray


def sleeper(request: FakeRequest) -> Reply:
    """An agent that writes one file (its task names it), runs `sleep <s>` (its task says
    `SLEEP-<s>`), then finishes."""
    turn = request.assistant_turns
    if turn == 0:
        found = _OUT.search(request.system_text)
        path = found.group(1) if found else "out/x"
        return tool_use("write_file", path=f"{path}/done.txt", content="done\n")
    if turn == 1:
        found = _SLEEP.search(request.system_text)
        seconds = found.group(1) if found else "1"
        return tool_use("run_command", command=f"sleep {seconds}")
    return finish("slept")


async def _product(repo: Path, address: str, agents: int, sleep_s: float) -> dict[str, float]:
    settings = Settings(
        repo=repo,
        sandbox="none",
        model="claude-sonnet-5-5",
        executor="ray",
        ray_address=address,
        max_concurrency=64,
        max_running=64,
    )
    async with Orchestrator(settings) as orch:
        # connected, its nodes' hosts up, before the clock starts: as a running server
        await orch.executor.prepare()
        started = time.perf_counter()
        spawned = await orch.spawn(
            SpawnRequest(
                tasks=[
                    TaskSpec(
                        prompt=f"Task {i}: WRITE-out/a{i} SLEEP-{sleep_s:g}",
                        name=f"a{i}",
                        write_scope=[f"out/a{i}"],
                    )
                    for i in range(agents)
                ],
                max_concurrency=min(agents, 64),
            )
        )
        cursor: int | None = None
        with anyio.fail_after(600):
            while True:
                status = await orch.status(run_id=spawned.run_id, since=cursor, wait_s=10)
                cursor = status.cursor
                views = status.runs[0].agents
                if not any(v.status.active for v in views):
                    break
        makespan = time.perf_counter() - started
        merged = await orch.merge(MergeRequest(run_id=spawned.run_id))
        ok = sum(
            1
            for v in views
            if v.status == AgentStatus.SUCCEEDED
            and any(
                r.agent_id == v.agent_id and r.outcome == MergeOutcome.MERGED for r in merged.agents
            )
        )
        stats: dict[str, float] = dict(getattr(orch.executor, "stats", {}))
        nodes = len({v.node for v in views if v.node})
    _ray().shutdown()
    return {"makespan_s": makespan, "lost": agents - ok, "nodes": nodes, **stats}


def _floor(address: str, node_ip: str, agents: int, sleep_s: float) -> float:
    """The same sleeps as Ray tasks of one CPU each, on the same cluster."""
    ray = _ray()

    ray.init(address=address, _node_ip_address=node_ip, log_to_driver=False)

    @ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
    def hold(seconds: float) -> None:
        time.sleep(seconds)

    ray.get(hold.remote(0.0))  # the job's first worker
    started = time.perf_counter()
    ray.get([hold.remote(sleep_s) for _ in range(agents)])
    elapsed = time.perf_counter() - started
    ray.shutdown()
    return elapsed


def _on_cluster(
    root: Path, nodes: int, *, agents: int, sleep_s: float, base_url: str, big: bool
) -> dict[str, Any]:
    """On a new cluster of `nodes`: the floor, the product on a small repository and, with
    `big`, the product again on a repository of `FILES` files (figures prefixed `big_`)."""
    from tests.ray_cluster import LocalCluster

    small = root / f"small-{nodes}"
    build_repo(small, SMALL_FILES)
    if big:
        build_repo(root / f"big-{nodes}", FILES)
    with LocalCluster(nodes, 2, [root]) as cluster:
        os.environ["FANOUT_RAY_NODE_IP"] = cluster.node_ip
        os.environ["ANTHROPIC_BASE_URL"] = base_url
        os.environ.setdefault("ANTHROPIC_API_KEY", "sk-bench-fake")
        found: dict[str, Any] = {
            "floor_s": _floor(cluster.address, cluster.node_ip, agents, sleep_s)
        }
        found.update(anyio.run(_product, small, cluster.address, agents, sleep_s))
        if big:
            product = anyio.run(_product, root / f"big-{nodes}", cluster.address, agents, sleep_s)
            found.update({f"big_{k}": v for k, v in product.items()})
    return found


def run(quick: bool) -> dict[str, float | int]:
    agents, sleep_s = (8, 2.0) if quick else (16, 8.0)
    started = time.perf_counter()
    saved = {k: os.environ.get(k) for k in ("FANOUT_RAY_NODE_IP", "ANTHROPIC_BASE_URL")}
    try:
        with scratch("bench-cluster-") as tmp, fake_in_process(sleeper) as fake:
            root = Path(tmp)
            url = fake.base_url
            four = _on_cluster(root, 4, agents=agents, sleep_s=sleep_s, base_url=url, big=True)
            one = _on_cluster(root, 1, agents=agents, sleep_s=sleep_s, base_url=url, big=False)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    speedup = one["makespan_s"] / four["makespan_s"]
    floor_speedup = one["floor_s"] / four["floor_s"]
    ran = max(four.get("big_agents", 0), 1)
    ship_parts = [four.get(f"big_{k}", 0) for k in ("pack_ms", "receive_ms", "ship_ms")]
    ship = sum(ship_parts) / ran
    lost = int(four["lost"] + four["big_lost"] + one["lost"])
    host_ms = four.get("hosts_ms", 0) / max(four.get("hosts", 0), 1)
    figures: dict[str, float | int] = {
        "cluster_speedup_4_nodes": round(speedup, 3),
        "floor_speedup_4_nodes": round(floor_speedup, 3),
        "ship_ms_per_agent": round(ship, 1),
        "makespan_4_nodes_10k_over_small": round(four["big_makespan_s"] / four["makespan_s"], 3),
        "agents_lost": lost,
    }
    note = " (quick)" if quick else ""
    table(
        [
            (
                "cluster_speedup_4_nodes",
                figures["cluster_speedup_4_nodes"],
                f"{agents} agents{note}, each a {sleep_s:g} s command holding 1 CPU, "
                f"{SMALL_FILES} files: 1 node {one['makespan_s']:.2f} s / 4 nodes "
                f"{four['makespan_s']:.2f} s (on {four['nodes']} nodes); target >= 3.2",
            ),
            (
                "floor_speedup_4_nodes",
                figures["floor_speedup_4_nodes"],
                f"the same sleeps as plain Ray tasks: {one['floor_s']:.2f} s / "
                f"{four['floor_s']:.2f} s",
            ),
            (
                "ship_ms_per_agent",
                figures["ship_ms_per_agent"],
                f"{FILES:,} files, 4 nodes: pack {ship_parts[0]:.0f} ms once, received "
                f"{ship_parts[1]:.0f} ms over the nodes, branches back {ship_parts[2]:.0f} ms, "
                f"over {ran} agents; target <= 300",
            ),
            (
                "makespan_4_nodes_10k_over_small",
                figures["makespan_4_nodes_10k_over_small"],
                f"the 4-node run on {FILES:,} files: {four['big_makespan_s']:.2f} s (each node "
                f"checks the base out once, and this machine's 4 nodes share 2 cores); agents "
                f"got their repository and workspace in {four.get('big_prepare_ms', 0) / ran:.0f}"
                " ms on average",
            ),
            (
                "(hosts)",
                "",
                f"a node's host up in {host_ms:.0f} ms ({four.get('hosts', 0):g} hosts, when the "
                "server connects, before the clock)",
            ),
            ("agents_lost", lost, "agents of all runs that did not succeed and merge; target 0"),
        ]
    )
    print(f"(total {time.perf_counter() - started:.1f} s)")
    return figures
