"""The start-up warm-up: a provider's SDK imported and prepared ahead of the first spawn, then
the heap frozen. Each case runs in a child interpreter, so this process's heap stays as it is."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path


def _child(tmp_path: Path, body: str) -> dict[str, object]:
    """Run `body` in a fresh interpreter (with `tmp_path` importable) and return the JSON object
    it prints last."""
    code = textwrap.dedent(body)
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": f"{tmp_path}:{Path.cwd()}", "PATH": "/usr/bin:/bin"},
        cwd=Path.cwd(),
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_warm_up_imports_runs_the_hook_and_freezes(tmp_path: Path) -> None:
    (tmp_path / "warm_mod.py").write_text(
        "CALLS = []\ndef warm_up():\n    CALLS.append('hook')\n", encoding="utf-8"
    )
    out = _child(
        tmp_path,
        """
        import gc, json, sys
        from orchestration.heap import warm_up
        before = gc.get_freeze_count()
        warm_up(["warm_mod"])
        import warm_mod
        print(json.dumps({"before": before, "after": gc.get_freeze_count(),
                          "calls": warm_mod.CALLS}))
        """,
    )
    assert out["before"] == 0
    assert isinstance(out["after"], int) and out["after"] > 1000
    assert out["calls"] == ["hook"]


def test_freezing_raises_the_young_threshold_and_keeps_a_higher_one_or_none(
    tmp_path: Path,
) -> None:
    out = _child(
        tmp_path,
        """
        import gc, json
        from orchestration.heap import YOUNG_THRESHOLD, freeze_heap
        default = gc.get_threshold()
        freeze_heap()
        raised = gc.get_threshold()
        gc.set_threshold(YOUNG_THRESHOLD * 5, 3, 4)
        freeze_heap()
        higher = gc.get_threshold()
        gc.set_threshold(0)
        freeze_heap()
        off = gc.get_threshold()[0]
        print(json.dumps({"default": default, "raised": raised, "higher": higher, "off": off,
                          "young": YOUNG_THRESHOLD}))
        """,
    )
    young = out["young"]
    assert isinstance(young, int)
    default, raised = out["default"], out["raised"]
    assert isinstance(default, list) and isinstance(raised, list)
    assert default[0] < young
    assert raised == [young, *default[1:]]
    assert out["higher"] == [young * 5, 3, 4]
    assert out["off"] == 0


def test_a_failing_module_is_logged_and_the_rest_still_happens(tmp_path: Path) -> None:
    (tmp_path / "broken_mod.py").write_text("raise RuntimeError('no such SDK')\n", "utf-8")
    (tmp_path / "hook_fails.py").write_text(
        "def warm_up():\n    raise OSError('no CA bundle')\n", encoding="utf-8"
    )
    (tmp_path / "fine_mod.py").write_text("VALUE = 1\n", encoding="utf-8")
    out = _child(
        tmp_path,
        """
        import gc, json, logging, sys
        records = []
        class Keep(logging.Handler):
            def emit(self, record):
                records.append(record.getMessage())
        logging.getLogger("fanout.heap").addHandler(Keep())
        from orchestration.heap import warm_up
        warm_up(["broken_mod", "hook_fails", "fine_mod"])
        print(json.dumps({"frozen": gc.get_freeze_count(), "logged": records,
                          "fine": "fine_mod" in sys.modules}))
        """,
    )
    assert out["logged"] == ["warm-up: broken_mod failed", "warm-up: hook_fails failed"]
    assert out["fine"] is True
    assert isinstance(out["frozen"], int) and out["frozen"] > 1000


def test_the_background_warm_up_returns_at_once_and_finishes(tmp_path: Path) -> None:
    (tmp_path / "slow_mod.py").write_text(
        "import threading\nSTARTED = threading.Event()\nGO = threading.Event()\n"
        "def warm_up():\n    STARTED.set()\n    GO.wait(30)\n",
        encoding="utf-8",
    )
    out = _child(
        tmp_path,
        """
        import gc, json
        from orchestration.heap import warm_up_in_background
        thread = warm_up_in_background(["slow_mod"])
        import slow_mod
        assert slow_mod.STARTED.wait(30)
        alive_while_blocked = thread.is_alive()
        frozen_while_blocked = gc.get_freeze_count()
        slow_mod.GO.set()
        thread.join(30)
        print(json.dumps({"alive": alive_while_blocked, "frozen_before": frozen_while_blocked,
                          "done": not thread.is_alive(), "frozen": gc.get_freeze_count(),
                          "daemon": thread.daemon}))
        """,
    )
    assert out["alive"] is True and out["frozen_before"] == 0
    assert out["done"] is True and out["daemon"] is True
    assert isinstance(out["frozen"], int) and out["frozen"] > 1000


def test_the_cli_warms_up_the_anthropic_sdk_and_its_tls_context() -> None:
    import importlib

    from mcp_server.cli import MODEL_PROVIDERS, PROVIDER_MODULES

    assert set(PROVIDER_MODULES) <= set(MODEL_PROVIDERS)
    assert "orchestration.providers.anthropic" in PROVIDER_MODULES["anthropic"]
    provider = importlib.import_module("orchestration.providers.anthropic")
    provider.warm_up()
    assert provider.shared_ssl_context() is provider.shared_ssl_context()
    for name in PROVIDER_MODULES["anthropic"]:
        importlib.import_module(name)
