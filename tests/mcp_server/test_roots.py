"""Which repository the server works on: `--repo`, then `FANOUT_REPO`, then the client's MCP roots,
then the working directory; roots are asked in both protocol eras."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
from mcp import Client
from mcp.client.context import ClientRequestContext
from mcp.client.session import ListRootsFnT
from mcp_types import ErrorData, ListRootsResult, Root

from mcp_server.demo import demo_model_factory, make_sample_repo, structured
from mcp_server.server import build_server
from orchestration.config import Settings

pytestmark = pytest.mark.anyio

ERAS = ["legacy", "auto"]


@pytest.fixture
def repos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Four repositories: flag, env, roots, and the server's working directory."""
    out: dict[str, Path] = {}
    for name in ("flag", "env", "roots", "cwd"):
        (tmp_path / name).mkdir()
        out[name] = make_sample_repo(tmp_path / name)
    monkeypatch.chdir(out["cwd"])
    return out


def _roots_of(path: Path) -> ListRootsFnT:
    async def list_roots(context: ClientRequestContext) -> ListRootsResult:
        return ListRootsResult(roots=[Root(uri=path.as_uri(), name="workspace")])  # pyright: ignore[reportArgumentType]

    return list_roots


def _used(repos: Mapping[str, Path]) -> list[str]:
    """The repositories whose state directory the server created."""
    return [name for name, repo in repos.items() if (repo / ".git/fanout/state.db").exists()]


async def _first_call(client: Client) -> None:
    status = structured(await client.call_tool("get_status", {}))
    assert status["runs"] == []


@pytest.mark.parametrize("mode", ERAS)
async def test_roots_are_used_when_nothing_is_configured(repos: dict[str, Path], mode: str) -> None:
    server = build_server(Settings.from_env({}, sandbox="none"), demo_model_factory())
    async with Client(server, mode=mode, list_roots_callback=_roots_of(repos["roots"])) as client:
        await _first_call(client)
        await _first_call(client)
    assert _used(repos) == ["roots"]


@pytest.mark.parametrize("mode", ERAS)
@pytest.mark.parametrize("winner", ["flag", "env"])
async def test_repo_flag_then_env_win_over_roots(
    repos: dict[str, Path], mode: str, winner: str
) -> None:
    flag = repos["flag"] if winner == "flag" else None
    settings = Settings.from_env({"FANOUT_REPO": str(repos["env"])}, repo=flag, sandbox="none")
    server = build_server(settings, demo_model_factory())
    async with Client(server, mode=mode, list_roots_callback=_roots_of(repos["roots"])) as client:
        await _first_call(client)
    assert _used(repos) == [winner]


@pytest.mark.parametrize("mode", ERAS)
async def test_cwd_without_roots(repos: dict[str, Path], mode: str) -> None:
    server = build_server(Settings.from_env({}, sandbox="none"), demo_model_factory())
    async with Client(server, mode=mode) as client:
        await _first_call(client)
    assert _used(repos) == ["cwd"]


@pytest.mark.parametrize("mode", ERAS)
async def test_roots_that_are_not_directories_fall_back_to_cwd(
    repos: dict[str, Path], mode: str, tmp_path: Path
) -> None:
    server = build_server(Settings.from_env({}, sandbox="none"), demo_model_factory())
    missing = _roots_of(tmp_path / "gone")
    async with Client(server, mode=mode, list_roots_callback=missing) as client:
        await _first_call(client)
    assert _used(repos) == ["cwd"]


@pytest.mark.parametrize("mode", ERAS)
async def test_a_configured_repo_runs_no_roots_resolver(
    repos: dict[str, Path], mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With --repo (or FANOUT_REPO) the client's roots can never change which repository a call
    # works on, so the SDK is not made to run the roots resolver on any tool call (the client
    # is never asked for its roots).
    calls: list[str] = []
    answer = _roots_of(repos["roots"])

    async def counting(context: ClientRequestContext) -> ListRootsResult | ErrorData:
        calls.append("roots")
        return await answer(context)

    configured = build_server(
        Settings.from_env({}, repo=repos["flag"], sandbox="none"), demo_model_factory()
    )
    async with Client(configured, mode=mode, list_roots_callback=counting) as c:
        await _first_call(c)
        missing = await c.call_tool("cancel_subagents", {"run_id": "rnone"})
        assert missing.is_error
    assert calls == [] and _used(repos) == ["flag"]
    unconfigured = build_server(Settings.from_env({}, sandbox="none"), demo_model_factory())
    async with Client(unconfigured, mode=mode, list_roots_callback=counting) as c:
        await _first_call(c)
    assert calls and _used(repos) == ["flag", "roots"]
