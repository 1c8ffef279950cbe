"""A randomized differential run: a default FUSE export behaves as a plain ext4 directory."""

from __future__ import annotations

from pathlib import Path

from tests.fsdiff.engine import run_differential, seed_from_env, steps_from_env
from tests.helpers import Daemon

#: Fixed in CI so a failure replays; BOXVOL_FSDIFF_SEED overrides it.
SEED = 20240601


def test_export_matches_ext4(daemon: Daemon, tmp_path: Path) -> None:
    client = daemon.client()
    client.create_volume("fsdiff")
    export = client.create_export("fsdiff")
    reference = tmp_path / "reference"
    reference.mkdir()
    run_differential(
        Path(export["mountpoint"]),
        reference,
        seed_from_env(SEED),
        steps_from_env(),
        replay="pytest tests/integration/test_fuse_fsdiff.py",
    )
    assert "fuse handler failed" not in daemon.log.read_text()
