"""The server's event loop (`FANOUT_EVENT_LOOP`): uvloop where it is installed, asyncio's own
loop on request, and a clear error when uvloop is asked for and missing."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from mcp_server import cli, eventloop
from orchestration.config import Settings
from orchestration.errors import ConfigError


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_auto_runs_on_uvloop_where_it_is_installed() -> None:
    assert eventloop.uvloop_installed()  # a dependency on this platform
    assert eventloop.backend_options("auto") == {"use_uvloop": True}
    assert eventloop.run(_loop_module, choice="auto").startswith("uvloop")
    assert eventloop.run(_loop_module, choice="uvloop").startswith("uvloop")
    assert eventloop.describe("auto") == "uvloop"


def test_asyncio_keeps_asyncios_own_loop() -> None:
    assert eventloop.backend_options("asyncio") == {}
    assert eventloop.run(_loop_module, choice="asyncio").startswith("asyncio")
    assert eventloop.describe("asyncio") == "asyncio's own (FANOUT_EVENT_LOOP=asyncio)"


def test_without_uvloop_auto_falls_back_and_uvloop_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(eventloop, "uvloop_installed", lambda: False)
    assert eventloop.backend_options("auto") == {}
    assert eventloop.run(_loop_module, choice="auto").startswith("asyncio")
    assert eventloop.describe("auto") == "asyncio's own (uvloop is not installed)"
    with pytest.raises(ConfigError, match="pip install uvloop"):
        eventloop.backend_options("uvloop")


def test_the_setting_is_read_from_the_environment_and_checked() -> None:
    assert Settings.from_env({}).event_loop == "auto"
    assert Settings.from_env({"FANOUT_EVENT_LOOP": "asyncio"}).event_loop == "asyncio"
    with pytest.raises(ConfigError, match="FANOUT_EVENT_LOOP"):
        Settings.from_env({"FANOUT_EVENT_LOOP": "trio"})


@pytest.mark.parametrize("choice", ["auto", "asyncio"])
def test_the_server_runs_on_the_loop_the_setting_gives(
    choice: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fanout-mcp` (stdio) hands its server to `eventloop.run` with the setting's choice."""
    ran: list[tuple[Any, str]] = []

    def run(func: Any, *args: object, choice: str) -> None:
        ran.append((func, choice))

    def no_warm_up(modules: object) -> None:
        return None

    monkeypatch.setenv("FANOUT_EVENT_LOOP", choice)
    monkeypatch.setattr(cli, "warm_up_in_background", no_warm_up)
    monkeypatch.setattr(eventloop, "run", run)
    args = cli._parser().parse_args(  # pyright: ignore[reportPrivateUsage]
        ["--repo", str(tmp_path), "--model-provider", "demo"]
    )
    assert cli.serve(args) == 0
    assert [choice for _, choice in ran] == [choice]
    assert getattr(ran[0][0], "__name__", "") == "run_stdio_async"
