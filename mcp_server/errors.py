"""The one translation of domain errors into MCP errors, at the tool and resource boundary.

A tool failure reaches the client as a `CallToolResult(isError=True)` whose text says what went
wrong and what to do; a resource failure as a JSON-RPC error. No stack trace crosses::

    pydantic ValidationError (arguments)  -> ToolError "invalid arguments: <field>: <expected>"
    OrchestrationError subclasses         -> ToolError "<kind>: <message>"
    anything else                         -> ToolError "internal error (see the server log)"
"""

from __future__ import annotations

import logging
from typing import cast

from mcp.server.mcpserver.exceptions import (
    ResourceError,
    ResourceNotFoundError,
    ToolError,
)
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from orchestration.errors import (
    BudgetExhausted,
    ConfigError,
    InvalidRequest,
    InvalidState,
    MergeError,
    ModelError,
    NotFound,
    OrchestrationError,
    RepositoryError,
)

log = logging.getLogger("fanout.mcp")

_KINDS: tuple[tuple[type[OrchestrationError], str], ...] = (
    (ConfigError, "configuration error"),
    (RepositoryError, "repository error"),
    (InvalidRequest, "invalid request"),
    (NotFound, "not found"),
    (InvalidState, "not possible now"),
    (BudgetExhausted, "budget exhausted"),
    (MergeError, "merge error"),
    (ModelError, "model error"),
)


def _loc(err: ErrorDetails) -> str:
    parts = [str(p) for p in err["loc"]]
    out = ""
    for part in parts:
        if part.isdigit():
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or "(arguments)"


def _expected(err: ErrorDetails) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown field; remove it (see the tool's input schema for the accepted fields)"
    if kind == "missing":
        return "required field is missing"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg.removeprefix("Value error, ")
    return msg


def validation_message(exc: ValidationError) -> str:
    """`field: what is expected` for each problem, one per line; never the rejected values."""
    lines = [f"{_loc(err)}: {_expected(err)}" for err in exc.errors()]
    return "invalid arguments:\n" + "\n".join(f"- {line}" for line in lines)


def domain_message(exc: OrchestrationError) -> str:
    for cls, kind in _KINDS:
        if isinstance(exc, cls):
            return f"{kind}: {exc}"
    return str(exc)


def _unwrap(exc: BaseException, wrapper: type[Exception]) -> BaseException:
    """Look through the SDK's wrappers and single-exception task-group groups for ours."""
    cause: BaseException = exc
    while True:
        if isinstance(cause, wrapper) and cause.__cause__ is not None:
            cause = cause.__cause__
        elif isinstance(cause, BaseExceptionGroup):
            group = cast("BaseExceptionGroup[BaseException]", cause)
            if len(group.exceptions) != 1:
                return group
            cause = group.exceptions[0]
        else:
            return cause


def tool_error(exc: BaseException, tool: str) -> ToolError:
    """The ToolError the client sees for an exception raised by (or around) a tool."""
    cause = _unwrap(exc, ToolError)
    if isinstance(cause, ValidationError):
        return ToolError(f"{tool}: {validation_message(cause)}")
    if isinstance(cause, OrchestrationError):
        return ToolError(f"{tool}: {domain_message(cause)}")
    if isinstance(cause, ToolError):
        return cause
    log.error("tool %s failed unexpectedly", tool, exc_info=cause)
    return ToolError(
        f"{tool}: internal error ({type(cause).__name__}); the server log has the details"
    )


def resource_error(exc: BaseException, uri: str) -> ResourceError:
    """The ResourceError the client sees for a failed read."""
    cause = _unwrap(exc, ResourceError)
    if isinstance(cause, NotFound):
        return ResourceNotFoundError(f"{uri}: {domain_message(cause)}")
    if isinstance(cause, OrchestrationError):
        return ResourceError(f"{uri}: {domain_message(cause)}")
    if isinstance(cause, ResourceError):
        return cause
    log.error("resource %s failed unexpectedly", uri, exc_info=cause)
    return ResourceError(f"{uri}: internal error ({type(cause).__name__}); see the server log")
