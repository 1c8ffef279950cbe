"""Fixtures shared by every test layer: each test gets its own home and runtime dir."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from volumed.fs.fuse_mount import detach_all_under

#: The reserve each test's boxvold keeps (64M each would pile up in pytest's kept tmp dirs);
#: tests of the reserve itself give their own.
TEST_RESERVE_SIZE = "1M"
os.environ["BOXVOL_RESERVE_SIZE"] = TEST_RESERVE_SIZE


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A fresh boxvol home (not yet created: the code under test makes it)."""
    path = tmp_path / "home"
    yield path
    # A sized volume's image stays mounted only if its boxvold (or store) leaked it.
    left = detach_all_under(str(path))
    assert left == [], f"mounts left behind under the home: {left}"


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    """A fresh, short runtime dir: unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="bv-", dir="/tmp"))
    path.chmod(0o755)  # as /run/boxvol: other users (a container's, QEMU's) pass through
    yield path
    # An export's mount outlives its test only if its server (or boxvold) leaked: clear it
    # up so the next test starts clean, then fail.
    left = detach_all_under(str(path))
    shutil.rmtree(path, ignore_errors=True)
    assert left == [], f"mounts left behind under the runtime dir: {left}"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No BOXVOL_* variables leak from the caller's environment into a test."""
    for key in list(os.environ):
        if key.startswith("BOXVOL_"):
            monkeypatch.delenv(key)
