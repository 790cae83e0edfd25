"""What a subagent's model is told: the run's shared prefix and each agent's own task.

The shared prefix depends only on the run (never on the agent), so it is byte-identical across the
run's agents and the 2nd..Nth agent reads it from the prompt cache.
"""

from __future__ import annotations

from orchestration.state import SharedSnapshot
from toolbus.resources import WriteScope
from toolbus.toolspec import ToolSpec

MAX_LISTED_PATHS = 2_000

SUMMARY_ANSWER_CHARS = 1_500
"""The most of an agent's summary that the coordinator's answers show."""

FINISH_TOOL = ToolSpec(
    name="finish",
    description=(
        "Call this once, when your task is done (or cannot be done). Your file changes are "
        "committed for review automatically; do not commit yourself. `summary`: what you changed "
        "and why, for the reviewer, in at most 1,500 characters, the first line a headline "
        "(the reviewer sees only the first line until they ask for more). `follow_ups`: work you "
        "noticed but left alone, at most 20 short items. `status`: 'done' if the task is "
        "complete, 'failed' if you could not do it (say why in the summary)."
    ),
    input_schema={
        "type": "object",
        "properties": {
            "summary": {
                "type": "string",
                "maxLength": SUMMARY_ANSWER_CHARS,
                "description": "what you did, for the reviewer; first line a headline",
            },
            "follow_ups": {
                "type": "array",
                "maxItems": 20,
                "items": {"type": "string", "maxLength": 300},
                "description": "work left for later",
            },
            "status": {"type": "string", "enum": ["done", "failed"]},
        },
        "required": ["summary"],
        "additionalProperties": False,
    },
)

INSTRUCTIONS = """\
You are one of several subagents working in parallel on the same code base. Each of you has
your own private copy of the repository (a git worktree at the run's base commit) and your own
task. A coordinator will review and merge your work after you finish.

How to work:
- Use the tools. Paths are relative to the repository root. Read before you edit; keep changes
  focused on your task; follow the conventions below.
- You may only change files inside your write scope (given with your task). A write outside it
  is refused; changes a command makes outside it are not kept.
- Several tool calls in one turn run concurrently when they only read; writes and commands run
  one at a time.
- A refused or failed tool call comes back as an error message: read it and adapt.
- Commands run in a sandbox in your copy of the repository, with a timeout and no network.
- When you are done, call `finish` with a summary for the reviewer. Do not stop without it.
"""


def shared_prefix(shared: SharedSnapshot, paths: list[str]) -> str:
    """The run's shared system prompt: instructions, then the shared context at the base."""
    parts = [INSTRUCTIONS, f"\n# The run\nBase commit: {shared.base_commit}\n"]
    if shared.plan:
        parts.append(f"\n# The plan (shared by all subagents)\n{shared.plan.strip()}\n")
    if shared.conventions:
        parts.append(f"\n# Conventions\n{shared.conventions.strip()}\n")
    listed = paths[:MAX_LISTED_PATHS]
    more = len(paths) - len(listed)
    parts.append(f"\n# Files in the repository ({len(paths)})\n")
    parts.append("\n".join(listed))
    if more:
        parts.append(f"\n… and {more} more (use list_files)")
    parts.append("\n")
    for f in shared.files:
        if f.content is not None:
            parts.append(f"\n# File: {f.path} (at the base)\n```\n{f.content}\n```\n")
        else:
            parts.append(f"\n# File: {f.path}: {f.note or 'not included'}\n")
    return "".join(parts)


def task_prompt(
    *, name: str, prompt: str, scope: WriteScope, max_turns: int, rerun_context: str | None
) -> str:
    """The agent's own part of the system prompt."""
    text = (
        f"# Your task ({name})\n{prompt.strip()}\n\n"
        f"Your write scope: {scope.describe()}.\n"
        f"You have at most {max_turns} turns.\n"
    )
    if rerun_context:
        text += f"\n# This is a re-run\n{rerun_context.strip()}\n"
    return text


FIRST_MESSAGE = "Start on your task now. Call `finish` when you are done."
