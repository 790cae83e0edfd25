"""The bubblewrap sandbox of a terminal: its mode, the probe, and the `bwrap` command line.

A command sees only what it needs: the system directories read-only (`/usr`, `/etc`, the `/bin`
and `/lib*` links or directories), configured extra paths read-only, its workspace and its HOME
read-write, a private size-limited `/tmp` and `/dev/shm`, `/dev` and `/proc` of its own. Nothing
else of the host exists inside: not the user's home or checkout (nor its git-ignored files), not
the server's state dir (other agents' workspaces, homes, transcripts, the state database), not
host unix sockets (`/run`, sockets under `/tmp` or a home). Files under `/etc` that others may
not read (`shadow`, private keys) are hidden too, since the server may run as their owner.

Git keeps working read-only in the workspace (a linked worktree): the common git dir is shown as
a read-only skeleton of what git reads (objects, `HEAD`, `info`, `shallow`, the ref namespaces
`heads`, `tags`, `remotes`, `notes`, `replace`), without other agents' branches
(`refs/heads/fanout/`) or snapshot refs, with filtered copies of `config` (no remotes,
credentials, http or url settings, includes, or secret-looking keys) and `packed-refs` (no
fanout refs but the agent's own branch), and only the agent's own admin dir under `worktrees/`.
Those git dirs come from the server's records, never from the workspace's `.git` file, which the
agent can rewrite to point anywhere.

Commands run with no capabilities (bubblewrap keeps them when started as root), in their own
PID, IPC and (unless allowed) network namespaces.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import anyio

from toolbus import gitcmd

logger = logging.getLogger(__name__)

SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
# The ref namespaces a command sees (loose and packed); anything else (snapshot refs under
# refs/fanout/, the user's stash, ...) is absent.
SHOWN_REF_NAMESPACES = (
    "refs/heads/",
    "refs/tags/",
    "refs/remotes/",
    "refs/notes/",
    "refs/replace/",
)
AGENT_BRANCHES = "refs/heads/fanout/"
# What git reads from the common dir of a linked worktree.
SHOWN_GIT_FILES = ("HEAD", "shallow", "info", "objects")
# Configuration sections dropped from the copy a command sees: they may hold credentials or
# tokens (remote URLs, `http.extraHeader`, credential helpers) or pull in other files.
DROPPED_CONFIG_SECTIONS = frozenset(
    {"remote", "credential", "http", "url", "include", "includeif", "lfs", "sendemail"}
)
SECRET_CONFIG_KEY = re.compile(r"pass|token|secret|key|credential|auth|cookie", re.IGNORECASE)


class SandboxMode(StrEnum):
    """`auto`: bubblewrap when it works, else none with a warning; `bwrap`: required; `none`."""

    AUTO = "auto"
    BWRAP = "bwrap"
    NONE = "none"


@dataclass(frozen=True)
class SandboxPlan:
    """How commands will run: under bubblewrap (its executable) or not, and any warning."""

    bwrap: str | None
    warning: str | None

    @property
    def sandboxed(self) -> bool:
        return self.bwrap is not None


@dataclass(frozen=True)
class GitView:
    """What a command sees of git: the worktree's admin dir and the common dir (both from the
    server's records), the agent's own branch, and the filtered copies bound over the originals."""

    admin_dir: Path
    common_dir: Path
    own_ref: str | None
    config: Path | None
    packed_refs: Path | None


_probe_results: dict[tuple[str, bool], str | None] = {}
_size_support: dict[str, bool] = {}
_warned: set[str] = set()


def bwrap_supports_size(bwrap: str) -> bool:
    """Whether this bubblewrap has `--size` (0.8 and later) to bound a tmpfs."""
    if bwrap not in _size_support:
        try:
            done = subprocess.run(
                [bwrap, "--help"], capture_output=True, text=True, timeout=10, check=False
            )
            _size_support[bwrap] = "--size" in done.stdout + done.stderr
        except (OSError, subprocess.TimeoutExpired):
            _size_support[bwrap] = False
    return _size_support[bwrap]


async def probe_bwrap(bwrap: str | None = None, *, network: bool = False) -> str | None:
    """`None` when bubblewrap runs here with the flags the terminal uses, else the reason.

    The probe runs `true` in a sandbox built by `bwrap_prefix` around a throwaway worktree
    layout (a skeleton git dir with an admin dir and a loose branch ref, under the system's
    temporary directory as a repository may be), so every flag a command gets is tried.
    Cached per process (concurrent first probes may both run; they agree)."""
    exe = bwrap or shutil.which("bwrap")
    if exe is None:
        return "bubblewrap (bwrap) is not installed"
    key = (exe, network)
    if key in _probe_results:
        return _probe_results[key]
    scratch = Path(tempfile.mkdtemp(prefix="fanout-probe-"))
    try:
        argv = await anyio.to_thread.run_sync(_probe_argv, exe, scratch, network)
        with anyio.fail_after(30):
            done = await anyio.run_process(argv, check=False, stdin=subprocess.DEVNULL)
        reason = (
            None
            if done.returncode == 0
            else f"bubblewrap probe failed (exit {done.returncode}): "
            + done.stderr.decode(errors="replace").strip()[:300]
        )
    except (OSError, TimeoutError) as exc:
        reason = f"bubblewrap probe failed: {exc}"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _probe_results[key] = reason
    return reason


def _probe_argv(exe: str, scratch: Path, network: bool) -> list[str]:
    common = scratch / "repo" / ".git"
    admin = common / "worktrees" / "a"
    for d in ("objects", "refs/heads/fanout/r", "refs/tags", "info"):
        (common / d).mkdir(parents=True)
    admin.mkdir(parents=True)
    (common / "HEAD").write_text("ref: refs/heads/main\n")
    (common / "config").write_text("[core]\n\trepositoryformatversion = 0\n")
    (common / "packed-refs").write_text("# pack-refs with: peeled\n")
    (common / "refs/heads/fanout/r/a").write_text("0" * 40 + "\n")
    (admin / "HEAD").write_text("ref: refs/heads/fanout/r/a\n")
    ws = common / "fanout" / "worktrees" / "r" / "a"
    home = common / "fanout" / "homes" / "a"
    view = common / "fanout" / "homes" / "a.sandbox"
    for d in (ws, home, view):
        d.mkdir(parents=True)
    git = prepare_git_view(admin, common, view)
    prefix = bwrap_prefix(
        exe,
        workspace=ws,
        home=home,
        hidden=(common / "fanout",),
        allow_network=network,
        git=git,
        extra_ro=(scratch / "repo",),
        tmp_bytes=1024 * 1024 if bwrap_supports_size(exe) else None,
    )
    return [*prefix, "true"]


def warn_once(message: str) -> None:
    """Log a sandbox warning once per process."""
    if message not in _warned:
        _warned.add(message)
        logger.warning("%s", message)


def _inside(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def hidden_path_entries(path_env: str, extra_ro: tuple[Path, ...]) -> list[str]:
    """The directories of a `PATH` that exist here but that a sandboxed command does not see
    (a toolchain in a home directory, say), so that the user can add them to the shown paths."""
    shown = [Path(os.path.realpath(d)) for d in (*SYSTEM_DIRS, *extra_ro)]
    missing: list[str] = []
    for entry in path_env.split(os.pathsep):
        if not entry or not os.path.isdir(entry):
            continue
        real = Path(os.path.realpath(entry))
        if not any(_inside(real, s) for s in shown) and entry not in missing:
            missing.append(entry)
    return missing


# --------------------------------------------------------------------------- git's view


def own_branch_ref(admin_dir: Path) -> str | None:
    """The branch the worktree's HEAD names (`refs/heads/...`), read from its admin dir."""
    try:
        head = (admin_dir / "HEAD").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    ref = head.removeprefix("ref:").strip() if head.startswith("ref:") else ""
    parts = ref.split("/")
    if not ref.startswith("refs/heads/") or any(p in ("", ".", "..") for p in parts):
        return None
    return ref


def ref_is_shown(ref: str, own_ref: str | None) -> bool:
    """Whether a command sees `ref`: the shown namespaces, less other agents' branches."""
    if ref == own_ref:
        return True
    if ref.startswith(AGENT_BRANCHES):
        return False
    return ref.startswith(SHOWN_REF_NAMESPACES)


def filter_packed_refs(text: str, own_ref: str | None) -> str:
    """`packed-refs` without the refs a command must not see (and the `^peeled` line after
    each such ref)."""
    out: list[str] = []
    keep = True
    for line in text.splitlines(keepends=True):
        if line.startswith("#"):
            out.append(line)
        elif line.startswith("^"):
            if keep:
                out.append(line)
        else:
            _oid, _, ref = line.rstrip("\n").partition(" ")
            keep = ref_is_shown(ref.strip(), own_ref)
            if keep:
                out.append(line)
    return "".join(out)


def filter_config(entries: Iterable[tuple[str, str | None]]) -> str:
    """A git config file of `entries` (as `git config --list -z` gives them: `section[.sub].key`
    and the value, None for a bare boolean) less the dropped sections and secret-looking keys."""
    lines: list[str] = []
    current: tuple[str, str | None] | None = None
    for name, value in entries:
        section, _, rest = name.partition(".")
        sub, dot, key = rest.rpartition(".")
        if not key or section.lower() in DROPPED_CONFIG_SECTIONS:
            continue
        if SECRET_CONFIG_KEY.search(key) or SECRET_CONFIG_KEY.search(section):
            continue
        header = (section.lower(), sub if dot else None)
        if header != current:
            current = header
            if header[1] is None:
                lines.append(f"[{header[0]}]")
            else:
                quoted = header[1].replace("\\", "\\\\").replace('"', '\\"')
                lines.append(f'[{header[0]} "{quoted}"]')
        if value is None:
            lines.append(f"\t{key}")
        else:
            escaped = (
                value.replace("\\", "\\\\")
                .replace('"', '\\"')
                .replace("\n", "\\n")
                .replace("\t", "\\t")
                .replace("\b", "\\b")
            )
            lines.append(f'\t{key} = "{escaped}"')
    return "".join(f"{line}\n" for line in lines)


def _config_entries(config: Path) -> list[tuple[str, str | None]]:
    done = gitcmd.run(config.parent, ["config", "--file", str(config), "--list", "-z"])
    if done.returncode != 0:
        raise OSError(f"git cannot read {config}: {done.stderr.strip()[:200]}")
    entries: list[tuple[str, str | None]] = []
    for item in done.stdout.split("\0"):
        if not item:
            continue
        name, newline, value = item.partition("\n")
        entries.append((name, value if newline else None))
    return entries


@dataclass
class GitViewCache:
    """The identity of each source when its filtered copy was last written, so a command that
    follows an unchanged source writes nothing."""

    sources: dict[Path, tuple[int, int, int, int]] = field(
        default_factory=dict[Path, tuple[int, int, int, int]]
    )


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def prepare_git_view(
    admin_dir: Path, common_dir: Path, view_dir: Path, cache: GitViewCache | None = None
) -> GitView:
    """Write the filtered `config` and `packed-refs` of `common_dir` into `view_dir` (a private
    directory outside the workspace) when their sources changed; return the view to bind."""
    admin = Path(os.path.realpath(admin_dir))
    common = Path(os.path.realpath(common_dir))
    own = own_branch_ref(admin)
    cache = cache or GitViewCache()
    view_dir.mkdir(parents=True, exist_ok=True)

    def refresh(name: str, build: Callable[[Path], str]) -> Path | None:
        source, target = common / name, view_dir / name
        ident = _identity(source)
        if ident is None:
            return None
        if cache.sources.get(source) == ident and target.exists():
            return target
        part = view_dir / f".{name}.part"
        part.write_text(build(source), encoding="utf-8")
        os.replace(part, target)
        cache.sources[source] = ident
        return target

    def packed(source: Path) -> str:
        return filter_packed_refs(source.read_text(encoding="utf-8", errors="replace"), own)

    def config(source: Path) -> str:
        try:
            return filter_config(_config_entries(source))
        except (OSError, gitcmd.GitNotFound) as exc:
            logger.warning("the sandbox shows an empty git config: %s", exc)
            return ""

    return GitView(
        admin_dir=admin,
        common_dir=common,
        own_ref=own,
        config=refresh("config", config),
        packed_refs=refresh("packed-refs", packed),
    )


# --------------------------------------------------------------------------- the command line


_private_etc: list[tuple[Path, bool]] | None = None


def private_etc_entries() -> list[tuple[Path, bool]]:
    """Entries under `/etc` that others may not read (path, is a directory), outermost only:
    hidden inside, since the server may run as their owner. Read once per process."""
    global _private_etc
    if _private_etc is None:
        found: list[tuple[Path, bool]] = []
        for dirpath, dirnames, filenames in os.walk("/etc"):
            for name in [*dirnames, *filenames]:
                path = Path(dirpath, name)
                try:
                    st = path.lstat()
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode) and not st.st_mode & stat.S_IXOTH:
                    found.append((path, True))
                    dirnames.remove(name)  # hidden whole: nothing inside is walked
                elif stat.S_ISREG(st.st_mode) and not st.st_mode & stat.S_IROTH:
                    found.append((path, False))
        _private_etc = found
    return _private_etc


def _system_args(allow_network: bool) -> list[str]:
    args: list[str] = []
    for name in SYSTEM_DIRS:
        path = Path(name)
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), name]
        elif path.is_dir():
            args += ["--ro-bind", name, name]
    for path, is_dir in private_etc_entries():
        args += ["--tmpfs", str(path)] if is_dir else ["--ro-bind", "/dev/null", str(path)]
    resolv = Path("/etc/resolv.conf")
    if allow_network and resolv.is_symlink():
        target = Path(os.path.realpath(resolv))
        if not any(_inside(target, Path(d)) for d in SYSTEM_DIRS):
            args += ["--ro-bind-try", str(target), str(target)]
    return args


def _git_args(git: GitView) -> tuple[list[str], list[Path]]:
    """The skeleton of the common dir and the agent's admin dir; the tmpfs dirs to make
    read-only once everything under them is bound."""
    common, admin = git.common_dir, git.admin_dir
    args = ["--tmpfs", str(common)]
    for name in SHOWN_GIT_FILES:
        if os.path.lexists(common / name):
            args += ["--ro-bind", str(common / name), str(common / name)]
    args += ["--dir", str(common / "refs")]
    for namespace in SHOWN_REF_NAMESPACES:
        ns = common / namespace.rstrip("/")
        if ns.is_dir():
            args += ["--ro-bind", str(ns), str(ns)]
    readonly = [common]
    agents = common / AGENT_BRANCHES.rstrip("/")
    if agents.is_dir():
        args += ["--tmpfs", str(agents)]
        readonly.append(agents)
        if git.own_ref is not None and git.own_ref.startswith(AGENT_BRANCHES):
            own = common / git.own_ref
            args += ["--ro-bind-try", str(own), str(own)]
    if git.config is not None:
        args += ["--ro-bind", str(git.config), str(common / "config")]
    if git.packed_refs is not None:
        args += ["--ro-bind", str(git.packed_refs), str(common / "packed-refs")]
    for alternate in _alternates(common):
        args += ["--ro-bind-try", str(alternate), str(alternate)]
    args += ["--ro-bind", str(admin), str(admin)]
    return args, readonly


def _alternates(common: Path) -> list[Path]:
    """Object stores the repository borrows from (`objects/info/alternates`)."""
    objects = common / "objects"
    try:
        lines = (objects / "info" / "alternates").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    found: list[Path] = []
    for raw in lines:
        line = raw.strip()
        if line and not line.startswith("#"):
            path = Path(line) if os.path.isabs(line) else objects / line
            found.append(Path(os.path.realpath(path)))
    return found


def bwrap_prefix(
    bwrap: str,
    *,
    workspace: Path,
    home: Path,
    hidden: tuple[Path, ...],
    allow_network: bool,
    git: GitView | None = None,
    extra_ro: tuple[Path, ...] = (),
    tmp_bytes: int | None = None,
) -> tuple[str, ...]:
    """The `bwrap ... --` argv prefix for a command run in `workspace`.

    Mounts in order: `/dev`, `/proc`, the private `/tmp` (first, so that whatever lives under
    the host's `/tmp` is bound after it, onto it), the system, the extra paths, git's skeleton,
    the hidden paths, the workspace and HOME; then the skeleton's tmpfs dirs and `/` read-only.
    """
    ws = Path(os.path.realpath(workspace))
    home = Path(os.path.realpath(home))
    size = ["--size", str(tmp_bytes)] if tmp_bytes else []
    args = [bwrap, "--dev", "/dev", "--perms", "1777", *size, "--tmpfs", "/dev/shm"]
    args += ["--proc", "/proc", "--perms", "1777", *size, "--tmpfs", "/tmp"]
    args += _system_args(allow_network)
    for extra in extra_ro:
        real = os.path.realpath(extra)
        args += ["--ro-bind-try", real, real]
    readonly: list[Path] = []
    if git is not None:
        git_args, readonly = _git_args(git)
        args += git_args
    for h in hidden:
        if os.path.lexists(h):
            real = Path(os.path.realpath(h))
            args += ["--tmpfs", str(real)]
            readonly.append(real)
    args += ["--bind", str(ws), str(ws)]
    if not _inside(home, ws):
        args += ["--bind", str(home), str(home)]
    for path in readonly:
        args += ["--remount-ro", str(path)]
    args += ["--remount-ro", "/", "--remount-ro", "/dev"]
    args += ["--cap-drop", "ALL", "--unshare-pid", "--unshare-ipc"]
    args += ["--die-with-parent", "--new-session", "--chdir", str(ws)]
    if not allow_network:
        args.append("--unshare-net")
    args += ["--setenv", "TMPDIR", "/tmp", "--"]
    return tuple(args)
