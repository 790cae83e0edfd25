"""Reliability suite: a ledger of guarantees and the cases tried against each.

Every test records its cases with `ledger.record(guarantee, case, ok, detail)`; the session ends
with a table (guarantee, cases, failures) printed by `pytest_terminal_summary`.
`FANOUT_RELIABILITY=full` selects the full profile (more generated and crash cases); the default is
the quick CI profile.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest

FULL = os.environ.get("FANOUT_RELIABILITY", "").lower() == "full"


@dataclass
class _Row:
    cases: int = 0
    failures: list[str] = field(default_factory=list[str])


@dataclass
class Ledger:
    """Cases tried per guarantee, and the ones that failed."""

    rows: dict[str, _Row] = field(default_factory=dict[str, _Row])

    def record(self, guarantee: str, case: str, ok: bool, detail: str = "") -> None:
        row = self.rows.setdefault(guarantee, _Row())
        row.cases += 1
        if not ok:
            row.failures.append(f"{case}: {detail}"[:300])

    def failures(self, guarantee: str) -> list[str]:
        row = self.rows.get(guarantee)
        return [] if row is None else list(row.failures)


LEDGER = Ledger()


@pytest.fixture
def ledger() -> Ledger:
    return LEDGER


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not LEDGER.rows:
        return
    tr = terminalreporter
    profile = "full" if FULL else "ci"
    tr.section(f"reliability guarantees (profile: {profile})")
    width = max(len(g) for g in LEDGER.rows)
    tr.write_line(f"{'guarantee'.ljust(width)}  {'cases':>7}  {'failures':>8}")
    for guarantee, row in sorted(LEDGER.rows.items()):
        tr.write_line(f"{guarantee.ljust(width)}  {row.cases:>7}  {len(row.failures):>8}")
    for guarantee, row in sorted(LEDGER.rows.items()):
        for failure in row.failures[:20]:
            tr.write_line(f"  FAILED {guarantee}: {failure}")
