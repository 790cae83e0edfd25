"""The MCP tools: a plain handler per tool over the app state, and `TOOLS`, the table that
declares each tool (name, request and answer models, title, description, annotations, handler).

`sdk_tools` turns the table into the SDK's tools: one function per tool with the signature the
SDK reads (the request, the context, the client's roots), then the patches of `sdk_patches`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

import anyio
from mcp.server.elicitation import ElicitationResult
from mcp.server.mcpserver import Context, Elicit, ListRoots, Resolve
from mcp.server.mcpserver.tools import Tool
from mcp_types import CallToolResult, ListRootsResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field

from mcp_server import answers, sdk_patches
from mcp_server.answers import (
    ApprovalAnswer,
    CancelAnswer,
    MergeAnswer,
    PingResult,
    RerunAnswer,
    SpawnAnswer,
    StatusAnswer,
)
from mcp_server.app import App
from mcp_server.requests import (
    AnswerApprovalRequest,
    CancelRequest,
    PingRequest,
    RerunRequest,
    StatusRequest,
)
from orchestration.contracts import (
    Approval,
    MergeRequest,
    MergeResult,
    SpawnRequest,
    StatusResult,
)

ToolCtx = Context[App, Any]
R = TypeVar("R", bound=BaseModel)
A = TypeVar("A", bound=BaseModel)


KEEP_ALIVE_S = 10.0
"""How often a waiting long-poll sends a progress notification (when the client gave a
`progressToken`): clients reset their idle timeout on each one."""


async def _keep_alive(ctx: ToolCtx, run_id: str | None) -> None:
    """Progress notifications while a long-poll waits: the seconds waited so far."""
    started = anyio.current_time()
    what = f"waiting for run {run_id} to need you" if run_id else "waiting for the runs"
    while True:
        await anyio.sleep(KEEP_ALIVE_S)
        waited = round(anyio.current_time() - started)
        with anyio.move_on_after(5):
            await ctx.report_progress(waited, None, f"{what} ({waited} s)")


def _answer(text: str, structured: dict[str, Any]) -> CallToolResult:
    """A tool's answer: its text, and the JSON dump of its answer model as structured content."""
    return CallToolResult(
        content=[TextContent(type="text", text=text)], structured_content=structured
    )


def _compact(answer: A, text: Callable[[A], str]) -> CallToolResult:
    """The answer for a compact answer model and the function that writes its text."""
    return _answer(text(answer), answers.dump(answer))


async def spawn_subagents(app: App, request: SpawnRequest, ctx: ToolCtx) -> CallToolResult:
    repo = await app.context(request.repo)
    result = await app.orchestrator.spawn(request, default_repo=repo.repo.root)
    return _compact(answers.spawn_answer(result), answers.spawn_text)


async def get_status(app: App, request: StatusRequest, ctx: ToolCtx) -> CallToolResult:
    repo = await app.context()
    waiting = request.since is not None and bool(request.wait_s)
    result: StatusResult | None = None
    async with anyio.create_task_group() as tg:
        if waiting:
            tg.start_soon(_keep_alive, ctx, request.run_id)
        result = await app.orchestrator.status(
            run_id=request.run_id,
            agent_ids=request.agent_ids,
            since=request.since,
            wait_s=request.wait_s,
            repo=repo.repo.root,
            wake_on=request.wake_on,
        )
        tg.cancel_scope.cancel()
    assert result is not None
    detail = tuple(request.detail or ())
    last = app.last_status
    if last is not None and last[0] is result and last[1] == detail:
        structured, text = last[2], last[3]
    else:
        every_run = request.run_id is not None or bool(request.agent_ids)
        answer = answers.status_answer(result, detail, every_run=every_run)
        structured, text = answers.dump(answer), answers.status_text(answer)
        app.last_status = (result, detail, structured, text)
    return _answer(text, structured)


async def merge_results(app: App, request: MergeRequest, ctx: ToolCtx) -> CallToolResult:
    repo = await app.context()
    send, receive = anyio.create_memory_object_stream[tuple[int, int, str]](64)

    def on_progress(done: int, total: int, message: str) -> None:
        # No progress once the work is done: a notification racing the result confuses
        # some clients (Claude Code drops the connection).
        if done < total:
            with suppress(anyio.WouldBlock):
                send.send_nowait((done, total, message))

    async def forward() -> None:
        async with receive:
            async for done, total, message in receive:
                with anyio.move_on_after(5):
                    await ctx.report_progress(done, total, message)

    result: MergeResult | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(forward)
        try:
            result = await app.orchestrator.merge(
                request, repo=repo.repo.root, on_progress=on_progress
            )
        finally:
            send.close()
            tg.cancel_scope.cancel()
    assert result is not None
    return _compact(answers.merge_answer(result), answers.merge_text)


async def cancel_subagents(app: App, request: CancelRequest, ctx: ToolCtx) -> CallToolResult:
    repo = await app.context()
    result = await app.orchestrator.cancel(request.run_id, request.agent_ids, repo=repo.repo.root)
    return _compact(answers.cancel_answer(result), answers.cancel_text)


async def rerun_subagent(app: App, request: RerunRequest, ctx: ToolCtx) -> CallToolResult:
    repo = await app.context()
    result = await app.orchestrator.rerun(
        request.agent_id, request.instructions, repo=repo.repo.root
    )
    return _compact(answers.rerun_answer(result), answers.rerun_text)


async def answer_approval(app: App, request: AnswerApprovalRequest, ctx: ToolCtx) -> CallToolResult:
    repo = await app.context()
    approval = await app.orchestrator.answer_approval(
        request.approval_id, request.allow, request.note, by="tool", repo=repo.repo.root
    )
    return _compact(answers.approval_answer(approval), answers.approval_text)


async def ping(app: App, request: PingRequest, ctx: ToolCtx) -> PingResult:
    server = ctx.mcp_server
    return PingResult(ok=True, server=server.name, version=server.version)


# --- the table ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolSpec(Generic[R]):
    """One tool as clients list it, and the handler that answers it."""

    name: str
    request: type[R]
    answer: type[BaseModel]
    title: str
    description: str
    annotations: ToolAnnotations
    handler: Callable[[App, R, ToolCtx], Awaitable[CallToolResult | BaseModel]]
    takes_roots: bool = True
    """The tool works on a repository, which the client's roots may name."""
    prebuilt_output: bool = True
    """The handler returns a `CallToolResult` whose structured content is the dump of `answer`;
    otherwise it returns the `answer` model and the SDK builds the result."""


SPAWN_DESCRIPTION = """\
Start a team of parallel subagents on this git repository; returns at once with a run_id while \
they work in the background.

Fan out when the goal splits into large, independent chunks (a module, a package, a test suite \
each) that take many steps; a small or tightly coupled change is cheaper done directly. Each task \
must be self-contained: its prompt is all the subagent knows besides shared_context (plan, \
conventions, files every agent reads at cache price). Give each task a write_scope of path \
prefixes that do not overlap the others' (e.g. ["src/auth/"], ["tests/auth/"]): agents with \
overlapping scopes run one after another, and a task without write_scope serializes with every \
writer. write_scope [] means read-only. Every agent starts from the same pinned commit, in its own \
isolated copy; nothing touches the user's checkout until merge_results. A task that needs \
another's result names it in depends_on: it waits until that one is merged, then starts from the \
head that contains it. verify_command (e.g. the test command) is run on the merged head before \
merge_results moves the branch.

Cost: all agents of a run draw on one shared token budget (budget_tokens); the answer includes \
an estimate and warnings. Then call get_status(run_id, since=0, wait_s=600) once: it waits \
until the run needs you and says what to call next."""

STATUS_DESCRIPTION = """\
Wait for a run to need you, then say what to do. With since=<cursor> (0 after spawning) and \
wait_s=600 it answers once the run is settled: every agent finished, or the rest wait on a scope \
that only a merge frees. An agent's turn never wakes it; wake_on='finished' wakes on each \
completion instead, for merging as results arrive. Each answer has `settled`, `next` (the call \
to make, naming agents) and one line per agent that changed after `since`: status, a one-line \
summary, files and lines changed, total tokens, flags (lease_lost, conflict, stale, error, \
dropped, and "read what another changes": it may come back stale).

Cheap loop: get_status -> do `next` (usually merge_results) -> get_status again, until `next` \
says nothing is left. Do not spin; do not re-read agents you have seen. Ask detail=[agent_id] \
or read fanout://agents/{id}/diff only when a line gives a reason (a flag, a failure, an \
unexpected file count). Statuses: queued, waiting, running, succeeded, failed, cancelled, \
interrupted, merged, conflicted, stale (read files changed since it started), verify_failed, \
discarded. State is durable across reconnects and restarts."""

MERGE_DESCRIPTION = """\
Fold finished agents' work into the repository's current branch, one agent at a time (3-way \
merge against the current head; the user's uncommitted changes are never overwritten).

Per agent: merged (or clean in a dry run), conflicted (with the paths; its branch and work are \
kept), stale (it read files another agent or the user changed since it started: a line merge \
would land work built on the old version), verify_failed (with its change, verify_command fails \
on the merged head: the output's tail; the others still land) or skipped (with the reason, e.g. \
still running). Use dry_run=true first if unsure: it changes nothing. For a conflicted, stale or \
verify_failed agent call rerun_subagent — never merge by hand (accept_stale=true merges stale \
agents anyway). discard=[ids] throws an agent's work away explicitly. Without agent_ids every \
succeeded agent is merged, writers before the agents that read their files. Agents whose scope \
or dependency waited on a merged one start after it: then call get_status again."""

CANCEL_DESCRIPTION = """\
Cancel a run's active agents (all, or agent_ids). Their work so far is committed on their branch \
and can be resumed with rerun_subagent; nothing is merged. Agents run by another fanout-mcp server \
on the same repository are cancelled too (that server stops them); the answer comes once they \
stopped, or after 30 s with where they are."""

RERUN_DESCRIPTION = """\
Run an agent's task again as a new agent of the same run, starting from the current head of the \
branch (which includes what was merged since), told what was rejected and why (the conflicting \
diff, the current versions of files it read stale, the failed verification's output) plus your \
instructions. Use it for a conflicted, stale, verify_failed, failed, cancelled or interrupted \
agent; then poll get_status and merge_results again."""

APPROVAL_DESCRIPTION = """\
Answer a subagent's call that waits for the person's approval (the permission policy says \
`ask`: a command, the network, a write to a guarded path, a destructive MCP tool). get_status \
shows it (the agent waits; `next` names the approval_id, what the agent wants and why). Ask the \
person, then allow=true lets the call run, allow=false refuses it (the agent is told, with the \
note). Clients that support elicitation are asked directly and rarely need this."""

PING_DESCRIPTION = "Health check: answers at once with the server's name and version; no effect."


def _writes(*, destructive: bool, idempotent: bool = False) -> ToolAnnotations:
    return ToolAnnotations(
        read_only_hint=False,
        destructive_hint=destructive,
        idempotent_hint=idempotent,
        open_world_hint=False,
    )


_READS = ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False)

TOOLS: tuple[ToolSpec[Any], ...] = (
    ToolSpec(
        name="spawn_subagents",
        request=SpawnRequest,
        answer=SpawnAnswer,
        title="Spawn parallel subagents",
        description=SPAWN_DESCRIPTION,
        annotations=_writes(destructive=False),
        handler=spawn_subagents,
    ),
    ToolSpec(
        name="get_status",
        request=StatusRequest,
        answer=StatusAnswer,
        title="Status of runs and agents (long-poll)",
        description=STATUS_DESCRIPTION,
        annotations=_READS,
        handler=get_status,
    ),
    ToolSpec(
        name="merge_results",
        request=MergeRequest,
        answer=MergeAnswer,
        title="Merge finished agents' work",
        description=MERGE_DESCRIPTION,
        annotations=_writes(destructive=True),
        handler=merge_results,
    ),
    ToolSpec(
        name="cancel_subagents",
        request=CancelRequest,
        answer=CancelAnswer,
        title="Cancel agents",
        description=CANCEL_DESCRIPTION,
        annotations=_writes(destructive=True, idempotent=True),
        handler=cancel_subagents,
    ),
    ToolSpec(
        name="rerun_subagent",
        request=RerunRequest,
        answer=RerunAnswer,
        title="Rerun an agent on the current head",
        description=RERUN_DESCRIPTION,
        annotations=_writes(destructive=False),
        handler=rerun_subagent,
    ),
    ToolSpec(
        name="answer_approval",
        request=AnswerApprovalRequest,
        answer=ApprovalAnswer,
        title="Answer an agent's approval request",
        description=APPROVAL_DESCRIPTION,
        annotations=_writes(destructive=False, idempotent=True),
        handler=answer_approval,
    ),
    ToolSpec(
        name="ping",
        request=PingRequest,
        answer=PingResult,
        title="Health check",
        description=PING_DESCRIPTION,
        annotations=_READS,
        handler=ping,
        takes_roots=False,
        prebuilt_output=False,
    ),
)


# --- the SDK's tools ----------------------------------------------------------------------------


async def _ask_roots(ctx: ToolCtx) -> ListRoots | None:
    """Ask the client for its roots once, when no repository is configured."""
    app = ctx.request_context.lifespan_context
    caps = ctx.client_capabilities
    if not app.repos.needs_roots or caps is None or caps.roots is None:
        return None
    return ListRoots()


Roots = Annotated[ListRootsResult | None, Resolve(_ask_roots)]


class ApprovalForm(BaseModel):
    """What the person answers when the server asks about an agent's call."""

    allow: bool = Field(description="Allow this call?")
    note: str = Field(default="", max_length=2_000, description="Optional: a word for the agent")


async def _pending_approval(ctx: ToolCtx) -> Approval | None:
    """The oldest approval to ask the person about, when the client can ask (form
    elicitation) and one waits that was not dismissed in this session."""
    caps = ctx.client_capabilities
    elicitation = caps.elicitation if caps is not None else None
    if elicitation is None or (elicitation.form is None and elicitation.url is not None):
        return None
    app = ctx.request_context.lifespan_context
    return await app.approval_to_ask()


def approval_message(approval: Approval) -> str:
    """The question the person sees."""
    why = f"\nWhy: {approval.why}" if approval.why else ""
    return (
        f"Subagent {approval.agent_id} asks to {approval.kind}: {approval.subject}{why}\n"
        f"(policy rule: {approval.rule}; approval {approval.approval_id})"
    )


async def _ask_approval(
    pending: Annotated[Approval | None, Resolve(_pending_approval)],
) -> Elicit[ApprovalForm] | None:
    if pending is None:
        return None
    return Elicit(approval_message(pending), ApprovalForm)


Pending = Annotated[Approval | None, Resolve(_pending_approval)]
Asked = Annotated[ElicitationResult[ApprovalForm], Resolve(_ask_approval)]


def _function(spec: ToolSpec[Any], app: App) -> Callable[..., Awaitable[Any]]:
    """The tool's function as the SDK reads it: the request, the context and, for a tool that
    works on a repository, the client's roots; its return annotation declares the answer."""
    handler = spec.handler

    async def with_roots(
        request: Any,
        ctx: ToolCtx,
        roots: Roots = None,
        pending: Pending = None,
        asked: Asked = None,  # pyright: ignore[reportArgumentType]
    ) -> Any:
        app.repos.offer_roots(roots)
        if pending is not None:
            await app.take_approval_answer(pending, asked)
        return await handler(app, request, ctx)

    async def without_roots(request: Any, ctx: ToolCtx) -> Any:
        return await handler(app, request, ctx)

    call = with_roots if spec.takes_roots else without_roots
    call.__name__ = call.__qualname__ = spec.name
    call.__annotations__["return"] = (
        Annotated[CallToolResult, spec.answer] if spec.prebuilt_output else spec.answer
    )
    return call


def sdk_tool(spec: ToolSpec[Any], app: App) -> Tool:
    """The SDK's tool for `spec`, answered by its handler over `app`."""
    tool = Tool.from_function(
        _function(spec, app),
        name=spec.name,
        title=spec.title,
        description=spec.description,
        annotations=spec.annotations,
    )
    if app.repos.configured is not None:
        # The repository is configured (--repo, FANOUT_REPO), so the client's roots could never
        # change which one a call works on: the tool takes `roots` as None instead of having
        # the SDK run its resolver on every call (the approval resolvers stay).
        sdk_patches.skip_resolvers(tool, "roots")
    sdk_patches.take_request_model(tool, spec.request)
    sdk_patches.simplify_output_schema(tool)
    if spec.prebuilt_output:
        # The structured content is the dump of the typed answer model: it matches the
        # published `outputSchema` by construction.
        sdk_patches.pass_structured_output(tool)
    return tool


def sdk_tools(app: App) -> list[Tool]:
    """The SDK's tools of the table, in its order."""
    return [sdk_tool(spec, app) for spec in TOOLS]
