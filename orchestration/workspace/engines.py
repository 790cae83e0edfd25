"""The one place the server chooses how workspaces are checked out and work is committed:
in-process with libgit2 where it does what git would, git's own commands otherwise."""

from __future__ import annotations

from orchestration.workspace.cli_git import CliGit
from orchestration.workspace.engine import GitEngine, InProcessFirst
from orchestration.workspace.libgit2_git import Libgit2Git

GIT: GitEngine = CliGit()
"""Git's own commands only."""
LIBGIT2: GitEngine = InProcessFirst(Libgit2Git(), GIT)
"""libgit2 in-process, git where libgit2 declines: what the server uses."""
DEFAULT_ENGINE: GitEngine = LIBGIT2
