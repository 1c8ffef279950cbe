"""boxvold in a mount namespace of its own (as systemd's ProtectSystem= and friends put it)
still makes its mounts where the host sees them: FUSE exports and sized volumes' images are
mounted in PID 1's namespace and reach boxvold by propagation; a stop takes them all away."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Daemon, ok
from volumed.fs.fuse_mount import mounted_at, mounts_under

#: A private mount namespace that receives the host's mounts and sends none back.
SLAVE_NAMESPACE = ("unshare", "--mount", "--propagation", "slave")


@pytest.fixture
def shared_dirs(home: Path, runtime_dir: Path) -> Iterator[None]:
    """The home and runtime dir as shared mounts, as everything is under systemd (this
    machine's root is private): what is mounted on the host side propagates into slaves."""
    home.mkdir(parents=True, exist_ok=True)
    made = []
    for path in (home, runtime_dir):
        subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
        made.append(path)
        subprocess.run(["mount", "--make-shared", str(path)], check=True)
    try:
        yield
    finally:
        for path in reversed(made):
            subprocess.run(["umount", "-l", str(path)], check=True)


def test_mounts_of_a_boxvold_in_its_own_namespace_reach_the_host(
    home: Path, runtime_dir: Path, shared_dirs: None
) -> None:
    daemon = Daemon(home, runtime_dir, wrapper=SLAVE_NAMESPACE)
    daemon.start()
    try:
        pid = daemon.process.pid if daemon.process else 0
        assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        assert "mounts are made in the host's mount namespace" in daemon.log.read_text()
        ok(daemon, "create", "sized", "--size", "16M")
        volume = home / "volumes" / "named" / "sized"
        assert mounted_at(str(volume))  # the image, seen from the host's namespace
        export = daemon.client().create_export("sized")
        mountpoint = Path(export["mountpoint"])
        assert mounted_at(str(mountpoint))  # the FUSE view, too
        (mountpoint / "through-the-view").write_text("host sees it")
        assert (volume / "through-the-view").read_text() == "host sees it"
        daemon.client().remove_export(export["id"])
        assert not mounted_at(str(mountpoint))
        ok(daemon, "create", "gone", "--size", "16M")
        ok(daemon, "rm", "gone")
        assert not mounted_at(str(home / "volumes" / "named" / "gone"))
    finally:
        assert daemon.stop() == 0, daemon.log.read_text()
    # Nothing left but the test's own shared bind mounts.
    assert mounts_under(str(home)) == [str(home)]
    assert mounts_under(str(runtime_dir)) == [str(runtime_dir)]
