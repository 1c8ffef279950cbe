"""A randomized differential run: a default FUSE export behaves as a plain ext4 directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fsdiff.engine import run_differential, seed_from_env, steps_from_env
from tests.helpers import Daemon

#: Fixed in CI so a failure replays; BOXVOL_FSDIFF_SEED overrides them.
SEEDS = (20240601, 20261204, 7)


@pytest.mark.parametrize("seed", SEEDS)
def test_export_matches_ext4(daemon: Daemon, tmp_path: Path, seed: int) -> None:
    client = daemon.client()
    client.create_volume("fsdiff")
    export = client.create_export("fsdiff")
    reference = tmp_path / "reference"
    reference.mkdir()
    run_differential(
        Path(export["mountpoint"]),
        reference,
        seed_from_env(seed),
        steps_from_env(),
        replay="pytest tests/integration/test_fuse_fsdiff.py",
    )
    # The export's own server logs its handlers' failures.
    server_log = daemon.runtime_dir / "servers" / f"{export['id']}.log"
    assert "fuse handler failed" not in server_log.read_text()
