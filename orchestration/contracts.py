"""The public request and result models of the MCP tools (DESIGN.md's contracts).

The MCP layer exposes these as tool inputs and structured outputs; tests outside the project rely
on their field names.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from toolbus.errors import PathEscape
from toolbus.external import MAX_SERVER_NAME, SERVER_NAME
from toolbus.permissions import PermissionRules
from toolbus.resources import normalize_path

MAX_TASKS = 64
MAX_PROMPT_CHARS = 100_000

AgentName = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=64, pattern=r"^[\w .:-]+$"),
]


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class _Output(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _View(BaseModel):
    """A status view: built once per change and shared between answers, so never mutated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class _Record(BaseModel):
    """A record shared by workspaces, the join and the MCP answers (one definition): frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _normalize_scope(paths: list[str] | None) -> list[str] | None:
    if paths is None:
        return None
    out: list[str] = []
    for raw in paths:
        try:
            path = normalize_path(raw)
        except PathEscape as exc:
            raise ValueError(f"write_scope entry {raw!r}: {exc}") from None
        if path not in out:
            out.append(path)
    return out


ResourceName = Annotated[
    str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f]+$")
]


class ResourceSpec(_Input):
    """A shared resource a task uses (a port, a cache): a named lease, held around each command
    that names it, or for the agent's whole life."""

    name: ResourceName = Field(description="e.g. 'port:8000', 'npm-cache'")
    hold: Literal["command", "agent"] = Field(
        default="command",
        description="command: taken around each command that names it; agent: for the agent's "
        "whole run, from its start",
    )


class TaskSpec(_Input):
    """One subagent's task."""

    prompt: str = Field(
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        description="What this subagent must do; self-contained, it sees only this and the "
        "shared context.",
    )
    name: AgentName | None = Field(
        default=None, description="A short label (letters, digits, space, . : _ -)."
    )
    write_scope: list[str] | None = Field(
        default=None,
        max_length=64,
        description="Repository-relative path prefixes this agent may change. Omitted: the "
        "whole repository (serializes with every other writer). []: read-only.",
    )
    model: str | None = Field(default=None, min_length=1, max_length=128)
    max_turns: int | None = Field(default=None, ge=1, le=500)
    depends_on: list[Annotated[str, StringConstraints(min_length=1, max_length=128)]] = Field(
        default_factory=list[str],
        max_length=64,
        description="Tasks (names in this spawn, or agent ids of earlier runs) that must be "
        "merged first: this one waits, then starts from the head that contains them.",
    )
    resources: list[ResourceName | ResourceSpec] = Field(
        default_factory=list[ResourceName | ResourceSpec],
        max_length=16,
        description="Shared resources its commands use ('port:8000', or {name, hold: 'agent'}): "
        "no two agents hold one at once; the others wait.",
    )
    network: bool = Field(
        default=False,
        description="Its commands need the network (a package install): granted by the "
        "permission policy, which asks the person by default.",
    )
    permissions: PermissionRules | None = Field(
        default=None,
        description="Narrows the run's permission policy for this task: {default?, allow, ask, "
        "deny} rules such as 'run_command(npm *)', 'write(*.lock)', 'network', 'mcp__db__*'.",
    )

    def resource_specs(self) -> list[ResourceSpec]:
        """The declared resources, each once, with how long it is held (for the agent's life if
        any declaration says so)."""
        found: dict[str, ResourceSpec] = {}
        for r in self.resources:
            spec = r if isinstance(r, ResourceSpec) else ResourceSpec(name=r.strip())
            if spec.name not in found or spec.hold == "agent":
                found[spec.name] = spec
        return list(found.values())

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be blank: say what the subagent should do")
        if "\x00" in value:
            raise ValueError("prompt must not contain NUL bytes")
        return value

    @field_validator("write_scope")
    @classmethod
    def _scope(cls, value: list[str] | None) -> list[str] | None:
        return _normalize_scope(value)


class SharedContextSpec(_Input):
    """Context every agent of a run shares (and reads at cache price)."""

    plan: str | None = Field(default=None, max_length=200_000)
    conventions: str | None = Field(default=None, max_length=200_000)
    files: list[str] = Field(
        default_factory=list[str],
        max_length=200,
        description="Repository-relative files whose contents at the base go into every "
        "agent's context.",
    )

    @field_validator("files")
    @classmethod
    def _files(cls, value: list[str]) -> list[str]:
        return _normalize_scope(value) or []


class SpawnRequest(_Input):
    """Input of `spawn_subagents`."""

    tasks: list[TaskSpec] = Field(min_length=1, max_length=MAX_TASKS)
    shared_context: SharedContextSpec | None = None
    repo: str | None = Field(default=None, max_length=4096)
    max_concurrency: int | None = Field(default=None, ge=1, le=64)
    budget_tokens: int | None = Field(default=None, ge=1_000, le=1_000_000_000)
    verify_command: str | None = Field(
        default=None,
        min_length=1,
        max_length=4_000,
        description="the run's verification command: merge_results runs it on the would-be "
        "merged tree before the branch moves (a merge may name its own)",
    )
    permissions: PermissionRules | None = Field(
        default=None,
        description="Narrows the server's permission policy for this run's agents (allow / "
        "ask / deny rules; they can only make it stricter).",
    )
    mcp_servers: (
        list[
            Annotated[
                str, StringConstraints(max_length=MAX_SERVER_NAME, pattern=SERVER_NAME.pattern)
            ]
        ]
        | None
    ) = Field(
        default=None,
        max_length=32,
        description="The downstream MCP servers (from the server's configuration) whose tools "
        "the agents get; omitted: all configured; []: none.",
    )


class AgentStatus(StrEnum):
    """An agent's status (DESIGN.md's vocabulary)."""

    QUEUED = "queued"
    WAITING = "waiting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    MERGED = "merged"
    CONFLICTED = "conflicted"
    STALE = "stale"  # it read files that changed on the canonical branch since: not merged
    VERIFY_FAILED = "verify_failed"  # the verification command failed with its change merged
    DISCARDED = "discarded"

    @property
    def active(self) -> bool:
        return self in (AgentStatus.QUEUED, AgentStatus.WAITING, AgentStatus.RUNNING)

    @property
    def closed(self) -> bool:
        """Nothing left to do: the work landed (merged) or was thrown away (discarded)."""
        return self in (AgentStatus.MERGED, AgentStatus.DISCARDED)


class StopReason(StrEnum):
    """Why an agent's loop ended: each a distinct, explained final state."""

    FINISHED = "finished"  # the model called finish
    FINAL_ANSWER = "final_answer"  # a reply without tool calls
    MAX_TURNS = "max_turns"
    BUDGET_EXHAUSTED = "budget_exhausted"
    CANCELLED = "cancelled"
    MODEL_ERROR = "model_error"
    REFUSED = "refused"  # the model refused, or its context window was exceeded
    INTERRUPTED = "interrupted"
    INTERNAL_ERROR = "internal_error"


class TokenUsage(_Output):
    """Tokens, as the API reports them; `cache_write_1h` is the part of `cache_write` written
    with the one-hour lifetime."""

    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write: int = 0
    cache_write_1h: int = 0

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            input=self.input + other.input,
            output=self.output + other.output,
            cache_read=self.cache_read + other.cache_read,
            cache_write=self.cache_write + other.cache_write,
            cache_write_1h=self.cache_write_1h + other.cache_write_1h,
        )

    @property
    def billed_equivalent(self) -> int:
        """Input-equivalent tokens as the budget counts them, at the API's prices: cache writes
        x1.25 (x2 for the one-hour lifetime), cache reads x0.1."""
        return round(
            self.input
            + self.output
            + 1.25 * (self.cache_write - self.cache_write_1h)
            + 2.0 * self.cache_write_1h
            + 0.1 * self.cache_read
        )


class AgentBrief(_Output):
    """An agent as spawn, cancel and rerun report it."""

    agent_id: str
    name: str
    status: AgentStatus
    write_scope: list[str] | None
    waits_for: list[str] = Field(
        default_factory=list[str], description="agents whose write leases this one waits for"
    )
    depends_on: list[str] = Field(
        default_factory=list[str], description="agents that must be merged before it starts"
    )


class CostEstimate(_Output):
    """What the run is expected to cost, before it starts."""

    agents: int
    shared_prefix_tokens: int
    per_agent_task_tokens: int
    estimated_turns_per_agent: int
    estimated_total_tokens: int
    estimated_uncached_tokens: int
    budget_tokens: int
    prompt_cache: str = Field(default="", description="how the shared prefix is cached, or not")
    cache_ttl: Literal["5m", "1h"] | None = Field(
        default=None, description="the shared prefix's cache lifetime; None: not cached"
    )
    note: str


class SpawnResult(_Output):
    """Result of `spawn_subagents`."""

    run_id: str
    repo: str
    base_commit: str
    snapshot_of_uncommitted_changes: bool
    agents: list[AgentBrief]
    estimate: CostEstimate
    warnings: list[str] = Field(default_factory=list[str])
    permissions: str = Field(
        default="", description="the permission policy that applies to the run's agents"
    )
    mcp_tools: list[str] = Field(
        default_factory=list[str], description="the downstream MCP tools the agents get"
    )
    executor: str = Field(default="", description="where the run's agents run")


ChangeStatus = Literal["added", "modified", "deleted", "renamed"]


class FileChange(_Record):
    """A file an agent changed, from git."""

    path: str
    status: ChangeStatus
    old_path: str | None = None
    lines_added: int
    lines_removed: int
    blob: str | None

    def shown(self) -> FileChange:
        """This change as records and answers carry it: its paths through `shown_path`."""
        path = shown_path(self.path)
        old = None if self.old_path is None else shown_path(self.old_path)
        if path == self.path and old == self.old_path:
            return self
        return self.model_copy(update={"path": path, "old_path": old})


class CommandRun(_Output):
    """A command an agent ran, from the bus's audit log."""

    command: str
    exit_code: int | None
    duration_s: float
    timed_out: bool = False
    outcome: Literal["ok", "refused", "error"] = "ok"


class PermissionDecision(_Output):
    """A gated call that was asked about or refused, from the bus's audit log."""

    tool: str
    subject: str
    decision: str = Field(description="e.g. 'ask (ask: network): allowed by person'")


class AgentResultView(_Output):
    """A finished agent's result as `get_status` shows it: the result's own facts, without what
    the agent's entry beside it already says (its status, tokens, turns and branch). The whole
    result is `AgentResult` (the agent's result resource)."""

    stop_reason: StopReason
    summary: str
    follow_ups: list[str] = Field(default_factory=list[str])
    changed_files: list[FileChange] = Field(default_factory=list[FileChange])
    dropped_files: list[str] = Field(
        default_factory=list[str],
        description="changed outside the write scope, or a .git the agent made; not committed",
    )
    commands: list[CommandRun] = Field(default_factory=list[CommandRun])
    refused_calls: int = 0
    permissions: list[PermissionDecision] = Field(
        default_factory=list[PermissionDecision],
        description="the permission policy's asks and refusals, with who answered",
    )
    duration_s: float = 0.0
    error: str | None = None
    commit: str | None = None


class AgentResult(AgentResultView):
    """A finished agent's result: facts from the bus and git, plus the model's own summary."""

    status: AgentStatus
    tokens: TokenUsage = Field(default_factory=TokenUsage)
    turns: int = 0
    branch: str | None = None

    def view(self) -> AgentResultView:
        """The result as `get_status` shows it (no validation: these values already passed)."""
        return AgentResultView.model_construct(
            **{name: getattr(self, name) for name in AgentResultView.model_fields}
        )


class LeaseView(_View):
    """A lease as status shows it."""

    resource: str
    mode: Literal["read", "write"]
    token: int
    expires_in_s: float


class Approval(_Output):
    """A call held until the person answers: what the agent wants, why, and the rule that asks.
    Answered by MCP elicitation, or with `answer_approval`; no answer by `expires_at` refuses."""

    approval_id: str
    agent_id: str
    kind: Literal["command", "write", "network", "mcp"]
    subject: str
    why: str = ""
    rule: str
    requested_at: float
    expires_at: float
    decision: Literal["allowed", "refused"] | None = None
    by: str | None = None
    note: str | None = None


class AgentView(_View):
    """One agent in `get_status`."""

    agent_id: str
    run_id: str
    name: str
    status: AgentStatus
    status_reason: str | None = None
    turns: int
    max_turns: int
    tokens: TokenUsage
    write_scope: list[str] | None
    waits_for: list[str] = Field(default_factory=list[str])
    approval: Approval | None = Field(
        default=None,
        description="the call it holds for the person's answer (answer_approval, or an "
        "elicitation the server raises in your next call)",
    )
    leases: list[LeaseView] = Field(default_factory=list[LeaseView])
    lease_lost: bool = False
    changed_files: list[str] = Field(default_factory=list[str])
    reads_changing: list[str] = Field(
        default_factory=list[str],
        description="files it read that another agent of the run changes (`path (by name)`): "
        "it may come back stale at merge",
    )
    model: str
    base_commit: str
    branch: str | None = None
    node: str | None = Field(default=None, description="the cluster node it runs on")
    rerun_of: str | None = None
    result: AgentResultView | None = Field(
        default=None,
        description="once finished: summary, follow-ups, changed files with line counts, "
        "commands with exit codes, error, commit (its status, tokens, turns and branch are the "
        "agent's own, above)",
    )


class RunTotals(_View):
    """A run's totals and its live token meter."""

    agents: int
    by_status: dict[str, int]
    tokens: TokenUsage
    budget_tokens: int
    budget_used: int
    budget_remaining: int
    estimate_tokens: int | None = Field(
        default=None, description="spawn's estimate, in the budget's units (compare budget_used)"
    )


class PromptCacheView(_View):
    """How the run's shared prefix is cached: its lifetime, and the warm-up that had it written
    once (the run's first request went alone; the others waited for its response to begin)."""

    ttl: Literal["5m", "1h"] | None = Field(description="None: caching does not apply")
    first_byte_s: float | None = Field(
        default=None, description="the first request's time until its response began"
    )
    held_s: float = Field(default=0.0, description="the longest another agent waited for it")
    note: str = ""


class RunView(_View):
    """One run in `get_status`."""

    run_id: str
    repo: str
    created_at: float
    base_commit: str
    max_concurrency: int
    totals: RunTotals
    agents: list[AgentView]
    prompt_cache: PromptCacheView | None = None
    settled: bool = Field(
        default=False, description="nothing in the run moves without the orchestrator"
    )
    next: str = Field(default="", description="the call to make next, naming the agents")
    changed_agents: list[str] | None = Field(
        default=None, description="agents with a change after `since`; None: asked without it"
    )


class ServerLoad(_View):
    """Limits across every run of this server: agents running at once, tokens."""

    running: int = Field(description="agents of this server in a model loop now")
    max_running: int = Field(description="FANOUT_MAX_RUNNING: more wait, queued")
    tokens_used: int = Field(description="tokens all runs of this server used (budget units)")
    budget_tokens: int | None = Field(
        default=None, description="FANOUT_SERVER_BUDGET_TOKENS, if set: a budget across runs"
    )
    budget_remaining: int | None = None
    rate_limited: str | None = Field(
        default=None,
        description="while the model API's rate limit holds this server's requests back: how",
    )


class StatusResult(_View):
    """Result of `get_status`."""

    cursor: int = Field(
        description="pass as `since` (with `wait_s`) to wait for the next change after this "
        "answer; every agent asked for is listed either way"
    )
    changed: bool = Field(description="false when a long-poll ended by timeout with no change")
    runs: list[RunView]
    workspace_disk_bytes: int
    server: ServerLoad


class DiffStat(_Record):
    """Lines changed by a merge."""

    files: int = 0
    insertions: int = 0
    deletions: int = 0
    paths: list[str] = Field(default_factory=list[str])

    @classmethod
    def of(cls, changes: Sequence[FileChange]) -> DiffStat:
        """The diffstat of a list of file changes, paths in their order."""
        return cls(
            files=len(changes),
            insertions=sum(c.lines_added for c in changes),
            deletions=sum(c.lines_removed for c in changes),
            paths=[shown_path(c.path) for c in changes],
        )


def is_utf8(name: str) -> bool:
    """Whether `name` (a file name as `os.fsdecode` gives it) is UTF-8; a name that is not
    holds the surrogates of its other bytes."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown_path(path: str) -> str:
    """`path` as a report may carry it: in a name that is not UTF-8 (git allows it, pygit2
    gives it with surrogates), each byte that is not UTF-8 is shown as `\\xNN`, since JSON and
    the records take UTF-8 only."""
    if is_utf8(path):
        return path
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def shown_paths(paths: Sequence[str], limit: int = 5) -> str:
    """The first `limit` of `paths` as a report may carry them (`shown_path`), and how many
    more there are."""
    listed = ", ".join(shown_path(p) for p in paths[:limit])
    return listed + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


# What the join step did with one agent (`clean` is a dry run's `merged`). No docstring: it
# would become a description in the tools' output schemas.
class MergeOutcome(StrEnum):
    MERGED = "merged"
    CLEAN = "clean"
    CONFLICTED = "conflicted"
    STALE = "stale"
    VERIFY_FAILED = "verify_failed"
    SKIPPED = "skipped"
    DISCARDED = "discarded"


class AgentMergeResult(_Output):
    """One agent's outcome in `merge_results`."""

    agent_id: str
    name: str
    outcome: MergeOutcome
    commit: str | None = None
    conflicts: list[str] = Field(default_factory=list[str])
    stale_reads: list[str] = Field(
        default_factory=list[str],
        description="files it read that changed on the canonical branch since (outcome stale)",
    )
    reason: str | None = None
    diffstat: DiffStat = Field(default_factory=DiffStat)


class MergeRequest(_Input):
    """Input of `merge_results`."""

    run_id: str = Field(min_length=1, max_length=64)
    agent_ids: list[str] | None = Field(default=None, max_length=MAX_TASKS * 4)
    dry_run: bool = False
    discard: list[str] = Field(
        default_factory=list[str],
        max_length=MAX_TASKS * 4,
        description="agents whose work to throw away explicitly (workspace removed, branch "
        "kept unless configured otherwise)",
    )
    verify_command: str | None = Field(
        default=None,
        min_length=1,
        max_length=4_000,
        description="run on the would-be merged tree (in the sandbox) before the branch moves; "
        "an agent whose change makes it fail is verify_failed and not merged (default: the "
        "run's, from spawn)",
    )
    verify_timeout_s: float | None = Field(
        default=None, gt=0, le=3_600, description="its timeout (default FANOUT_COMMAND_TIMEOUT_S)"
    )
    accept_stale: bool = Field(
        default=False,
        description="merge agents that read files changed since their base (outcome stale "
        "otherwise: rerun_subagent shows them the new versions)",
    )


class MergeResult(_Output):
    """Result of `merge_results`."""

    run_id: str
    dry_run: bool
    agents: list[AgentMergeResult]
    head: str
    branch: str | None
    diffstat: DiffStat
    verification: str | None = Field(
        default=None, description="what the verification command did, when one ran"
    )


class CancelResult(_Output):
    """Result of `cancel_subagents`."""

    run_id: str
    agents: list[AgentBrief]


class RerunResult(_Output):
    """Result of `rerun_subagent`."""

    run_id: str
    replaces: str
    agent: AgentBrief
    base_commit: str
