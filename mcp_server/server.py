"""The MCP server: five orchestration tools, a health check, resources and a prompt.

One `Orchestrator` per server process, opened in the lifespan; on shutdown its running agents
become `interrupted`. Tool inputs and outputs are the contracts models: each tool publishes an
`outputSchema`, answers `structuredContent` plus a short text table, and refuses unknown fields.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager, suppress
from typing import Annotated, Any

import anyio
from mcp.server.mcpserver import Context, ListRoots, MCPServer, Resolve
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from mcp.server.mcpserver.tools import Tool
from mcp.server.subscriptions import InMemorySubscriptionBus
from mcp.shared.exceptions import MCPError
from mcp_types import (
    CallToolResult,
    InputRequiredResult,
    ListRootsResult,
    TextContent,
    ToolAnnotations,
)
from pydantic import BaseModel, ConfigDict, Field
from pydantic.networks import AnyUrl

from mcp_server import answers, sdk_patches
from mcp_server.answers import (
    CancelAnswer,
    MergeAnswer,
    RerunAnswer,
    SpawnAnswer,
    StatusAnswer,
)
from mcp_server.app import App
from mcp_server.errors import resource_error, tool_error
from mcp_server.prompts import register_prompts
from mcp_server.resources import register_resources
from orchestration.attention import WakeOn
from orchestration.config import Settings
from orchestration.contracts import (
    MAX_TASKS,
    MergeRequest,
    MergeResult,
    SpawnRequest,
    StatusResult,
)
from orchestration.orchestrator import ModelFactory

log = logging.getLogger("fanout.mcp")

SERVER_NAME = "fanout"
VERSION = "0.1.0"

INSTRUCTIONS = """\
fanout runs a team of parallel subagents on this git repository. Each subagent works in its own
isolated copy, from one pinned base commit, and may only write inside its write_scope. Fan out
when a goal splits into large, independent chunks (e.g. one module each); for a small change do
it yourself. Flow: spawn_subagents (returns at once) -> get_status(run_id, since=cursor,
wait_s=600), which answers once the run needs you (`settled`) with one line per agent and `next`
-> do `next` (usually merge_results; waiting agents start after it) -> poll again until `next`
says nothing is left. Read an agent's diff or detail only when its line gives a reason. Never
merge an agent's work by hand."""


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StatusRequest(_Input):
    """Input of `get_status`."""

    run_id: str | None = Field(default=None, min_length=1, max_length=64)
    agent_ids: list[str] | None = Field(default=None, max_length=MAX_TASKS * 4)
    since: int | None = Field(
        default=None,
        ge=0,
        description="the `cursor` of an earlier answer (0 right after spawning): lists only "
        "the agents that changed after it; with `wait_s`, waits until the run needs you",
    )
    wait_s: float | None = Field(
        default=None,
        ge=0,
        le=3600,
        description="long-poll: with `since`, wait up to this many seconds (capped by the "
        "server) for what `wake_on` names; an agent's turn never wakes it",
    )
    wake_on: WakeOn = Field(
        default=WakeOn.SETTLED,
        description="what ends the wait early: 'settled' (the run needs you: everything "
        "finished, or the rest waits on a merge) or 'finished' (any agent finished, to merge as "
        "results arrive); a lost lease or an exhausted budget always does",
    )
    detail: list[str] | None = Field(
        default=None,
        max_length=16,
        description="agent ids whose full record to include (result with commands, leases, "
        "follow-ups); ask only when an agent's line gives a reason",
    )


class CancelRequest(_Input):
    """Input of `cancel_subagents`."""

    run_id: str = Field(min_length=1, max_length=64)
    agent_ids: list[str] | None = Field(default=None, max_length=MAX_TASKS * 4)


class RerunRequest(_Input):
    """Input of `rerun_subagent`."""

    agent_id: str = Field(min_length=1, max_length=80)
    instructions: str | None = Field(
        default=None,
        max_length=100_000,
        description="extra guidance for the new attempt (what to do differently)",
    )


class PingRequest(_Input):
    """Input of `ping` (none)."""


class PingResult(BaseModel):
    """Result of `ping`."""

    ok: bool
    server: str
    version: str


ToolCtx = Context[App, Any]


def _tool(
    fn: Callable[..., Awaitable[Any]],
    *,
    name: str,
    request_model: type[BaseModel],
    title: str,
    description: str,
    annotations: ToolAnnotations,
    prebuilt_output: bool = True,
    ask_roots: bool = True,
) -> Tool:
    tool = Tool.from_function(
        fn, name=name, title=title, description=description, annotations=annotations
    )
    if not ask_roots:
        # The repository is configured (--repo, FANOUT_REPO), so the client's roots could never
        # change which one a call works on: the tool takes `roots` as None instead of having
        # the SDK run its resolver on every call.
        sdk_patches.skip_resolvers(tool)
    sdk_patches.take_request_model(tool, request_model)
    sdk_patches.simplify_output_schema(tool)
    if prebuilt_output:
        # The tool returns a `CallToolResult` whose structured content is the dump of its typed
        # result model (`_result`): it matches the published `outputSchema` by construction.
        sdk_patches.pass_structured_output(tool)
    return tool


def _result(
    model: BaseModel, text: str, structured: dict[str, Any] | None = None
) -> CallToolResult:
    """The tool's answer: `text`, and the model's JSON dump (or `structured`, the same dump
    built otherwise) as structured content."""
    return CallToolResult(
        content=[TextContent(type="text", text=text)],
        structured_content=model.model_dump(mode="json") if structured is None else structured,
    )


async def _ask_roots(ctx: ToolCtx) -> ListRoots | None:
    """Ask the client for its roots once, when no repository is configured."""
    app = ctx.request_context.lifespan_context
    caps = ctx.client_capabilities
    if not app.repos.needs_roots or caps is None or caps.roots is None:
        return None
    return ListRoots()


Roots = Annotated[ListRootsResult | None, Resolve(_ask_roots)]

# --- tool descriptions (what the orchestrating model reads first) ------------------------------

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
isolated copy; nothing touches the user's checkout until merge_results.

Cost: all agents of a run draw on one shared token budget (budget_tokens); the answer includes \
an estimate and warnings. Then call get_status(run_id, since=0, wait_s=600) once: it waits \
until the run needs you and says what to call next."""

STATUS_DESCRIPTION = """\
Wait for a run to need you, then say what to do. With since=<cursor> (0 after spawning) and \
wait_s=600 it answers once the run is settled: every agent finished, or the rest wait on a scope \
that only a merge frees. An agent's turn never wakes it; wake_on='finished' wakes on each \
completion instead, for merging as results arrive. Each answer has `settled`, `next` (the call \
to make, naming agents) and one line per agent that changed after `since`: status, a one-line \
summary, files and lines changed, total tokens, flags (lease_lost, conflict, error, dropped).

Cheap loop: get_status -> do `next` (usually merge_results) -> get_status again, until `next` \
says nothing is left. Do not spin; do not re-read agents you have seen. Ask detail=[agent_id] \
or read fanout://agents/{id}/diff only when a line gives a reason (a flag, a failure, an \
unexpected file count). Statuses: queued, waiting, running, succeeded, failed, cancelled, \
interrupted, merged, conflicted, discarded. State is durable across reconnects and restarts."""

MERGE_DESCRIPTION = """\
Fold finished agents' work into the repository's current branch, one agent at a time (3-way \
merge against the current head; the user's uncommitted changes are never overwritten).

Per agent: merged (or clean in a dry run), conflicted (with the paths; its branch and work are \
kept) or skipped (with the reason, e.g. still running). Use dry_run=true first if unsure: it \
changes nothing. For a conflicted agent call rerun_subagent — never merge by hand. discard=[ids] \
throws an agent's work away explicitly. Without agent_ids every succeeded agent is merged, in the \
order they finished. Agents whose scope waited on a merged one start after it: then call \
get_status again."""

CANCEL_DESCRIPTION = """\
Cancel a run's active agents (all, or agent_ids). Their work so far is committed on their branch \
and can be resumed with rerun_subagent; nothing is merged. Agents run by another fanout-mcp server \
on the same repository are cancelled too (that server stops them); the answer comes once they \
stopped, or after 30 s with where they are."""

RERUN_DESCRIPTION = """\
Run an agent's task again as a new agent of the same run, starting from the current head of the \
branch (which includes what was merged since), told what was rejected and why (the conflicting \
diff) plus your instructions. Use it for a conflicted, failed, cancelled or interrupted agent; \
then poll get_status and merge_results again."""

PING_DESCRIPTION = "Health check: answers at once with the server's name and version; no effect."


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


def build_server(settings: Settings, model_factory: ModelFactory | None = None) -> FanoutServer:
    """The MCP server for these settings (the model factory defaults to the Anthropic API)."""
    app = App(settings, model_factory)
    return FanoutServer(app)


class FanoutServer(MCPServer[App]):
    """MCPServer with fanout's tools, resources and prompt, and the one error translation."""

    def __init__(self, app: App) -> None:
        self.app = app
        bus = InMemorySubscriptionBus()
        app.notifier.bus = bus

        @asynccontextmanager
        async def lifespan(_: MCPServer[App]) -> AsyncGenerator[App]:
            async with app.running():
                yield app

        super().__init__(
            SERVER_NAME,
            title="fanout: parallel subagents",
            version=VERSION,
            instructions=INSTRUCTIONS,
            lifespan=lifespan,
            subscriptions=bus,
            tools=self._tools(),
            log_level="WARNING",
        )
        register_resources(self, app)
        register_prompts(self)
        app.notifier.install_legacy_subscribe(sdk_patches.lowlevel_server(self))
        sdk_patches.answer_tool_calls_on_the_wire(self)

    # --- the one translation of errors ------------------------------------------------------

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[App, Any] | None = None
    ) -> CallToolResult | InputRequiredResult:
        try:
            return await super().call_tool(name, arguments, context)
        except MCPError:
            raise
        except Exception as exc:
            raise tool_error(exc, name) from None

    async def read_resource(
        self, uri: AnyUrl | str, context: Context[App, Any] | None = None
    ) -> Iterable[Any] | InputRequiredResult:
        try:
            return await super().read_resource(uri, context)
        except MCPError:
            raise
        except ResourceError as exc:
            if exc.__cause__ is None:
                raise
            raise resource_error(exc, str(uri)) from None

    # --- tools ------------------------------------------------------------------------------

    def _tools(self) -> list[Tool]:
        app = self.app
        ask_roots = app.repos.configured is None

        async def spawn_subagents(
            request: SpawnRequest, ctx: ToolCtx, roots: Roots = None
        ) -> Annotated[CallToolResult, SpawnAnswer]:
            app.repos.offer_roots(roots)
            repo = await app.context(request.repo)
            result = await app.orchestrator.spawn(request, default_repo=repo.repo.root)
            answer = answers.spawn_answer(result)
            return _result(answer, answers.spawn_text(answer), answers.dump(answer))

        async def get_status(
            request: StatusRequest, ctx: ToolCtx, roots: Roots = None
        ) -> Annotated[CallToolResult, StatusAnswer]:
            app.repos.offer_roots(roots)
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
                answer = answers.status_answer(result, detail)
                structured, text = answers.dump(answer), answers.status_text(answer)
                app.last_status = (result, detail, structured, text)
            return CallToolResult(
                content=[TextContent(type="text", text=text)], structured_content=structured
            )

        async def merge_results(
            request: MergeRequest, ctx: ToolCtx, roots: Roots = None
        ) -> Annotated[CallToolResult, MergeAnswer]:
            app.repos.offer_roots(roots)
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
            answer = answers.merge_answer(result)
            return _result(answer, answers.merge_text(answer), answers.dump(answer))

        async def cancel_subagents(
            request: CancelRequest, ctx: ToolCtx, roots: Roots = None
        ) -> Annotated[CallToolResult, CancelAnswer]:
            app.repos.offer_roots(roots)
            repo = await app.context()
            result = await app.orchestrator.cancel(
                request.run_id, request.agent_ids, repo=repo.repo.root
            )
            answer = answers.cancel_answer(result)
            return _result(answer, answers.cancel_text(answer), answers.dump(answer))

        async def rerun_subagent(
            request: RerunRequest, ctx: ToolCtx, roots: Roots = None
        ) -> Annotated[CallToolResult, RerunAnswer]:
            app.repos.offer_roots(roots)
            repo = await app.context()
            result = await app.orchestrator.rerun(
                request.agent_id, request.instructions, repo=repo.repo.root
            )
            answer = answers.rerun_answer(result)
            return _result(answer, answers.rerun_text(answer), answers.dump(answer))

        async def ping(request: PingRequest, ctx: ToolCtx) -> PingResult:
            return PingResult(ok=True, server=SERVER_NAME, version=VERSION)

        return [
            _tool(
                spawn_subagents,
                ask_roots=ask_roots,
                name="spawn_subagents",
                request_model=SpawnRequest,
                title="Spawn parallel subagents",
                description=SPAWN_DESCRIPTION,
                annotations=ToolAnnotations(
                    read_only_hint=False,
                    destructive_hint=False,
                    idempotent_hint=False,
                    open_world_hint=False,
                ),
            ),
            _tool(
                get_status,
                ask_roots=ask_roots,
                name="get_status",
                request_model=StatusRequest,
                title="Status of runs and agents (long-poll)",
                description=STATUS_DESCRIPTION,
                annotations=ToolAnnotations(
                    read_only_hint=True, idempotent_hint=True, open_world_hint=False
                ),
            ),
            _tool(
                merge_results,
                ask_roots=ask_roots,
                name="merge_results",
                request_model=MergeRequest,
                title="Merge finished agents' work",
                description=MERGE_DESCRIPTION,
                annotations=ToolAnnotations(
                    read_only_hint=False,
                    destructive_hint=True,
                    idempotent_hint=False,
                    open_world_hint=False,
                ),
            ),
            _tool(
                cancel_subagents,
                ask_roots=ask_roots,
                name="cancel_subagents",
                request_model=CancelRequest,
                title="Cancel agents",
                description=CANCEL_DESCRIPTION,
                annotations=ToolAnnotations(
                    read_only_hint=False,
                    destructive_hint=True,
                    idempotent_hint=True,
                    open_world_hint=False,
                ),
            ),
            _tool(
                rerun_subagent,
                ask_roots=ask_roots,
                name="rerun_subagent",
                request_model=RerunRequest,
                title="Rerun an agent on the current head",
                description=RERUN_DESCRIPTION,
                annotations=ToolAnnotations(
                    read_only_hint=False,
                    destructive_hint=False,
                    idempotent_hint=False,
                    open_world_hint=False,
                ),
            ),
            _tool(
                ping,
                name="ping",
                request_model=PingRequest,
                title="Health check",
                description=PING_DESCRIPTION,
                annotations=ToolAnnotations(
                    read_only_hint=True, idempotent_hint=True, open_world_hint=False
                ),
                prebuilt_output=False,
            ),
        ]


__all__ = ["App", "FanoutServer", "ToolError", "build_server"]
