"""Errors of the tool bus.

Every refusal a subagent can meet is a typed error whose message says what to do instead::

    ToolbusError
    ├── LeaseError
    │   ├── LeaseTimeout        a wait for a lease set ran out (names the blocking holders)
    │   ├── LeaseLost           the holder no longer holds a covering lease (expired, broken)
    │   ├── LeaseSelfConflict   a request conflicts with the requester's own live lease
    │   └── LeaseNotHeld        release/renew of a lease the caller does not hold
    ├── AccessDenied
    │   ├── PathEscape          the path leaves the jail (.., absolute, symlink, .git, NUL)
    │   ├── OutOfScope          a write outside the agent's write scope
    │   ├── CommandDenied       the command policy refuses the command
    │   └── PermissionRefused   the permission policy denies the call, or the person refused it
    ├── FileOpError
    │   ├── FileNotFound        no such file or directory
    │   ├── NotAFile            a directory, device, FIFO or socket where a regular file is needed
    │   ├── FileTooLarge        over the read or write size cap
    │   ├── BinaryFile          a read of a binary file
    │   ├── NoMatch             edit_file: `old` does not occur
    │   └── MultipleMatches     edit_file: `old` occurs several times and replace_all is false
    ├── ExternalServerError     a downstream MCP server failed or is not configured (external)
    ├── InvalidArguments        a tool call whose arguments do not validate
    └── SandboxUnavailable      FANOUT_SANDBOX=bwrap but bubblewrap cannot run here
"""

from __future__ import annotations


class ToolbusError(Exception):
    """Base of every tool-bus error; the message is written for the model or user to act on."""


class LeaseError(ToolbusError):
    """A lease could not be taken, kept or released."""


class LeaseTimeout(LeaseError):
    """A wait for a lease set ran out."""


class LeaseLost(LeaseError):
    """The holder no longer holds a live lease covering the operation (expired or broken)."""


class LeaseSelfConflict(LeaseError):
    """A request conflicts with a live lease of the same holder (no in-place upgrade)."""


class LeaseNotHeld(LeaseError):
    """Release or renewal of a lease the caller does not hold."""


class AccessDenied(ToolbusError):
    """The bus refused the operation."""


class PathEscape(AccessDenied):
    """The path leaves the jail or names something the jail hides."""


class OutOfScope(AccessDenied):
    """A write outside the agent's write scope."""


class CommandDenied(AccessDenied):
    """The command policy refuses the command."""


class PermissionRefused(AccessDenied):
    """The permission policy denies the call, or the person refused it (or did not answer);
    `permission` is the decision as the audit log records it."""

    def __init__(self, message: str, *, permission: str | None = None) -> None:
        super().__init__(message)
        self.permission = permission


class FileOpError(ToolbusError):
    """A file operation failed for a reason the caller can fix."""


class FileNotFound(FileOpError):
    """No such file or directory."""


class NotAFile(FileOpError):
    """A regular file was needed."""


class FileTooLarge(FileOpError):
    """Over a size cap."""


class BinaryFile(FileOpError):
    """A text operation on a binary file."""


class NoMatch(FileOpError):
    """edit_file: the text to replace does not occur."""


class MultipleMatches(FileOpError):
    """edit_file: the text to replace occurs more than once."""


class InvalidArguments(ToolbusError):
    """A tool call's arguments do not validate."""


class SandboxUnavailable(ToolbusError):
    """The sandbox was required but cannot run on this machine."""
