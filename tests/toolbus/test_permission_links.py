"""The permission policy judges the file a write reaches: a link the agent made
(`notes -> .github/workflows`) does not carry a write past a rule on the real path, the person
asked sees where it leads, and an approval never lifts a `deny` at the commit."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.toolbus.test_bus import RevocableFence
from toolbus.audit import AuditLog
from toolbus.bus import AgentBus, FileLimits
from toolbus.permissions import (
    ApprovalAnswer,
    ApprovalRequest,
    GuardedScope,
    PermissionPolicy,
    PermissionRules,
)
from toolbus.resources import WriteScope
from toolbus.terminal import SandboxMode, Terminal, TerminalConfig

pytestmark = pytest.mark.anyio


class Approver:
    """A person who approves everything, and remembers what they were shown."""

    def __init__(self) -> None:
        self.asked: list[ApprovalRequest] = []

    async def approve(self, request: ApprovalRequest) -> ApprovalAnswer:
        self.asked.append(request)
        return ApprovalAnswer(allowed=True, by="person")

    @asynccontextmanager
    async def hold(self, names: Sequence[str], *, shared: bool = False) -> AsyncGenerator[None]:
        yield


def _bus(ws: Path, rules: PermissionRules, gate: Approver | None = None) -> AgentBus:
    return AgentBus(
        agent_id="a1",
        workspace=ws,
        write_scope=WriteScope.of(None),
        fence=RevocableFence(),
        audit=AuditLog(None),
        terminal=Terminal(ws, TerminalConfig(sandbox=SandboxMode.NONE)),
        limits=FileLimits(),
        policy=PermissionPolicy([("settings", rules)]),
        gate=gate,
    )


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    (root / ".github" / "workflows").mkdir(parents=True)
    (root / ".github" / "workflows" / "ci.yml").write_text("safe\n")
    (root / "notes").symlink_to(".github/workflows")  # as any command of the agent's may
    return root


async def test_a_denied_file_is_not_written_through_a_link(ws: Path) -> None:
    bus = _bus(ws, PermissionRules(deny=["write(.github/*)"]))
    for path in (".github/workflows/ci.yml", "notes/ci.yml"):
        out = await bus.call("write_file", {"path": path, "content": "pwned\n"})
        assert out.is_error and "denied by the permission policy" in out.content
    assert (ws / ".github" / "workflows" / "ci.yml").read_text() == "safe\n"


async def test_the_person_asked_sees_where_a_link_leads(ws: Path) -> None:
    gate = Approver()
    bus = _bus(ws, PermissionRules(ask=["write(.github/*)"]), gate)
    out = await bus.call("write_file", {"path": "notes/ci.yml", "content": "new\n"})
    assert not out.is_error, out.content
    assert [a.subject for a in gate.asked] == [
        "notes/ci.yml (it leads to .github/workflows/ci.yml)"
    ]


def test_an_approval_answers_an_ask_and_never_lifts_a_deny() -> None:
    policy = PermissionPolicy(
        [("settings", PermissionRules(deny=["write(.github/*)"], ask=["write(docs/*)"]))]
    )
    approved = frozenset({".github/workflows/ci.yml", "docs/a.md"})
    guard = GuardedScope(None, policy=policy, approved=approved)
    assert guard.allows("docs/a.md")
    assert not guard.allows("docs/b.md")  # asked, never approved
    assert not guard.allows(".github/workflows/ci.yml")
    assert guard.refused[".github/workflows/ci.yml"].startswith("deny")


def test_a_guard_keeps_its_policy_when_paths_are_kept_out() -> None:
    policy = PermissionPolicy([("settings", PermissionRules(deny=["write(.github/*)"]))])
    guard = GuardedScope(None, policy=policy).without([".env"])
    assert isinstance(guard, GuardedScope)
    assert not guard.allows(".env") and not guard.allows(".github/x.yml")
    assert guard.allows("src/a.py")
