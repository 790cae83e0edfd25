"""The project's own tree obeys the layering, and the checker catches a violation."""

from __future__ import annotations

from pathlib import Path

from tests.layering import check_tree

ROOT = Path(__file__).resolve().parent.parent


def test_project_tree_has_no_layering_violation() -> None:
    assert check_tree(ROOT) == []


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
