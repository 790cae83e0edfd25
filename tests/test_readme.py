"""The README's "Script it from Python" example runs as written against a real stdio server (the
demo model provider, a temporary git repository as the working directory)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mcp_server.demo import make_sample_repo

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _example() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Script it from Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 1, "the section has one python block"
    return blocks[0]


def test_script_it_from_python_example_runs(tmp_path: Path) -> None:
    repo = make_sample_repo(tmp_path)
    script = tmp_path / "example.py"
    script.write_text(_example(), encoding="utf-8")
    bin_dir = str(Path(sys.executable).parent)  # where `fanout-mcp` is installed
    env = {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "FANOUT_MODEL_PROVIDER": "demo",
        "FANOUT_SANDBOX": "none",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("FANOUT_REPO", None)
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    # The demo model does only its own tasks: this one fails, and the documented loop ends on
    # the settled answer that says so, without a merge.
    run = re.search(r"^run (r[0-9a-f]+) settled: 1 failed;", out, re.MULTILINE)
    assert run, out  # the status text, once the run needs the script
    assert re.search(rf"^{run.group(1)}-a1 · .* · failed", out, re.MULTILINE), out
    assert re.search(r"^next: .*did not succeed", out, re.MULTILINE), out
    assert re.search(r"^cursor \d+", out, re.MULTILINE), out
    assert "merge of run" not in out, out
