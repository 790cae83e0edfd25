"""Errors of the orchestration layer.

The MCP layer translates these, in one place, into tool errors::

    OrchestrationError
    ├── ConfigError             a missing API key, a bad option; says what to set
    ├── RepositoryError         not a git repository, no commit to base a run on, git failed
    ├── InvalidRequest          a spawn/merge/rerun request that does not validate (names the field)
    ├── NotFound
    │   ├── RunNotFound
    │   ├── AgentNotFound
    │   └── PathNotFound        no such file at a run's base
    ├── InvalidState            the operation does not fit the agent's or run's status
    ├── BudgetExhausted         the run's shared token budget is spent
    ├── MergeError              the join step could not proceed (lock, git failure)
    └── ModelError              a model call failed; `retryable` says whether a retry may help
        ├── ModelRateLimited    429; carries the server's retry-after if any
        ├── ModelOverloaded     529 / 5xx
        ├── ModelTimeout        no answer within the timeout
        ├── ModelConnectionError
        ├── ModelResponseError  a malformed or unusable answer (retryable)
        └── ModelFatalError     authentication, permission, bad request: not retryable
"""

from __future__ import annotations


class OrchestrationError(Exception):
    """Base of every orchestration error; the message says what to do."""


class ConfigError(OrchestrationError):
    """A configuration problem the user must fix (names the setting)."""


class RepositoryError(OrchestrationError):
    """The repository cannot be used as asked."""


class InvalidRequest(OrchestrationError):
    """A request that does not validate; the message names the field."""


class NotFound(OrchestrationError):
    """No such run or agent."""


class RunNotFound(NotFound):
    """No run with this id."""


class AgentNotFound(NotFound):
    """No agent with this id."""


class PathNotFound(NotFound):
    """No file at this path in the commit asked about."""


class InvalidState(OrchestrationError):
    """The operation does not fit the current status."""


class BudgetExhausted(OrchestrationError):
    """The run's shared token budget is spent."""


class MergeError(OrchestrationError):
    """The join step could not proceed."""


class ModelError(OrchestrationError):
    """A model call failed."""

    retryable: bool = False

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelRateLimited(ModelError):
    """429 from the model API."""

    retryable = True


class ModelOverloaded(ModelError):
    """529 or another 5xx from the model API."""

    retryable = True


class ModelTimeout(ModelError):
    """No answer within the timeout."""

    retryable = True


class ModelConnectionError(ModelError):
    """The model API could not be reached."""

    retryable = True


class ModelResponseError(ModelError):
    """A malformed or unusable answer."""

    retryable = True


class ModelFatalError(ModelError):
    """Authentication, permission or a bad request: a retry will not help."""

    retryable = False
