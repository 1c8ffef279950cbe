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
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from guest.build import GuestImage, build_guest, default_out_dir
from guest.domain import ensure_libvirt, guest_domain_xml
from guest.processes import processes_naming
from tests.integration.conftest import Daemon
from vmdriver.libvirt_driver import LibvirtDriver, ensure_event_loop
from volumed.client import Client
from volumed.errors import BoxvolError

URI = "qemu:///system"
DOMAIN_PREFIX = "boxvol-test-"
MARKER = "BOXVOL-GUEST: "
#: Host-side limit for one guest's life; TCG boots take 5-15 s here, more under load.
GUEST_TIMEOUT = 180.0


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
        # The test's domains are gone by now (``domains`` depends on this fixture). A direct
        # virtiofsd outlives a clean boxvold stop by design (re-adopted at the next start),
        # so exports a failed test left behind are deleted first, or their virtiofsd would.
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


def virtiofsd_serving(*paths: Path) -> dict[int, str]:
    """virtiofsd processes whose command line names one of ``paths`` (pid -> command)."""
    return processes_naming(*(str(p) for p in paths), program="virtiofsd")


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


class TestDomain:
    """One persistent test domain and its console."""

    __test__ = False  # not a test class, whatever its name says

    def __init__(self, conn: Any, name: str, console_log: Path) -> None:
        self.conn = conn
        self.name = name
        self.console_log = console_log

    @property
    def dom(self) -> Any:
        return self.conn.lookupByName(self.name)

    def start(self) -> None:
        self.started = time.monotonic()
        self.dom.create()

    def console(self) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return text.replace("\r", "")

    def markers(self) -> list[str]:
        return [ln.split(MARKER, 1)[1] for ln in self.console().splitlines() if MARKER in ln]

    def lines_with(self, prefix: str) -> list[str]:
        return [ln.split(prefix, 1)[1] for ln in self.console().splitlines() if prefix in ln]

    def wait_console(self, text: str, timeout: float = GUEST_TIMEOUT) -> float:
        """Wait for ``text`` on the console; returns when it came (monotonic)."""
        deadline = time.monotonic() + timeout
        while text not in self.console():
            if not self.dom.isActive():
                raise AssertionError(f"{self.name} stopped before {text!r}:\n{self.console()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} from {self.name}:\n{self.console()[-3000:]}")
            time.sleep(0.05)
        return time.monotonic()

    def wait_stopped(self, timeout: float = GUEST_TIMEOUT) -> float:
        """Wait for the guest to power off; returns the seconds since ``start``."""
        deadline = time.monotonic() + timeout
        while self.dom.isActive():
            if time.monotonic() > deadline:
                self.dom.destroy()
                raise AssertionError(f"{self.name} still running:\n{self.console()[-3000:]}")
            time.sleep(0.1)
        return time.monotonic() - self.started

    def check_done(self) -> None:
        """The guest ran its script to exit 0 and powered off cleanly."""
        markers = self.markers()
        errors = [m for m in markers if m.startswith("error:")]
        assert not errors and markers and markers[-1] == "done", self.console()
        assert "script exit=0" in markers, self.console()


#: The test guest's definition (shared with the demo).
domain_xml = guest_domain_xml


def gone(conn: Any, name: str) -> bool:
    try:
        conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return True
        raise
    return False


class Domains:
    """Defines test domains and removes every one of them afterwards."""

    def __init__(self, conn: Any, image: GuestImage, workdir: Path) -> None:
        self.conn = conn
        self.image = image
        self.workdir = workdir
        self.names: list[str] = []

    def define(self, *, script: str, timeout: int = 120) -> TestDomain:
        name = f"{DOMAIN_PREFIX}{secrets.token_hex(4)}"
        console_log = self.workdir / f"{name}.console.log"
        self.names.append(name)
        self.conn.defineXML(
            domain_xml(name, self.image, console_log, script=script, timeout=timeout)
        )
        return TestDomain(self.conn, name, console_log)

    def cleanup(self) -> None:
        for name in self.names:
            try:
                dom = self.conn.lookupByName(name)
            except libvirt.libvirtError:
                continue
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefine()


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
