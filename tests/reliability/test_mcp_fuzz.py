"""Hostile input on the MCP side: every tool fed from its own input schema, then mutated.

The schemas come from `tools/list` through a real MCP client (legacy era in memory, so every
request and answer is serialized). Hypothesis draws arguments that satisfy a schema, and
mutations of them: a required field dropped, an unknown field added, a value of the wrong type,
strings over their caps, unicode tricks, NUL bytes, path tricks. Every call must be answered with
a tool error (no traceback, no "internal error") or a result that validates against the tool's
output schema; the server must still answer and settle at the end.

Profiles: `FANOUT_RELIABILITY=full` draws 1,200 cases, the CI profile 120.
"""

from __future__ import annotations

import json
import string
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import anyio
import anyio.from_thread
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client, MCPError
from mcp_types import CallToolResult, TextContent, Tool

from mcp_server.server import build_server
from orchestration.config import Settings
from orchestration.model import ModelRequest, ModelResponse
from orchestration.providers.function import FunctionModel
from tests.orchestration.scripts import make_repo, text_reply, tool_reply, turn_index
from tests.reliability.conftest import FULL, Ledger

GUARANTEE = "G4 MCP tools answer hostile input with an error or a valid result"
EXAMPLES = 1200 if FULL else 120
ACTIVE = ("queued", "waiting", "running")

Json = Any
SchemaStrategy = Callable[[dict[str, Json]], st.SearchStrategy[Json]]

HOSTILE_STRINGS: list[str] = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "../../../../etc/passwd",
    "/",
    "/etc",
    "..",
    ".git",
    ".git/config",
    "\\..\\..\\x",
    "\u202e\u2066evil\u2069",
    "\ufeff",
    "e\u0301",
    "\U0001f4a9" * 50,
    "%00%2e%2e",
    "{{7*7}}${PATH}$(id)`id`",
    "'; DROP TABLE runs; --",
    "\r\n\r\nHTTP/1.1 200 OK",
    "x" * 5000,
    "y" * 300_000,
    "r-" + "0" * 62,
    "fanout://runs",
]


def _safe_repo_values(repo: Path, tmp: Path) -> list[Json]:
    """`repo` values that cannot reach a real repository (the test's cwd is a temp dir)."""
    (tmp / "plain").mkdir(exist_ok=True)
    (tmp / "afile").write_text("x")
    return [
        str(repo),
        str(repo / "src"),
        str(repo / ".git"),
        str(tmp / "plain"),
        str(tmp / "afile"),
        str(tmp / "missing"),
        "/",
        "/proc/self",
        "/dev/null",
        "",
        ".",
        "..",
        "a\x00b",
        "x" * 5000,
        None,
        7,
        [str(repo)],
    ]


class SchemaStrategies:
    """Strategies for values satisfying (a practical subset of) a tool's JSON schema."""

    def __init__(self, root: dict[str, Json], repo_values: list[Json]) -> None:
        self.root = root
        self.repo_values = repo_values

    def _deref(self, schema: dict[str, Json]) -> dict[str, Json]:
        while "$ref" in schema:
            name = str(schema["$ref"]).rsplit("/", 1)[-1]
            schema = cast(dict[str, Json], self.root["$defs"][name])
        return schema

    def valid(self, schema: dict[str, Json], key: str = "") -> st.SearchStrategy[Json]:
        schema = self._deref(schema)
        if key == "repo":
            return st.sampled_from(self.repo_values)
        if "anyOf" in schema:
            return st.one_of([self.valid(s, key) for s in schema["anyOf"]])
        if "enum" in schema:
            return st.sampled_from(schema["enum"])
        kind = schema.get("type")
        if kind == "object":
            props = cast(dict[str, dict[str, Json]], schema.get("properties", {}))
            required = set(cast(list[str], schema.get("required", [])))
            fixed = {k: self.valid(v, k) for k, v in props.items() if k in required}
            optional = {k: self.valid(v, k) for k, v in props.items() if k not in required}
            return st.fixed_dictionaries(fixed, optional=optional)
        if kind == "array":
            if key == "mcp_servers":  # no downstream server is configured here
                return st.just([])
            low = int(schema.get("minItems", 0))
            high = min(int(schema.get("maxItems", 3)), low + 2, 3)
            return st.lists(self.valid(schema.get("items", {}), key), min_size=low, max_size=high)
        if kind == "string":
            low = int(schema.get("minLength", 0))
            high = min(int(schema.get("maxLength", 60)), 60)
            if key in ("write_scope", "files"):
                return st.sampled_from(["src", "docs/", "src/greet.py", "README.md", "", "x/y"])
            if key in ("allow", "ask", "deny"):  # permission rules have a grammar
                return st.sampled_from(["run_command", "write(*.lock)", "network", "mcp:writes"])
            if key in ("mcp_servers", "resources"):  # names: none configured / a plain name
                return st.sampled_from(["port:8000", "cache"])
            return st.text(min_size=max(low, 1 if key == "prompt" else low), max_size=high)
        if kind == "integer":
            return st.integers(schema.get("minimum"), schema.get("maximum"))
        if kind == "number":
            return st.floats(schema.get("minimum"), min(float(schema.get("maximum", 1.0)), 1.0))
        if kind == "boolean":
            return st.booleans()
        if kind == "null":
            return st.none()
        return st.none()

    def hostile_value(self) -> st.SearchStrategy[Json]:
        scalars = st.one_of(
            st.sampled_from(HOSTILE_STRINGS),
            st.text(alphabet=st.characters(codec="utf-8"), max_size=200),
            st.integers(),
            st.floats(allow_nan=False),
            st.booleans(),
            st.none(),
        )
        return st.recursive(
            scalars,
            lambda inner: st.one_of(
                st.lists(inner, max_size=4),
                st.dictionaries(st.text(string.ascii_letters, max_size=8), inner, max_size=4),
            ),
            max_leaves=8,
        )

    def arguments(self, schema: dict[str, Json]) -> st.SearchStrategy[Json]:
        """Valid arguments, or a mutation of them."""
        base = self.valid(schema)
        props = list(cast(dict[str, Json], schema.get("properties", {})))
        required = list(cast(list[str], schema.get("required", [])))

        @st.composite
        def mutated(draw: st.DrawFn) -> Json:
            args: dict[str, Json] = draw(base)
            how = draw(st.sampled_from(["drop", "extra", "retype", "hostile", "whole"]))
            if how == "drop" and required:
                args.pop(draw(st.sampled_from(required)), None)
            elif how == "extra":
                args[draw(st.text(min_size=1, max_size=20))] = draw(self.hostile_value())
            elif how in ("retype", "hostile") and props:
                key = draw(st.sampled_from(props))
                if key == "repo":
                    args[key] = draw(st.sampled_from(self.repo_values))
                else:
                    args[key] = draw(self.hostile_value())
            elif how == "whole":
                # The MCP client only sends JSON objects as arguments: hostile members instead.
                return draw(st.dictionaries(st.text(max_size=12), self.hostile_value(), max_size=5))
            return args

        @st.composite
        def deep(draw: st.DrawFn) -> Json:
            """A hostile string planted inside a nested valid value (tasks[i].prompt, ...)."""
            args: dict[str, Json] = draw(base)
            tasks = args.get("tasks")
            if isinstance(tasks, list) and tasks:
                task = cast(dict[str, Json], tasks[0])
                field = draw(st.sampled_from(["prompt", "name", "write_scope", "model"]))
                value = draw(st.sampled_from(HOSTILE_STRINGS))
                task[field] = [value] if field == "write_scope" else value
            return args

        return st.one_of(base, mutated(), deep())


def _text(result: CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, TextContent))


def _judge(tool: Tool, result: CallToolResult) -> str | None:
    text = _text(result)
    if "Traceback" in text or "internal error" in text.lower():
        return f"internal error: {text[:200]}"
    if result.is_error:
        return None if text.strip() else "an error without a message"
    if tool.output_schema is not None:
        if result.structured_content is None:
            return "a success without structured content"
        try:
            jsonschema.validate(result.structured_content, tool.output_schema)
        except jsonschema.ValidationError as exc:
            return f"structured content does not match the output schema: {exc.message[:200]}"
    return None


def _model() -> FunctionModel:
    """Agents spawned by fuzzing read one file, then finish (or just talk, for odd prompts)."""

    async def reply(request: ModelRequest) -> ModelResponse:
        turn = turn_index(request)
        if "\x00" in request.system_task:
            return text_reply("odd task")
        if turn == 0:
            return tool_reply("list_files", {}, turn)
        return tool_reply("finish", {"summary": "fuzz agent done"}, turn)

    return FunctionModel(reply)


def _settle(portal: anyio.from_thread.BlockingPortal, client: Client, run_id: str) -> str | None:
    """Cancel the run, then long-poll until no agent is active; the statuses left, if any."""
    cancel: dict[str, Json] = {"run_id": run_id}
    portal.call(client.call_tool, "cancel_subagents", cancel)
    deadline = time.monotonic() + 30
    cursor = 0
    active: list[str] = []
    while time.monotonic() < deadline:
        query: dict[str, Json] = {"run_id": run_id, "since": cursor, "wait_s": 0.2}
        result = portal.call(client.call_tool, "get_status", query)
        body = cast(dict[str, Json], result.structured_content or {})
        cursor = int(body.get("cursor", cursor))
        runs = cast(list[dict[str, Json]], body.get("runs", []))
        agents = cast(list[dict[str, Json]], runs[0]["agents"]) if runs else []
        active = [str(a["status"]) for a in agents if a["status"] in ACTIVE]
        if not active:
            return None
    return f"still active after cancel: {active}"


def test_mcp_tools_survive_generated_and_hostile_input(
    tmp_path: Path, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    repo = make_repo(tmp_path / "repo", {"README.md": "# r\n", "src/greet.py": "x = 1\n"})
    config = Settings.from_env(
        {}, repo=repo, sandbox="none", status_wait_cap_s=0.2, max_turns=3, lease_ttl_s=30.0
    )
    server = build_server(config, lambda _name: _model())
    counts: dict[str, int] = {}
    successes: dict[str, int] = {}
    with (
        anyio.from_thread.start_blocking_portal() as portal,
        portal.wrap_async_context_manager(Client(server, mode="legacy")) as client,
    ):
        tools = {t.name: t for t in portal.call(client.list_tools).tools}
        assert set(tools) >= {"spawn_subagents", "get_status", "merge_results"}
        strategies = {
            name: SchemaStrategies(tool.input_schema, _safe_repo_values(repo, tmp_path)).arguments(
                tool.input_schema
            )
            for name, tool in tools.items()
        }
        calls = st.sampled_from(sorted(tools)).flatmap(
            lambda name: st.tuples(st.just(name), strategies[name])
        )

        def call(name: str, arguments: Json) -> None:
            counts[name] = counts.get(name, 0) + 1
            case = f"{name} {json.dumps(arguments, default=str)[:160]}"
            try:
                result = portal.call(client.call_tool, name, arguments)
            except MCPError as exc:
                # a protocol-level refusal of the request is an answer, unless it is internal
                ok = exc.error.code != -32603
                ledger.record(GUARANTEE, case, ok, f"MCPError {exc.error.code}: {exc}")
                return
            reason = _judge(tools[name], result)
            if not result.is_error:
                successes[name] = successes.get(name, 0) + 1
            ledger.record(GUARANTEE, case, reason is None, reason or "")

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            derandomize=not FULL,
        )
        @given(calls)
        def fuzz(drawn: tuple[str, Json]) -> None:
            call(*drawn)

        fuzz()
        # the server is still up, and every spawned agent settles
        no_args: dict[str, Json] = {}
        final = portal.call(client.call_tool, "get_status", no_args)
        ledger.record(GUARANTEE, "final get_status", not final.is_error, _text(final)[:200])
        structured = cast(dict[str, Json], final.structured_content or {})
        runs = cast(list[dict[str, Json]], structured.get("runs", []))
        for run in runs:  # agents of overlapping runs wait for merges: cancel, then settle
            left = _settle(portal, client, str(run["run_id"]))
            ledger.record(
                GUARANTEE, f"run {run['run_id']} cancels cleanly", left is None, left or ""
            )
        ping = portal.call(client.call_tool, "ping", no_args)
        ledger.record(GUARANTEE, "final ping", not ping.is_error, _text(ping)[:200])
    failures = ledger.failures(GUARANTEE)
    assert not failures, "\n".join(failures[:30])
    assert sum(counts.values()) >= EXAMPLES * 0.9, counts
    assert len(counts) == len(tools), counts
    # not vacuous: generated input also gets through validation and does real work
    assert successes.get("spawn_subagents", 0) >= 1 and successes.get("get_status", 0) >= 1, (
        successes
    )
