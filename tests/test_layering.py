"""The project's own tree obeys the layering and has no import cycle inside a package, and the
checkers catch a violation."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.layering import check_cycles, check_tree

ROOT = Path(__file__).resolve().parent.parent


def test_project_tree_has_no_layering_violation() -> None:
    assert check_tree(ROOT) == []


def test_project_tree_has_no_import_cycle_inside_a_package() -> None:
    assert [str(c) for c in check_cycles(ROOT)] == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in ("toolbus", "orchestration", "mcp_server"):
        (tmp_path / package).mkdir(exist_ok=True)
    return tmp_path


def test_checker_flags_toolbus_importing_orchestration(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"toolbus/leases.py": "from orchestration.run import Run\n"})
    assert [str(v) for v in check_tree(root)] == ["toolbus/leases.py:1 imports orchestration.run"]


def test_checker_flags_orchestration_importing_mcp(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"orchestration/x.py": "import os\nimport mcp.types\n"})
    assert [str(v) for v in check_tree(root)] == ["orchestration/x.py:2 imports mcp.types"]


def test_checker_flags_anthropic_outside_its_provider(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "orchestration/providers/anthropic.py": "import anthropic\n",
            "orchestration/loop.py": "def f():\n    from anthropic import AsyncAnthropic\n",
            "mcp_server/server.py": "import anthropic\n",
        },
    )
    assert sorted(str(v) for v in check_tree(root)) == [
        "mcp_server/server.py:1 imports anthropic",
        "orchestration/loop.py:2 imports anthropic",
    ]


def test_checker_allows_downward_imports(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "mcp_server/server.py": "import mcp\nfrom orchestration import x\nimport toolbus\n",
            "orchestration/run.py": "from toolbus.leases import LeaseManager\n",
            "toolbus/leases.py": "import anyio\nimport filelock\n",
        },
    )
    assert check_tree(root) == []


CYCLE_CASES: dict[str, tuple[dict[str, str], list[str]]] = {
    "a function-local import back": (
        {
            "mcp_server/server.py": "def build():\n    from mcp_server.prompts import p\n",
            "mcp_server/prompts.py": "from mcp_server.server import build\n",
        },
        [
            "mcp_server/prompts.py:1 imports mcp_server.server, which imports it back: "
            "mcp_server.server -> mcp_server.prompts",
            "mcp_server/server.py:2 imports mcp_server.prompts, which imports it back: "
            "mcp_server.prompts -> mcp_server.server",
        ],
    ),
    "a transitive cycle through TYPE_CHECKING": (
        {
            "orchestration/a.py": "from orchestration import b\n",
            "orchestration/b.py": "from . import c\n",
            "orchestration/c.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import orchestration.a\n"
            ),
        },
        [
            "orchestration/a.py:1 imports orchestration.b, which imports it back: "
            "orchestration.b -> orchestration.c -> orchestration.a",
            "orchestration/b.py:1 imports orchestration.c, which imports it back: "
            "orchestration.c -> orchestration.a -> orchestration.b",
            "orchestration/c.py:3 imports orchestration.a, which imports it back: "
            "orchestration.a -> orchestration.b -> orchestration.c",
        ],
    ),
    "relative imports in a subpackage": (
        {
            "orchestration/providers/__init__.py": "from .fake import Fake\n",
            "orchestration/providers/fake.py": "from ..model import Model\n",
            "orchestration/model.py": "from orchestration.providers import Fake\n",
        },
        [
            "orchestration/model.py:1 imports orchestration.providers, which imports it back: "
            "orchestration.providers -> orchestration.providers.fake -> orchestration.model",
            "orchestration/providers/__init__.py:1 imports orchestration.providers.fake, which "
            "imports it back: orchestration.providers.fake -> orchestration.model -> "
            "orchestration.providers",
            "orchestration/providers/fake.py:1 imports orchestration.model, which imports it "
            "back: orchestration.model -> orchestration.providers -> orchestration.providers.fake",
        ],
    ),
    "imports without a way back": (
        {
            "mcp_server/server.py": "from mcp_server.app import App\nimport mcp_server.tools\n",
            "mcp_server/tools.py": "def f():\n    from mcp_server.app import App\n",
            "mcp_server/app.py": "import orchestration.run\nfrom toolbus import leases\n",
            "orchestration/run.py": "import toolbus.leases\n",
            "toolbus/leases.py": "import anyio\n",
        },
        [],
    ),
}


@pytest.mark.parametrize("case", list(CYCLE_CASES))
def test_cycle_checker(tmp_path: Path, case: str) -> None:
    files, expected = CYCLE_CASES[case]
    assert [str(c) for c in check_cycles(_tree(tmp_path, files))] == expected
