"""What a run will cost, before it starts, and how that compares with what it spent.

The estimate follows the requests the run will make and prices them as the API bills them with
the provider's cache breakpoints (`orchestration.providers.anthropic`): the shared prefix is
written once (see `orchestration.caching`) and read by every other request; each turn reads the
conversation so far from the cache and writes what it added. What cannot be known before the run
(turns per agent, growth of the conversation per turn, output per turn, seconds per turn) comes
from this repository's latest settled runs, or from defaults when there are none."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from orchestration.caching import (
    READ_PRICE,
    WRITE_PRICE,
    choose_ttl,
    min_cacheable_tokens,
)
from orchestration.contracts import AgentStatus, CostEstimate
from orchestration.model import estimate_tokens
from orchestration.prompts import FINISH_TOOL, FIRST_MESSAGE
from orchestration.state import AgentRecord, RunRecord, StateStore
from toolbus.bus import SUBAGENT_TOOL_SPECS

DEFAULT_TURNS = 8
DEFAULT_GROWTH_PER_TURN = 1_500
DEFAULT_OUTPUT_PER_TURN = 600
DEFAULT_SECONDS_PER_TURN = 20.0
CALIBRATION_RUNS = 5  # the latest settled runs of the repository that calibrate an estimate
FINAL = (
    AgentStatus.SUCCEEDED,
    AgentStatus.FAILED,
    AgentStatus.MERGED,
    AgentStatus.CONFLICTED,
    AgentStatus.STALE,
    AgentStatus.VERIFY_FAILED,
)


@dataclass(frozen=True)
class Calibration:
    """What a run's agents do per turn, on average."""

    turns: float = DEFAULT_TURNS
    growth_per_turn: float = DEFAULT_GROWTH_PER_TURN
    output_per_turn: float = DEFAULT_OUTPUT_PER_TURN
    seconds_per_turn: float = DEFAULT_SECONDS_PER_TURN
    # the API's count of a first request over this module's estimate of it
    input_scale: float = 1.0
    runs: int = 0  # how many runs it was measured on (0: the defaults)


def history(store: StateStore) -> list[tuple[RunRecord, list[AgentRecord]]]:
    """The repository's latest runs with their agents, oldest first."""
    runs = store.latest_runs(4 * CALIBRATION_RUNS)
    return [(run, store.agents(run.run_id)) for run in runs]


def tools_tokens() -> int:
    """The subagent tools as the provider sends them."""
    tools = [
        {"name": t.name, "description": t.description, "input_schema": dict(t.input_schema)}
        for t in [*SUBAGENT_TOOL_SPECS, FINISH_TOOL]
    ]
    return estimate_tokens(json.dumps(tools))


def first_message_tokens() -> int:
    return estimate_tokens(json.dumps({"role": "user", "type": "text", "text": FIRST_MESSAGE}))


def calibrate(history: Sequence[tuple[RunRecord, Sequence[AgentRecord]]]) -> Calibration:
    """Per-turn figures from the agents of earlier runs that ended after at least one turn
    (`history`, the latest last): their turns, output and duration, and the conversation growth
    that their input tokens imply (turn t reads `first + growth * (t - 1)`)."""
    measured: list[tuple[RunRecord, list[AgentRecord]]] = []
    for run, agents in reversed(history):
        if run.first_request_tokens is None:
            continue
        ended = [a for a in agents if a.status in FINAL and a.turns > 0]
        if ended:
            measured.append((run, ended))
        if len(measured) == CALIBRATION_RUNS:
            break
    if not measured:
        return Calibration()
    turns = output = agents_n = 0
    seconds = 0.0
    timed_turns = 0
    growth_sum = growth_weight = 0.0
    first_actual = first_estimated = 0.0
    for run, agents in measured:
        first_guess = run.first_request_tokens or 0
        for agent in agents:
            t = agent.turns
            tokens = agent.tokens
            agents_n += 1
            turns += t
            output += tokens.output
            if agent.result is not None and agent.result.duration_s > 0:
                seconds += agent.result.duration_s
                timed_turns += t
            first = agent.first_input_tokens
            if first is None or not first_guess:
                continue
            first_actual += first
            first_estimated += first_guess
            if t >= 2:
                read_in = tokens.input + tokens.cache_read + tokens.cache_write
                growth_sum += max(read_in - t * first, 0)  # = growth * t(t-1)/2
                growth_weight += t * (t - 1) / 2
    return Calibration(
        turns=turns / agents_n,
        growth_per_turn=growth_sum / growth_weight if growth_weight else DEFAULT_GROWTH_PER_TURN,
        output_per_turn=output / turns,
        seconds_per_turn=seconds / timed_turns if timed_turns else DEFAULT_SECONDS_PER_TURN,
        input_scale=first_actual / first_estimated if first_estimated else 1.0,
        runs=len(measured),
    )


def _agent_cost(
    first: float, prefix: float, cal: Calibration, turns: float, *, prefix_price: float
) -> tuple[float, float]:
    """(billed, uncached) input-equivalent tokens of one agent of `turns` turns whose first
    request is `first` tokens, `prefix` of them the shared prefix billed at `prefix_price`
    (0 when the prefix is not cached: it is then billed with the rest)."""
    g, o = cal.growth_per_turn, cal.output_per_turn
    uncached = turns * first + g * turns * (turns - 1) / 2 + turns * o
    later = max(turns - 1, 0.0)
    # turn 1 writes its conversation at the 5-minute price; turn t reads turn t-1's prompt and
    # writes what was added since
    billed = (
        prefix_price * prefix
        + WRITE_PRICE["5m"] * (first - prefix)
        + READ_PRICE * (later * first + g * later * (later - 1) / 2)
        + WRITE_PRICE["5m"] * g * later
        + turns * o
    )
    return billed, uncached


def estimate(
    run: RunRecord,
    agents: list[AgentRecord],
    *,
    prefix: str,
    cal: Calibration,
    ttl_setting: str,
    min_tokens_override: int | None,
    warmup: bool,
) -> tuple[CostEstimate, int]:
    """The run's cost as the budget counts it, and the size of an average first request (kept on
    the run, to calibrate later estimates)."""
    n = len(agents)
    guessed_prefix = estimate_tokens(prefix) + tools_tokens()
    guessed_task = sum(estimate_tokens(a.prompt) + 60 for a in agents) // max(n, 1)
    guessed_first = guessed_prefix + guessed_task + first_message_tokens()
    # as the API will count them, once earlier runs have shown how its count compares
    prefix_tokens = round(guessed_prefix * cal.input_scale)
    task_tokens = round(guessed_task * cal.input_scale)
    first = prefix_tokens + task_tokens + round(first_message_tokens() * cal.input_scale)
    turns = min(cal.turns, float(max(a.max_turns for a in agents)))
    floor = min(min_cacheable_tokens(a.model, min_tokens_override) for a in agents)
    waves = 1 + max(len(a.waits_for) for a in agents)
    slots = -(-n // max(run.max_concurrency, 1))
    expected_s = turns * cal.seconds_per_turn * max(waves, slots)
    ttl = choose_ttl(ttl_setting, expected_s=expected_s, has_waits=waves > 1)
    cached = prefix_tokens >= floor
    billed = uncached = 0.0
    for i in range(n):
        if not cached:  # each agent's conversation is still cached once long enough
            b, u = _agent_cost(first, 0, cal, turns, prefix_price=0)
            billed, uncached = billed + (b if first >= floor else u), uncached + u
            continue
        writes = i == 0 or not warmup
        price = WRITE_PRICE[ttl] if writes else READ_PRICE
        b, u = _agent_cost(first, prefix_tokens, cal, turns, prefix_price=price)
        billed, uncached = billed + b, uncached + u
    basis = (
        f"{cal.turns:.1f} turns per agent, {cal.growth_per_turn:.0f} tokens of conversation "
        f"growth and {cal.output_per_turn:.0f} of output per turn, measured on this "
        f"repository's last {cal.runs} run(s)"
        if cal.runs
        else f"{turns:.0f} turns per agent, ~{cal.growth_per_turn:.0f} tokens of conversation "
        f"growth and ~{cal.output_per_turn:.0f} of output per turn (defaults: no earlier run "
        "in this repository to measure)"
    )
    if cached:
        writers = "once" if warmup else "by each agent whose first request leaves with others"
        cache = (
            f"the shared prefix (~{prefix_tokens} tokens) is cached for {ttl}, written {writers} "
            "and read by every other request"
        )
    else:
        cache = (
            f"prompt caching does not apply to the shared prefix: ~{prefix_tokens} tokens, "
            f"below the model's minimum of {floor} cacheable tokens"
        )
    result = CostEstimate(
        agents=n,
        shared_prefix_tokens=prefix_tokens,
        per_agent_task_tokens=task_tokens,
        estimated_turns_per_agent=max(round(turns), 1),
        estimated_total_tokens=round(billed),
        estimated_uncached_tokens=round(uncached),
        budget_tokens=run.budget_tokens,
        prompt_cache=cache,
        cache_ttl=ttl if cached else None,
        note=f"assumes {basis}; counted as the budget counts (cache reads x0.1, writes x1.25, "
        "x2 for an hour); the live meter in get_status is exact",
    )
    return result, guessed_first
