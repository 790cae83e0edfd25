"""Model faults at a 20 % rate, through the real anthropic client against fakeapi.

Each request to the fake fails with probability 0.2 (seeded), drawn from: 429 with a retry-after
far above the cap, 529, 500, a stall past the client timeout, a malformed body, an error
mid-stream (streaming case; on a plain request it is the matching HTTP error). One of each is
also queued first, so every kind is served. Checked: every run settles; an agent fails only by
its own model error (stop reason `model_error`) and the others succeed and merge; no retry wait
exceeds the configured cap (from the transcripts), and no gap the fake saw after a 429 comes near
the 5 s it asked (the gap also holds the pace a 429 sets for every agent); the run's token totals
equal the sum of what the fake charged for its successful answers.
"""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from fakeapi import (
    FakeAnthropic,
    Fault,
    FaultPlan,
    LoggedRequest,
    Malformed,
    Stall,
    StreamError,
    by_key,
    overloaded,
    rate_limited,
    server_error,
    writes_file,
)
from orchestration.config import Settings
from orchestration.contracts import MergeRequest, SpawnRequest, StatusResult, TaskSpec
from orchestration.model import Model
from orchestration.orchestrator import Orchestrator
from orchestration.providers.anthropic import AnthropicModel, HttpClientKind
from orchestration.retry import RetryPolicy
from tests.orchestration.scripts import make_repo
from tests.reliability.conftest import FULL, Ledger

pytestmark = pytest.mark.anyio

G_SETTLE = "G7a model faults: runs settle; failures stay with their agent"
G_WAIT = "G7b model faults: no retry wait exceeds the cap"
G_TOKENS = "G7c model faults: tokens accounted (totals = fake's charges)"

RETRY_AFTER_S = 5.0  # what the 429s ask for: far above the cap
CAP_S = 0.3
TIMEOUT_S = 1.0
AGENTS = 24 if FULL else 10
FAULTS: tuple[Fault, ...] = (
    rate_limited(RETRY_AFTER_S),
    overloaded(),
    server_error(),
    Stall(600.0),
    Malformed(),
    StreamError(),
)


def _next_of_same_agent(
    log: list[LoggedRequest], keys: list[str]
) -> list[tuple[LoggedRequest, LoggedRequest | None]]:
    """Each request with the next one of the same agent (None for its last)."""
    by_agent: dict[str, list[LoggedRequest]] = {}
    for e in log:
        key = next((k for k in keys if f"<<{k}>>" in json.dumps(e.body.get("system"))), "?")
        by_agent.setdefault(key, []).append(e)
    pairs: list[tuple[LoggedRequest, LoggedRequest | None]] = []
    for entries in by_agent.values():
        pairs.extend(zip(entries, [*entries[1:], None], strict=True))
    return pairs


def _kind(fault: object) -> str:
    return type(fault).__name__ if not hasattr(fault, "status") else f"http {fault.status}"  # pyright: ignore[reportAttributeAccessIssue, reportUnknownMemberType]


async def _settle(orch: Orchestrator, run_id: str) -> StatusResult:
    cursor: int | None = None
    with anyio.fail_after(240):
        while True:
            status = await orch.status(run_id=run_id, since=cursor, wait_s=2)
            cursor = status.cursor
            if not any(a.status.active for a in status.runs[0].agents):
                return status


@pytest.mark.parametrize("http_client", ["httpx", "aiohttp"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("seed", [7, 8, 9] if FULL else [7])
async def test_model_faults_at_20_percent(
    stream: bool, seed: int, http_client: HttpClientKind, tmp_path: Path, ledger: Ledger
) -> None:
    repo = make_repo(tmp_path / "repo")
    keys = [f"k{i:02d}" for i in range(1, AGENTS + 1)]
    handler = by_key({f"<<{k}>>": writes_file(f"{k}/f.txt", f"{k}\n") for k in keys})
    plan = FaultPlan(rate=0.2, seed=seed, faults=FAULTS)
    for fault in FAULTS:
        plan.queue(fault)
    label = f"{'stream' if stream else 'plain'} seed {seed} over {http_client}"
    settings = Settings.model_validate(
        {
            "repo": repo,
            "sandbox": "none",
            "model_timeout_s": TIMEOUT_S,
            "retry_after_cap_s": CAP_S,
            "retry_max_attempts": 6,
            # the SDK streams from 21,334 max_tokens on: that is where errors arrive mid-stream
            "max_output_tokens": 32_000 if stream else 4_096,
            "max_concurrency": 8,
        }
    )
    policy = RetryPolicy(max_attempts=6, retry_after_cap_s=CAP_S)
    async with FakeAnthropic(handler, faults=plan).serve() as fake:

        def factory(name: str) -> Model:
            return AnthropicModel(
                model=name,
                base_url=fake.base_url,
                api_key="sk-fake",
                timeout_s=TIMEOUT_S,
                http_client=http_client,
            )

        async with Orchestrator(settings, factory) as orch:
            spawned = await orch.spawn(
                SpawnRequest(
                    tasks=[
                        TaskSpec(prompt=f"<<{k}>> write {k}/f.txt", name=k, write_scope=[k])
                        for k in keys
                    ]
                )
            )
            status = await _settle(orch, spawned.run_id)
            merged = await orch.merge(MergeRequest(run_id=spawned.run_id))
        log = fake.requests

    # --- settle, and failures stay with their agent ----------------------------------------
    views = status.runs[0].agents
    served = sorted({_kind(e.fault) for e in log if e.fault is not None})
    # on a plain request a StreamError is served as its HTTP error (529 here); the run's first
    # request streams either way (it tells when its response begins: `orchestration.caching`)
    wanted = {_kind(f) for f in FAULTS if stream or not isinstance(f, StreamError)}
    ledger.record(
        G_SETTLE, f"{label}: every kind of fault served", wanted <= set(served), f"{served}"
    )
    for view in views:
        result = view.result
        if view.status.value == "succeeded":
            ok = result is not None and [c.path for c in result.changed_files] == [
                f"{view.name}/f.txt"
            ]
            ledger.record(
                G_SETTLE, f"{label}: {view.name} succeeded with its file", ok, f"{result}"
            )
        else:
            ok = (
                view.status.value == "failed"
                and result is not None
                and result.stop_reason.value == "model_error"
            )
            ledger.record(
                G_SETTLE,
                f"{label}: {view.name} failed by its own model error",
                ok,
                f"{view.status} {view.status_reason}",
            )
    succeeded = [v.agent_id for v in views if v.status.value == "succeeded"]
    landed = [r.agent_id for r in merged.agents if r.outcome.value == "merged"]
    ledger.record(
        G_SETTLE,
        f"{label}: the others succeed and merge",
        bool(succeeded) and sorted(landed) == sorted(succeeded),
        f"{len(succeeded)} of {len(views)} succeeded, {len(landed)} merged",
    )

    # --- waits ------------------------------------------------------------------------------
    transcripts = repo / ".git" / "fanout" / "transcripts"
    delays: list[float] = []
    for path in transcripts.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if entry["kind"] == "model_retry":
                delays.append(float(entry["data"]["delay_s"]))
    bound = max(CAP_S, policy.max_delay_s)
    over = [d for d in delays if d > bound]
    ledger.record(
        G_WAIT,
        f"{label}: {len(delays)} retry waits ≤ max(cap, backoff cap) = {bound} s",
        bool(delays) and not over,
        f"over: {over}",
    )
    # the gap after a 429 asking for 5 s, as the fake saw it: the cap wins. The agent's own
    # wait is the cap or the backoff (its transcript, above); the gap also holds the pace the
    # 429 set for every agent (`orchestration.rate_gate`): a pause of the cap, then one request
    # at a time, spaced
    gaps: list[float] = []
    for e, after in _next_of_same_agent(log, keys):
        if e.fault is not None and getattr(e.fault, "status", None) == 429 and after is not None:
            gaps.append(after.at - e.at)
    ledger.record(
        G_WAIT,
        f"{label}: {len(gaps)} gaps after 429s (retry-after {RETRY_AFTER_S} s) all < it",
        bool(gaps) and max(gaps) < RETRY_AFTER_S,
        f"gaps {sorted(gaps)[-3:]}",
    )

    # --- tokens -----------------------------------------------------------------------------
    charged = [e for e in log if e.status == 200 and e.usage is not None]
    want = (
        sum(e.usage.input_tokens for e in charged if e.usage),
        sum(e.output_tokens for e in charged),
        sum(e.usage.cache_read_input_tokens for e in charged if e.usage),
        sum(e.usage.cache_creation_input_tokens for e in charged if e.usage),
    )
    totals = status.runs[0].totals.tokens
    got = (totals.input, totals.output, totals.cache_read, totals.cache_write)
    ledger.record(
        G_TOKENS, f"{label}: run totals = fake's charges", got == want, f"{got} != {want}"
    )
    per_agent = sum(v.tokens.input + v.tokens.output for v in views)
    ledger.record(
        G_TOKENS,
        f"{label}: agents sum to the totals",
        per_agent == totals.input + totals.output,
        f"{per_agent} != {totals.input + totals.output}",
    )

    failures = [*ledger.failures(G_SETTLE), *ledger.failures(G_WAIT), *ledger.failures(G_TOKENS)]
    assert not [f for f in failures if f.startswith(label)], "\n".join(failures)
