"""The permission policy: allow, ask or deny, for what a subagent does that a person may care about.

A policy is layered: the server's settings, narrowed by a run's rules, narrowed by a task's. Each
layer is written in the shape of Claude Code's permission settings::

    {"default": "allow",
     "allow": ["run_command(pytest*)", "mcp__db__get"],
     "ask": ["network", "write(package-lock.json)", "mcp:destructive"],
     "deny": ["run_command(*rm -rf*)", "write(.github/*)"]}

Rules: `run_command` or `run_command(<glob of the command line>)`; `write` or `write(<glob of the
path>)` (write_file and edit_file); `network` (a task's commands reaching the network);
`mcp__<server>__<tool>` (a glob); `mcp:read-only`, `mcp:writes` (not read-only),
`mcp:destructive`. Within a layer deny beats ask beats allow; what no rule names gets the
layer's `default`. The settings layer's default, when not given, is per kind: commands, writes
and non-destructive MCP tools are allowed, destructive MCP tools and the network are asked
(`"default": "deny"` refuses what the policy does not name). A narrowing layer without a
default leaves unnamed calls to the layers above it. The strictest answer of the layers wins.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from toolbus.audit import AuditRecord
from toolbus.resources import WriteScope

__all__ = [
    "ApprovalAnswer",
    "ApprovalRequest",
    "CallGate",
    "Decision",
    "GuardedScope",
    "PermissionPolicy",
    "PermissionRequest",
    "PermissionRules",
    "Verdict",
]

Decision = Literal["allow", "ask", "deny"]
Kind = Literal["command", "write", "network", "mcp"]
_STRICTNESS: dict[Decision, int] = {"allow": 0, "ask": 1, "deny": 2}
MAX_RULES = 200

_RULE = re.compile(r"^(run_command|write)(?:\((.+)\))?$")
_MCP_CLASSES = ("mcp:read-only", "mcp:writes", "mcp:destructive")
RULE_FORMS = (
    "run_command, run_command(<glob>), write, write(<glob>), network, mcp__<server>__<tool> "
    "(a glob), mcp:read-only, mcp:writes, mcp:destructive"
)


@dataclass(frozen=True)
class _Rule:
    text: str
    kind: Kind
    pattern: str | None  # a glob; None: every call of the kind (or an MCP class)


def _parse(text: str) -> _Rule:
    text = text.strip()
    if text == "network":
        return _Rule(text, "network", None)
    if text in _MCP_CLASSES or text.startswith("mcp__"):
        return _Rule(text, "mcp", None if text in _MCP_CLASSES else text)
    match = _RULE.match(text)
    if match is None:
        raise ValueError(f"unknown permission rule {text!r}; the forms are: {RULE_FORMS}")
    kind: Kind = "command" if match.group(1) == "run_command" else "write"
    return _Rule(text, kind, match.group(2))


class PermissionRules(BaseModel):
    """One layer of the policy, as configured (settings, a run, a task)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: Decision | None = Field(
        default=None,
        description="what no rule names: allow, ask or deny (omitted: per kind in the server's "
        "settings; in a run's or task's rules, whatever the layers above say)",
    )
    allow: list[str] = Field(default_factory=list[str], max_length=MAX_RULES)
    ask: list[str] = Field(default_factory=list[str], max_length=MAX_RULES)
    deny: list[str] = Field(default_factory=list[str], max_length=MAX_RULES)

    @field_validator("allow", "ask", "deny")
    @classmethod
    def _valid(cls, rules: list[str]) -> list[str]:
        for rule in rules:
            _parse(rule)
        return [r.strip() for r in rules]

    @property
    def empty(self) -> bool:
        return self.default is None and not (self.allow or self.ask or self.deny)


class PermissionRequest(BaseModel):
    """What an agent wants to do, as the policy judges it."""

    model_config = ConfigDict(frozen=True)

    kind: Kind
    subject: str = ""
    """The command line, the path, or the namespaced MCP tool name (empty for the network)."""
    read_only: bool = False
    destructive: bool = False


class Verdict(BaseModel):
    """The policy's answer and the rule (or default) that gave it."""

    model_config = ConfigDict(frozen=True)

    decision: Decision
    rule: str
    layer: str


def _matches(rule: _Rule, request: PermissionRequest) -> bool:
    if rule.kind != request.kind:
        return False
    if rule.kind == "mcp":
        if rule.pattern is None:
            return {
                "mcp:read-only": request.read_only,
                "mcp:writes": not request.read_only,
                "mcp:destructive": request.destructive and not request.read_only,
            }[rule.text]
        return fnmatch.fnmatchcase(request.subject, rule.pattern)
    return rule.pattern is None or fnmatch.fnmatchcase(request.subject, rule.pattern)


def _builtin_default(request: PermissionRequest) -> Decision:
    if request.kind == "network":
        return "ask"
    if request.kind == "mcp" and request.destructive and not request.read_only:
        return "ask"
    return "allow"


@dataclass(frozen=True)
class _Layer:
    name: str
    rules: PermissionRules
    parsed: tuple[tuple[Decision, _Rule], ...]

    @classmethod
    def of(cls, name: str, rules: PermissionRules) -> _Layer:
        parsed: list[tuple[Decision, _Rule]] = []
        for decision in ("deny", "ask", "allow"):
            for text in getattr(rules, decision):
                parsed.append((decision, _parse(text)))
        return cls(name, rules, tuple(parsed))

    def judge(self, request: PermissionRequest, base: bool) -> Verdict | None:
        for decision, rule in self.parsed:  # deny rules first, then ask, then allow
            if _matches(rule, request):
                return Verdict(decision=decision, rule=f"{decision}: {rule.text}", layer=self.name)
        if self.rules.default is not None:
            return Verdict(decision=self.rules.default, rule="default", layer=self.name)
        if base:
            return Verdict(decision=_builtin_default(request), rule="default", layer=self.name)
        return None


class PermissionPolicy:
    """The layers that apply to one agent; `decide` gives the strictest of their answers."""

    def __init__(self, layers: Sequence[tuple[str, PermissionRules]] = ()) -> None:
        self._layers = tuple(_Layer.of(name, rules) for name, rules in layers)

    def narrowed(self, name: str, rules: PermissionRules | None) -> PermissionPolicy:
        """This policy with one more layer (which can only make it stricter)."""
        kept = [(layer.name, layer.rules) for layer in self._layers]
        return PermissionPolicy([*kept, (name, rules)] if rules is not None else kept)

    def decide(self, request: PermissionRequest) -> Verdict:
        verdict = Verdict(
            decision=_builtin_default(request), rule="default", layer="built-in defaults"
        )
        for i, layer in enumerate(self._layers):
            found = layer.judge(request, base=i == 0)
            if found is None:
                continue
            # the first layer (the settings) sets the answer; the others can only narrow it
            if i == 0 or _STRICTNESS[found.decision] > _STRICTNESS[verdict.decision]:
                verdict = found
        return verdict

    def describe(self) -> str:
        """One line for spawn's answer: the defaults per kind and the named rules."""
        kinds: list[str] = []
        probes: list[tuple[str, PermissionRequest]] = [
            ("commands", PermissionRequest(kind="command", subject="\x00")),
            ("writes", PermissionRequest(kind="write", subject="\x00")),
            ("network", PermissionRequest(kind="network")),
            ("MCP read-only", PermissionRequest(kind="mcp", subject="\x00", read_only=True)),
            ("MCP writes", PermissionRequest(kind="mcp", subject="\x00", destructive=False)),
            ("MCP destructive", PermissionRequest(kind="mcp", subject="\x00", destructive=True)),
        ]
        for label, probe in probes:
            kinds.append(f"{label} {self.decide(probe).decision}")
        named = [
            f"{decision} {rule.text}"
            for layer in self._layers
            for decision, rule in layer.parsed
            if rule.pattern is not None or rule.kind == "network" or rule.kind == "mcp"
        ]
        line = "; ".join(kinds)
        if named:
            shown = ", ".join(named[:8]) + (f" and {len(named) - 8} more" if len(named) > 8 else "")
            line += f"; rules: {shown}"
        return line


class ApprovalRequest(BaseModel):
    """An `ask`: what the agent wants, why, and the rule that asks."""

    model_config = ConfigDict(frozen=True)

    agent_id: str
    kind: Kind
    subject: str
    why: str = ""
    rule: str


class ApprovalAnswer(BaseModel):
    """The person's answer (or the timeout's)."""

    model_config = ConfigDict(frozen=True)

    allowed: bool
    by: str
    """`person` (elicitation), `tool` (answer_approval), `timeout`."""
    note: str | None = None


class CallGate(Protocol):
    """What the bus needs from its owner for gated calls: approvals and named leases."""

    async def approve(self, request: ApprovalRequest) -> ApprovalAnswer:
        """Hold the call until the person answers or the approval times out."""
        ...

    def hold(
        self, names: Sequence[str], *, shared: bool = False
    ) -> AbstractAsyncContextManager[None]:
        """Hold the named leases (`port:8000`, `mcp:db`) around a call, waiting like paths do;
        `shared`: a read lease (several holders at once)."""
        ...


@dataclass(frozen=True)
class GuardedScope(WriteScope):
    """A write scope that also keeps out what the permission policy does not let a command
    change: a path whose write is denied, or asked and not approved through the bus. The commit
    drops such changes like out-of-scope ones; `refused` collects them."""

    policy: PermissionPolicy = field(default_factory=PermissionPolicy, compare=False)
    approved: frozenset[str] = field(default=frozenset[str](), compare=False)
    refused: dict[str, str] = field(default_factory=dict[str, str], compare=False)

    @classmethod
    def after(
        cls, scope: WriteScope, policy: PermissionPolicy, records: Sequence[AuditRecord]
    ) -> GuardedScope:
        """The guard of an agent's commit, from its bus's audit records: a path the person
        approved a write of (write_file, edit_file) is the agent's to change."""
        approved = frozenset(
            r.path
            for r in records
            if r.op in ("write_file", "edit_file")
            and r.outcome == "ok"
            and r.path
            and "allowed by" in (r.permission or "")
        )
        return cls(scope.prefixes, policy=policy, approved=approved)

    def allows(self, path: str) -> bool:
        if not super().allows(path):
            return False
        verdict = self.policy.decide(PermissionRequest(kind="write", subject=path))
        # (an approval answers an `ask`; it never lifts a `deny`)
        if verdict.decision == "allow" or (verdict.decision == "ask" and path in self.approved):
            return True
        self.refused[path] = f"{verdict.decision} ({verdict.rule})"
        return False
