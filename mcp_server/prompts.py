"""The `plan_fanout` prompt: how to decompose a goal into a run of parallel subagents."""

from __future__ import annotations

from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

PLAN_FANOUT = """\
Goal: {goal}

You can run a team of parallel subagents on this repository with the fanout tools. Plan first:

1. Decide whether fanning out pays. It does when the goal splits into large, independent chunks
   that each take many steps (a module, a package, a test suite each). A small or tightly coupled
   change is cheaper done directly; then do it yourself and stop here.
2. Read enough of the repository to split the goal into 2-8 tasks that can be done independently,
   in any order. For each task write a self-contained prompt (the subagent sees only it and the
   shared context), a short name, and a write_scope: the path prefixes it may change. Write scopes
   must not overlap (overlapping agents run one after another); give read-only tasks write_scope [].
3. Write the shared context once: the plan (how the pieces fit, interfaces between them),
   conventions (style, test commands), and the few files every agent must read.
4. Call spawn_subagents with the tasks and shared_context. It returns at once with a run_id and a
   cost estimate against the shared token budget; read its warnings.
5. Call get_status(run_id, since=0, wait_s=600) once: it waits, without costing you turns,
   until the run needs you (it is `settled`: every agent finished, or the rest wait on work only
   you can merge), then answers with one line per agent (status, a one-line summary, files and
   lines changed, tokens, flags) and `next`, the call to make. If it comes back unsettled
   (wait_s ran out), call it again with since=<cursor>. Do not read diffs or ask for
   detail=[agent_id] unless a summary or a flag gives you a reason.
6. Do what `next` says: usually merge_results(run_id) (dry_run=true first if unsure). Agents that
   waited for an overlapping scope start after that merge: poll and merge again until `next` says
   nothing is left.
7. For each conflicted, stale, verify_failed or failed agent call rerun_subagent(agent_id,
   instructions) - never merge by hand - then poll and merge again. Finish with a short report of
   what landed.
"""


def register_prompts(server: MCPServer[Any]) -> None:
    @server.prompt(
        name="plan_fanout",
        title="Plan a fan-out",
        description="Decompose a goal into independent tasks with non-overlapping write scopes "
        "and a shared context, then spawn, poll, merge and rerun.",
    )
    def plan_fanout(goal: str) -> str:
        if not goal.strip():
            raise ToolError("goal must not be blank: say what the team should achieve")
        return PLAN_FANOUT.format(goal=goal.strip())
