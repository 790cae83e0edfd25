"""`fanout-mcp`: serve over stdio (default) or streamable HTTP; `status`; `demo`.

Nothing but protocol reaches stdout while serving: logs go to stderr and, once the repository
is known, to `<state_dir>/logs/server.log`.
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from orchestration.config import Settings
from orchestration.errors import ConfigError, OrchestrationError
from orchestration.heap import warm_up_in_background
from orchestration.orchestrator import ModelFactory, RepoContext
from orchestration.workspace.overlay import enter_private_mounts

log = logging.getLogger("fanout.mcp")

LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARD = frozenset({"0.0.0.0", "::", ""})
MODEL_PROVIDERS = ("anthropic", "demo")
# what each provider's first model imports
PROVIDER_MODULES: dict[str, tuple[str, ...]] = {
    "anthropic": ("orchestration.providers.anthropic", "aiohttp"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fanout-mcp",
        description="An MCP server that runs a team of parallel subagents on a git repository.",
    )
    parser.add_argument("--repo", help="the repository (default: FANOUT_REPO, MCP roots, cwd)")
    parser.add_argument("--model", help="default model of the subagents (FANOUT_MODEL)")
    parser.add_argument("--max-concurrency", type=int, help="agents at once per run")
    parser.add_argument("--sandbox", choices=["auto", "bwrap", "none"], help="command sandbox")
    parser.add_argument(
        "--sandbox-ro-path",
        action="append",
        metavar="PATH",
        help="a path commands see read-only besides the system directories, e.g. a toolchain "
        "(repeatable; FANOUT_SANDBOX_RO_PATHS, comma-separated)",
    )
    parser.add_argument(
        "--command-max-processes",
        type=int,
        metavar="N",
        help="processes (threads count) per command, 0 for no limit (FANOUT_COMMAND_MAX_PROCESSES)",
    )
    parser.add_argument(
        "--command-max-memory-mb",
        type=int,
        metavar="MB",
        help="memory per command, 0 for no limit (FANOUT_COMMAND_MAX_MEMORY_MB)",
    )
    parser.add_argument(
        "--command-tmp-mb",
        type=int,
        metavar="MB",
        help="size of a command's private /tmp, 0 for no limit (FANOUT_COMMAND_TMP_MB)",
    )
    parser.add_argument(
        "--model-provider",
        choices=MODEL_PROVIDERS,
        default=os.environ.get("FANOUT_MODEL_PROVIDER") or "anthropic",
        help="anthropic (default; needs ANTHROPIC_API_KEY) or demo (a deterministic scripted "
        "model for `fanout-mcp demo` and trials; FANOUT_MODEL_PROVIDER)",
    )
    parser.add_argument("--http", action="store_true", help="serve streamable HTTP, not stdio")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="HTTP port (8765)")
    parser.add_argument(
        "--token",
        default=os.environ.get("FANOUT_HTTP_TOKEN"),
        help="bearer token HTTP clients must send (FANOUT_HTTP_TOKEN); required off loopback",
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[
            h.strip()
            for h in os.environ.get("FANOUT_HTTP_ALLOWED_HOSTS", "").split(",")
            if h.strip()
        ],
        metavar="HOST",
        help="a name or address clients reach the HTTP server by, for the Host/Origin checks "
        "(repeatable; FANOUT_HTTP_ALLOWED_HOSTS, comma-separated); needed when binding 0.0.0.0",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging to stderr")
    sub = parser.add_subparsers(dest="command")
    status = sub.add_parser("status", help="print runs, agents and leases from the durable state")
    status.add_argument("--repo", dest="status_repo", help="the repository (default: cwd)")
    sub.add_parser("demo", help="a demo of the whole product with no API key")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(
        repo=Path(args.repo).expanduser() if args.repo else None,
        model=args.model,
        max_concurrency=args.max_concurrency,
        sandbox=args.sandbox,
        sandbox_ro_paths=tuple(args.sandbox_ro_path) if args.sandbox_ro_path else None,
        command_max_processes=args.command_max_processes,
        command_max_memory_mb=args.command_max_memory_mb,
        command_tmp_mb=args.command_tmp_mb,
    )


def _model_factory(provider: str) -> ModelFactory | None:
    if provider == "demo":
        from mcp_server.demo import demo_model_factory

        return demo_model_factory()
    return None


def setup_logging(verbose: bool) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.DEBUG if verbose else logging.WARNING)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    for noisy in ("httpx", "httpcore", "mcp", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def log_to_state_dir(ctx: RepoContext) -> None:
    """Also log to `<state_dir>/logs/server.log` once the repository is known."""
    logs = ctx.repo.state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(logs / "server.log", encoding="utf-8")
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    )
    logging.getLogger().addHandler(handler)
    log.info("serving %s", ctx.repo.root)


def _bearer_app(app: Any, token: str) -> Any:
    """ASGI middleware refusing HTTP requests without `Authorization: Bearer <token>`."""
    expected = f"Bearer {token}".encode()

    async def guarded(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, expected):
                body = b'{"error": "unauthorized: send Authorization: Bearer <token>"}'
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"www-authenticate", b"Bearer"),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    return guarded


async def _serve_http(
    server: Any, host: str, port: int, token: str | None, allowed: Sequence[str] = ()
) -> None:
    import uvicorn
    from mcp.server.transport_security import TransportSecuritySettings

    hosts = ["127.0.0.1:*", "localhost:*", "[::1]:*"]
    origins = ["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"]
    extra = [*allowed] if host in WILDCARD else [host, *allowed]
    for name in extra:
        if name in LOOPBACK or name in WILDCARD:
            continue
        hosts.append(f"{name}:*")
        origins.extend((f"http://{name}:*", f"https://{name}:*"))
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins
    )
    app = server.streamable_http_app(transport_security=security, host=host)
    if token:
        app = _bearer_app(app, token)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
    log.info("serving streamable HTTP on http://%s:%d/mcp", host, port)
    await uvicorn.Server(config).serve()


def serve(args: argparse.Namespace) -> int:
    from mcp_server.server import build_server

    if args.http and args.host not in LOOPBACK and not args.token:
        print(
            f"fanout-mcp: refusing to serve HTTP on {args.host} without a bearer token: pass "
            "--token <secret> or set FANOUT_HTTP_TOKEN (or bind to 127.0.0.1)",
            file=sys.stderr,
        )
        return 2
    if args.http and args.host in WILDCARD and not args.allowed_host:
        print(
            f"fanout-mcp: binding {args.host} accepts connections on every address, but the "
            "Host/Origin checks only admit names you list: pass --allowed-host <name or "
            "address clients use> (repeatable) or set FANOUT_HTTP_ALLOWED_HOSTS",
            file=sys.stderr,
        )
        return 2
    settings = _settings(args)
    server = build_server(settings, _model_factory(args.model_provider))
    server.app.on_repo = log_to_state_dir
    # The provider's SDK is imported now rather than by the first spawn, then the heap of a
    # started server is frozen (see orchestration.heap); both off the main thread.
    warm_up_in_background(PROVIDER_MODULES.get(args.model_provider, ()))
    if args.http:
        anyio.run(_serve_http, server, args.host, args.port, args.token, args.allowed_host)
    else:
        anyio.run(server.run_stdio_async)
    return 0


def _executor_line() -> str:
    """Where agents run, as `FANOUT_EXECUTOR` says; for Ray, the cluster's nodes as it reports
    them (or why it cannot be reached)."""
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        return f"(configuration: {exc})"
    if settings.executor != "ray":
        return "in-process (this machine)"
    from orchestration.executors.ray_executor import cluster_summary

    return cluster_summary(settings.ray_address)


def status(repo_arg: str | None) -> int:
    """Print runs, agents and leases from the durable state (no server needed)."""
    from mcp_server.status_table import store_text
    from orchestration.state import StateStore
    from orchestration.workspace import GitRepo, view_support
    from toolbus.lease_store import LeaseStore

    repo_path = Path(repo_arg or os.environ.get("FANOUT_REPO") or os.getcwd())
    repo = GitRepo.discover(repo_path)
    state_dir = repo.state_dir
    if not (state_dir / "state.db").exists():
        print(f"no fanout state in {repo.root} yet")
        return 0
    store = StateStore(state_dir)
    try:
        runs = store.runs()
        agents = store.all_agents()
        live = store.live_servers()
    finally:
        store.close()
    leases = LeaseStore(state_dir).table() if (state_dir / "leases.db").exists() else []
    print(f"repository {repo.root}")
    print(f"workspaces: {view_support(repo).note}")
    print(f"executor: {_executor_line()}\n")
    print(store_text(runs, agents, leases, live))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    # First, before any thread starts: the namespace where agents' views can be mounted.
    enter_private_mounts()
    args = _parser().parse_args(argv)
    try:
        if args.command == "status":
            return status(args.status_repo or args.repo)
        if args.command == "demo":
            from mcp_server.demo import main as demo_main

            return demo_main()
        setup_logging(args.verbose)
        return serve(args)
    except (ConfigError, OrchestrationError) as exc:
        print(f"fanout-mcp: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
