"""`RepoResolver`: which directory a tool call works on, resolved once per path."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mcp_server.repository import RepoResolver
from orchestration.errors import RepositoryError


def test_a_path_is_resolved_once_and_still_checked_each_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    resolver = RepoResolver(link)
    target = real.resolve()
    resolved: list[Path] = []
    real_resolve = Path.resolve

    def counting_resolve(self: Path, strict: bool = False) -> Path:
        resolved.append(self)
        return real_resolve(self, strict)

    monkeypatch.setattr(Path, "resolve", counting_resolve)
    assert resolver.resolve() == target
    assert resolver.resolve() == target
    assert resolved == [link]
    other = tmp_path / "other"
    other.mkdir()
    assert resolver.resolve(str(other)) == other
    shutil.rmtree(real)
    with pytest.raises(RepositoryError, match="is not a directory"):
        resolver.resolve()
