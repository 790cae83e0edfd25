"""Which repository a tool call works on.

In order: the call's own `repo` argument (spawn only), `--repo` / `FANOUT_REPO` (the settings),
the first `file://` root the MCP client offers, then the server's working directory. A directory
that is not a git repository becomes a clear error at the first tool call, not a crash at start.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

from mcp_types import ListRootsResult

from orchestration.errors import RepositoryError

log = logging.getLogger("fanout.mcp")


def root_paths(roots: ListRootsResult | None) -> list[Path]:
    """The local directories among the client's roots."""
    if roots is None:
        return []
    out: list[Path] = []
    for root in roots.roots:
        parsed = urlparse(str(root.uri))
        if parsed.scheme == "file":
            out.append(Path(unquote(parsed.path)))
    return out


class RepoResolver:
    """Resolves (and remembers) the repository of this server process."""

    def __init__(self, configured: Path | None, cwd: Path | None = None) -> None:
        self.configured = configured
        self.cwd = cwd or Path(os.getcwd())
        self.from_roots: Path | None = None
        self._resolved: dict[Path, Path] = {}

    @property
    def needs_roots(self) -> bool:
        """Whether asking the client for its roots could change the answer."""
        return self.configured is None and self.from_roots is None

    def offer_roots(self, roots: ListRootsResult | None) -> None:
        for path in root_paths(roots):
            if path.is_dir():
                self.from_roots = path
                log.info("repository from the client's roots: %s", path)
                return

    def resolve(self, explicit: str | None = None) -> Path:
        """The repository path to use; checked to be a directory (git checks happen later)."""
        if explicit:
            path = Path(explicit).expanduser()
        elif self.configured is not None:
            path = self.configured
        elif self.from_roots is not None:
            path = self.from_roots
        else:
            path = self.cwd
        if not path.is_dir():
            raise RepositoryError(
                f"{path} is not a directory: pass --repo <repository path> or set FANOUT_REPO"
            )
        # resolved once per path (several system calls; every tool call asks), as the
        # orchestrator remembers which repository a path names
        resolved = self._resolved.get(path)
        if resolved is None:
            resolved = self._resolved[path] = path.resolve()
        return resolved
