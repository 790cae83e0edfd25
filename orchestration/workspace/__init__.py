"""The user's git repository and the agents' workspaces: snapshots, worktrees, work commits.

Everything written here lives under `<git dir>/fanout/` (the state dir) or in refs the user's
`git status` never shows (`refs/fanout/…`, branches `fanout/<run>/<agent>`). The user's branch,
index and working tree are only ever read by this package.

| module | job |
|---|---|
| `git` | the git wrapper (`run_git`), the user's repository (`GitRepo`), identities |
| `porcelain` | `git status` parsed |
| `snapshots` | a run's pinned base (`snapshot`) |
| `pinning` | the `Workspace` record; the server's git pinned to it; planted `.git` quarantined |
| `worktrees` | `Workspaces` (the seam for kinds of workspace) and `GitWorktrees` |
| `overlay` | the process's private mount namespace, overlay mounts, the probe |
| `layered` | `ChosenWorkspaces`: copy-on-write views (or worktrees), their commits, the choice |
| `included` | ignored files a build needs, copied into a worktree or layered under a view |
| `engine` | `GitEngine`: checkout and commit, by git (`cli_git`) or libgit2 (`libgit2_git`) |
| `engines` | the engine the server uses, chosen once |
| `commits` | `commit_workspace`: an agent's in-scope work on its branch |
| `diffs` | file changes, diffstats and diffs of commits |
"""

from orchestration.contracts import DiffStat, FileChange
from orchestration.errors import RepositoryError
from orchestration.workspace.cli_git import CliGit
from orchestration.workspace.commits import (
    PreparedCommit,
    clear_partial_writes,
    commit_workspace,
    prepare_commit,
)
from orchestration.workspace.diffs import diff, diffstat, file_changes, tree_changes
from orchestration.workspace.engine import (
    BaseNotReady,
    CommitJob,
    GitEngine,
    InProcessFirst,
    WorkCommit,
    WouldBlock,
)
from orchestration.workspace.engines import DEFAULT_ENGINE, GIT, LIBGIT2
from orchestration.workspace.git import (
    BRANCH_PREFIX,
    FANOUT_IDENTITY,
    SNAPSHOT_REF_PREFIX,
    STATE_DIR_NAME,
    WORKSPACE_META,
    ZERO_OID,
    GitRepo,
    Identity,
    run_git,
)
from orchestration.workspace.layered import (
    WORKSPACES,
    ChosenWorkspaces,
    commit_view,
    create_workspace,
    discard_unstarted_workspace,
    drop_idle_branch_handle,
    ensure_mounted,
    ensure_registered,
    layer_of,
    list_workspaces,
    listing_git_dir,
    quick_files,
    remove_workspace,
    unmount_orphaned_views,
    view_support,
)
from orchestration.workspace.libgit2_git import Libgit2Git
from orchestration.workspace.overlay import ViewSupport, enter_private_mounts
from orchestration.workspace.pinning import (
    Workspace,
    admin_dir_of,
    open_workspace_repo,
    pin,
    secure_workspace_git,
)
from orchestration.workspace.porcelain import StatusEntry, status_entries
from orchestration.workspace.snapshots import Snapshot, pin_snapshot, snapshot, unpin_snapshot
from orchestration.workspace.worktrees import (
    GitWorktrees,
    Workspaces,
    clear_dead_locks,
    workspace_disk_usage,
)

__all__ = [
    "BRANCH_PREFIX",
    "DEFAULT_ENGINE",
    "FANOUT_IDENTITY",
    "GIT",
    "LIBGIT2",
    "SNAPSHOT_REF_PREFIX",
    "STATE_DIR_NAME",
    "WORKSPACES",
    "WORKSPACE_META",
    "ZERO_OID",
    "BaseNotReady",
    "ChosenWorkspaces",
    "CliGit",
    "CommitJob",
    "DiffStat",
    "FileChange",
    "GitEngine",
    "GitRepo",
    "GitWorktrees",
    "Identity",
    "InProcessFirst",
    "Libgit2Git",
    "PreparedCommit",
    "RepositoryError",
    "Snapshot",
    "StatusEntry",
    "ViewSupport",
    "WorkCommit",
    "Workspace",
    "Workspaces",
    "WouldBlock",
    "admin_dir_of",
    "clear_dead_locks",
    "clear_partial_writes",
    "commit_view",
    "commit_workspace",
    "create_workspace",
    "diff",
    "diffstat",
    "discard_unstarted_workspace",
    "drop_idle_branch_handle",
    "ensure_mounted",
    "ensure_registered",
    "enter_private_mounts",
    "file_changes",
    "layer_of",
    "list_workspaces",
    "listing_git_dir",
    "open_workspace_repo",
    "pin",
    "pin_snapshot",
    "prepare_commit",
    "quick_files",
    "remove_workspace",
    "run_git",
    "secure_workspace_git",
    "snapshot",
    "status_entries",
    "tree_changes",
    "unmount_orphaned_views",
    "unpin_snapshot",
    "view_support",
    "workspace_disk_usage",
]
