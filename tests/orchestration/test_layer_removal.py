"""Removing an agent's layers when the agent made a directory there unwritable and put links
to the user's files in it: the layers go, and the user's files keep their modes.

The test process is root in its own user namespace (conftest), where no other user is mapped
and root needs no directory to be writable; so the removal meets the refusals a server without
root meets through `unlink` and `rmdir` that apply the kernel's rule for an owner: no entry of
a directory without its write bit may go. Everything else is the real filesystem."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestration.workspace import overlay
from orchestration.workspace.overlay import remove_layer
from tests.orchestration.gitutil import needs_views
from toolbus.trees import remove_tree


def _owners_rule(real: Callable[..., None]) -> Callable[..., None]:
    def refusing(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> None:
        if dir_fd is not None:
            parent_mode = os.fstat(dir_fd).st_mode
        else:
            parent_mode = os.stat(os.path.dirname(os.fspath(path)) or ".").st_mode
        if not parent_mode & stat.S_IWUSR:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        real(path, dir_fd=dir_fd)

    return refusing


@pytest.fixture
def without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "unlink", _owners_rule(os.unlink))
    monkeypatch.setattr(os, "rmdir", _owners_rule(os.rmdir))


def _agents_layers(tmp_path: Path) -> tuple[Path, Path]:
    """Layers holding, in a directory the agent made unwritable, a link and a hard link to a
    file of the user's (0600) and a file; and overlayfs's `work/work`. (layers, that file)"""
    secret = tmp_path / "secret"
    secret.write_text("the user's\n")
    secret.chmod(0o600)
    layers = tmp_path / "layers"
    stuck = layers / "upper" / "src" / "stuck"
    stuck.mkdir(parents=True)
    os.symlink(secret, stuck / "link")
    os.link(secret, stuck / "hard")
    (stuck / "plain").write_text("x\n")
    (layers / "work" / "work").mkdir(parents=True)
    stuck.chmod(0o555)
    (layers / "upper" / "src").chmod(0o555)
    return layers, secret


def test_links_in_an_unwritable_directory_are_removed_not_followed(
    tmp_path: Path, without_root: None
) -> None:
    layers, secret = _agents_layers(tmp_path)
    remove_layer(layers)
    assert not os.path.lexists(layers)
    assert secret.read_text() == "the user's\n"
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600


def test_the_owners_rule_refuses_as_a_user_without_root(tmp_path: Path, without_root: None) -> None:
    """(What the fixture stands for: an entry of an unwritable directory stays.)"""
    layers, _ = _agents_layers(tmp_path)
    with pytest.raises(PermissionError):
        os.unlink(layers / "upper" / "src" / "stuck" / "plain")


def test_a_missing_layer_is_nothing_to_remove(tmp_path: Path) -> None:
    remove_layer(tmp_path / "never-made")
    assert list(tmp_path.iterdir()) == []


@needs_views()
def test_what_cannot_be_removed_is_passed_over_and_the_rest_removed(tmp_path: Path) -> None:
    """A directory in use (here, a mount point) stays; everything else goes, and the removal
    says so with the first error."""
    layers = tmp_path / "layers"
    parts = {name: tmp_path / "mount" / name for name in ("lower", "upper", "work")}
    for d in parts.values():
        d.mkdir(parents=True)
    busy = layers / "upper" / "busy"
    busy.mkdir(parents=True)
    for rel in ("upper/a/b.txt", "upper/c.txt", "work/d/e.txt"):
        (layers / rel).parent.mkdir(parents=True, exist_ok=True)
        (layers / rel).write_text(rel)
    overlay.mount_overlay([parts["lower"]], parts["upper"], parts["work"], busy)
    try:
        with pytest.raises(OSError) as raised:
            remove_tree(layers)
        assert raised.value.errno == errno.EBUSY
        left = sorted(str(p.relative_to(layers)) for p in layers.rglob("*"))
        assert left == ["upper", "upper/busy"]
    finally:
        overlay.unmount(busy)
    remove_tree(layers)
    assert not os.path.lexists(layers)
