"""Fixtures of the VM tests: libvirtd and virtlogd (started if they are not running), the
test guest (built by guest/build.py), a real boxvold subprocess, the libvirt driver, and
throw-away persistent domains ``boxvol-test-<random>`` that are always destroyed and undefined.

Guests are TCG (``<domain type='qemu'>``: KVM hangs on this host) booting the test guest's
kernel directly; what a guest does is a shell script on its kernel command line
(``boxvol.script64=``) and everything it says arrives in a console log file. See guest/README.md.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from guest.build import GuestImage, build_guest, default_out_dir
from guest.domain import ensure_libvirt
from tests.helpers import Daemon
from tests.vm.helpers import URI, Domains, gone, virtiofsd_serving
from vmdriver.backends.libvirt import LibvirtDriver, ensure_event_loop
from volumed.client import Client
from volumed.errors import BoxvolError


@pytest.fixture(scope="session")
def libvirtd() -> None:
    """virtlogd (it writes the guests' console files) and libvirtd, started if not running."""
    ensure_event_loop()  # before any connection is opened; it also silences libvirt's stderr
    ensure_libvirt(URI)


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The test guest's kernel and initramfs (built once; an up-to-date build is a no-op)."""
    return build_guest(default_out_dir())


@pytest.fixture
def conn(libvirtd: None) -> Iterator[Any]:
    """A libvirt connection of the test's own (the driver has another)."""
    connection = libvirt.open(URI)
    yield connection
    connection.close()


@pytest.fixture
def boxvold(home: Path, runtime_dir: Path) -> Iterator[Daemon]:
    """A real boxvold subprocess; its runtime dir is 0755 so QEMU (libvirt-qemu, group kvm)
    can reach the vhost-user sockets boxvold makes under it."""
    assert runtime_dir.stat().st_mode & 0o755 == 0o755
    daemon = Daemon(home, runtime_dir)
    daemon.start()
    try:
        yield daemon
    finally:
        # The test's domains are gone by now (``domains`` depends on this fixture). An export
        # in use outlives a clean boxvold stop by design (volumed.stop_policy), so exports a
        # failed test left behind are deleted first, or a virtiofsd still connected would.
        if daemon.process is not None:
            client = Client(str(daemon.socket), timeout=30)
            with contextlib.suppress(BoxvolError):
                for export in client.list_exports():
                    with contextlib.suppress(BoxvolError):
                        client.remove_export(export["id"])
            status = daemon.stop()
            assert status == 0, daemon.log.read_text()
        strays = virtiofsd_serving(home, runtime_dir)
        for pid in strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not strays, f"virtiofsd left running: {strays}"


@pytest.fixture
def client(boxvold: Daemon) -> Client:
    """boxvold's client; a daemon that hangs fails the test in a minute, not five."""
    return Client(str(boxvold.socket), timeout=60)


@pytest.fixture
def driver(libvirtd: None, client: Client) -> Iterator[LibvirtDriver]:
    with LibvirtDriver(client, URI) as d:
        yield d


@pytest.fixture
def workdir() -> Iterator[Path]:
    """Where console logs go: 0755 under /tmp (virtlogd writes them; QEMU must traverse)."""
    path = Path(tempfile.mkdtemp(prefix="boxvol-vmtest-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def domains(
    conn: Any, guest_image: GuestImage, workdir: Path, boxvold: Daemon
) -> Iterator[Domains]:
    """Test domains; removed before boxvold stops (QEMU lets go of its sockets first)."""
    made = Domains(conn, guest_image, workdir)
    try:
        yield made
    finally:
        made.cleanup()
        left = [n for n in made.names if not gone(conn, n)]
        assert not left, f"test domains left behind: {left}"
