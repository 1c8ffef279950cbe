"""The lifecycle watcher against a real libvirtd and a real boxvold, no guest booted: domains
undefined while no watcher ran are released when it starts (and nothing else is), a lost
libvirt connection (libvirtd really restarted) is re-established with backoff, the callbacks
come back and the reconcile runs again, and ``boxvol vm watch`` reports what it released."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest
import trio

from guest.build import GuestImage
from guest.domain import ensure_libvirt
from tests.helpers import VENV_BIN, Daemon
from tests.vm.helpers import URI, Domains, TestDomain, gone
from vmdriver.attachments import anonymous_consumer
from vmdriver.backends.libvirt import LibvirtDriver
from vmdriver.backends.libvirt_watch import watch
from vmdriver.driver import HypervisorUnavailable, LifecycleEvent, Scope
from volumed.client import Client
from volumed.errors import NotFound

BOOT_TIME = Scope(live=False, config=True)
#: Where libvirtd keeps persistent qemu definitions (read again when it starts).
QEMU_CONFIG_DIR = Path("/etc/libvirt/qemu")
LIBVIRTD_PIDFILE = Path("/run/libvirtd.pid")  # written by ``libvirtd -d`` as root


def attach_anonymous(driver: LibvirtDriver, client: Client, domain: TestDomain, path: str) -> str:
    """Prepare ``domain`` and attach a fresh anonymous volume at boot time; its volume id."""
    driver.prepare(domain.name)
    [att] = driver.attach(domain.name, [path], scope=BOOT_TIME)
    assert att.volume is not None and att.volume.name is None and att.export_id is not None
    consumer = anonymous_consumer(URI, domain.dom.UUIDString())
    assert client.get_volume(att.volume.id)["consumer"] == consumer
    return att.volume.id


def exports_of(client: Client, domain: str) -> list[str]:
    return [
        e["id"]
        for e in client.list_exports()
        if isinstance(e.get("consumer"), dict) and e["consumer"].get("vm") == domain
    ]


def volume_exists(client: Client, ref: str) -> bool:
    try:
        client.get_volume(ref)
    except NotFound:
        return False
    return True


# -- 1: the start-up reconcile ---------------------------------------------------------------


async def test_startup_reconcile_releases_only_domains_that_are_gone(
    driver: LibvirtDriver, domains: Domains, client: Client
) -> None:
    undefined = domains.define(script="true\n")
    other = domains.define(script="true\n")
    scratch = attach_anonymous(driver, client, undefined, "/scratch")
    driver.attach(undefined.name, ["shared:/shared"], scope=BOOT_TIME)
    kept = attach_anonymous(driver, client, other, "/keep")
    other_before = driver.list_attachments(other.name)
    [other_export] = exports_of(client, other.name)
    assert len(exports_of(client, undefined.name)) == 2

    # Undefined while no watcher runs: no event will ever say so.
    undefined_uuid = undefined.dom.UUIDString()
    undefined.dom.undefine()
    assert gone(undefined.conn, undefined.name)

    # A libvirt error other than "no such domain" (here: a closed connection) releases
    # nothing; the domains stay candidates for the next reconcile.
    with LibvirtDriver(client, URI) as broken:
        broken.conn.close()
        assert broken.reconcile() == []
    assert len(exports_of(client, undefined.name)) == 2 and volume_exists(client, scratch)

    seen: list[LifecycleEvent] = []
    async with trio.open_nursery() as nursery:
        # started() comes after the start-up reconcile: everything is decided by now.
        await nursery.start(functools.partial(driver.watch_lifecycle, on_event=seen.append))
        nursery.cancel_scope.cancel()

    [event] = seen
    # Found by its UUID in boxvold's records (the domain's name is only what they call it).
    assert (event.domain, event.uuid, event.kind) == (undefined.name, undefined_uuid, "gone")
    assert event.released is not None
    assert event.released.volumes == (scratch,) and len(event.released.exports) == 2
    assert exports_of(client, undefined.name) == []
    assert not volume_exists(client, scratch)
    # A named volume outlives its attachments; only its export went.
    shared = client.get_volume("shared")
    assert not shared["in_use"]
    # The other domain's attachment is untouched: its export, its anonymous volume, its XML.
    assert exports_of(client, other.name) == [other_export]
    assert client.get_volume(kept)["in_use"]
    assert driver.list_attachments(other.name) == other_before
    # A second reconcile finds nothing more to do.
    assert driver.reconcile() == []


async def test_periodic_reconcile_releases_what_a_cut_short_release_left(
    driver: LibvirtDriver, domains: Domains, client: Client
) -> None:
    # An anonymous volume whose domain is gone and whose export is already deleted: what a
    # release cut short by a boxvold restart leaves. No event and no reconnection will come;
    # the periodic reconcile finds it through the volume's consumer.
    live = domains.define(script="true\n")
    kept = client.create_volume(consumer=anonymous_consumer(URI, live.dom.UUIDString()))["id"]
    ghost = str(uuid.uuid4())  # a domain that no longer exists: only its UUID is recorded
    seen: list[LifecycleEvent] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(watch, driver, on_event=seen.append, reconcile_every=0.2)
        )
        assert seen == []  # nothing was gone at start
        orphan = (
            await trio.to_thread.run_sync(
                functools.partial(client.create_volume, consumer=anonymous_consumer(URI, ghost))
            )
        )["id"]
        with trio.fail_after(30):
            while await trio.to_thread.run_sync(volume_exists, client, orphan):
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    [event] = seen
    assert (event.domain, event.kind) == (ghost, "gone")
    assert event.released is not None and event.released.volumes == (orphan,)
    assert volume_exists(client, kept)
    client.remove_volume(kept)


def test_cli_watch_reports_what_the_startup_reconcile_released(
    driver: LibvirtDriver, domains: Domains, boxvold: Daemon, client: Client
) -> None:
    undefined = domains.define(script="true\n")
    scratch = attach_anonymous(driver, client, undefined, "/scratch")
    undefined.dom.undefine()

    env = {**os.environ, "BOXVOL_SOCKET": str(boxvold.socket)}
    watcher = subprocess.Popen(
        [str(VENV_BIN / "boxvol"), "vm", "watch", "--connect", URI],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout is not None
        ready, _, _ = select.select([watcher.stdout], [], [], 60)
        assert ready, "boxvol vm watch printed nothing within 60 s"
        line = watcher.stdout.readline()
    finally:
        watcher.send_signal(signal.SIGTERM)  # what systemd's stop sends
        try:
            _, stderr = watcher.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            watcher.kill()
            _, stderr = watcher.communicate()
    assert (
        line == f"{undefined.name} gone: released 1 export(s), removed 1 anonymous volume(s)\n"
    ), stderr
    assert watcher.returncode == 0, stderr
    assert not volume_exists(client, scratch)
    assert exports_of(client, undefined.name) == []


# -- 2: libvirtd restarts under the watcher --------------------------------------------------


@pytest.fixture
def own_domains(
    libvirtd: None, guest_image: GuestImage, workdir: Path, boxvold: Daemon
) -> Iterator[Domains]:
    """Test domains on a connection of their own, reopened for the clean-up: the test
    restarts libvirtd, which kills every connection open at the time."""
    made = Domains(libvirt.open(URI), guest_image, workdir)
    first = made.conn
    try:
        yield made
    finally:
        ensure_libvirt(URI)  # whatever the test did, libvirtd runs again
        made.conn = libvirt.open(URI)
        try:
            made.cleanup()
            left = [n for n in made.names if not gone(made.conn, n)]
        finally:
            made.conn.close()
            with contextlib.suppress(libvirt.libvirtError):
                first.close()
        assert not left, f"test domains left behind: {left}"


def restart_libvirtd(while_down: Callable[[], None]) -> None:
    """Stop libvirtd (SIGTERM to the pid in its pidfile), call ``while_down``, start it again
    as ``guest.domain.ensure_libvirt`` does and wait until it answers. Blocks."""
    pid = int(LIBVIRTD_PIDFILE.read_text())
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "libvirtd"
    os.kill(pid, signal.SIGTERM)
    try:
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists():
            assert time.monotonic() < deadline, f"libvirtd {pid} did not stop in 30 s"
            time.sleep(0.05)
        while_down()
    finally:
        ensure_libvirt(URI)


class Records(logging.Handler):
    """The watcher's log messages, readable from any thread."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def count(self, text: str) -> int:
        return sum(text in m for m in list(self.messages))


@pytest.fixture
def watch_log() -> Iterator[Records]:
    records = Records()
    logger = logging.getLogger("vmdriver.backends.libvirt_watch")
    logger.addHandler(records)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(records)
    logger.setLevel(old_level)


async def test_watcher_survives_a_libvirtd_restart(
    driver: LibvirtDriver, own_domains: Domains, client: Client, watch_log: Records
) -> None:
    vanished = own_domains.define(script="true\n")
    later = own_domains.define(script="true\n")
    vanished_volume = attach_anonymous(driver, client, vanished, "/scratch")
    vanished_uuid = vanished.dom.UUIDString()
    later_volume = attach_anonymous(driver, client, later, "/scratch")
    definition = QEMU_CONFIG_DIR / f"{vanished.name}.xml"
    assert definition.exists()

    seen: list[LifecycleEvent] = []
    arrived = trio.Event()

    def on_event(event: LifecycleEvent) -> None:
        seen.append(event)
        arrived.set()

    async def next_release(domain: str) -> LifecycleEvent:
        with trio.fail_after(60):
            while True:
                found = [e for e in seen if e.domain == domain and e.released is not None]
                if found:
                    return found[0]
                nonlocal arrived
                arrived = trio.Event()
                await arrived.wait()

    def while_down() -> None:
        # libvirtd reads its definitions when it starts: one removed now is gone for good,
        # without any event. Then libvirtd stays down until the watcher has failed to
        # reconnect twice, so the backoff is really exercised.
        definition.unlink()
        deadline = time.monotonic() + 30
        while watch_log.count("reconnection attempt") < 2:
            assert time.monotonic() < deadline, watch_log.messages
            time.sleep(0.05)

    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(
                watch, driver, on_event=on_event, first_retry_delay=0.2, max_retry_delay=1.0
            )
        )
        assert seen == []  # both domains exist: the start-up reconcile released nothing
        old_conn = driver.conn

        await trio.to_thread.run_sync(restart_libvirtd, while_down)
        # Reconnected, and the reconcile ran again: the vanished domain is released...
        event = await next_release(vanished.name)
        assert (event.kind, event.uuid) == ("gone", vanished_uuid)
        assert event.released is not None and event.released.volumes == (vanished_volume,)
        assert len(event.released.exports) == 1
        # ...on a new connection, with the lifecycle callback registered again: an undefine
        # now arrives as a live event.
        assert driver.conn is not old_conn
        fresh = await trio.to_thread.run_sync(libvirt.open, URI)
        try:
            await trio.to_thread.run_sync(lambda: fresh.lookupByName(later.name).undefine())
        finally:
            fresh.close()
        event = await next_release(later.name)
        assert event.kind == "undefined" and event.uuid is not None
        assert event.released is not None and event.released.volumes == (later_volume,)
        nursery.cancel_scope.cancel()

    assert client.list_exports() == []
    assert not volume_exists(client, vanished_volume)
    assert not volume_exists(client, later_volume)
    messages = watch_log.messages
    assert any("connection to qemu:///system closed (end of file)" in m for m in messages)
    attempts = [m for m in messages if m.startswith("reconnecting to libvirt")]
    failures = [m for m in messages if m.startswith("reconnection attempt")]
    assert len(attempts) >= 3 and len(failures) == len(attempts) - 1, messages
    assert "next attempt in 0.4 s" in failures[0] and "next attempt in 0.8 s" in failures[1]
    assert any(m.startswith("reconnected to libvirt") for m in messages), messages


async def test_watch_fails_at_start_when_libvirt_is_unreachable(client: Client) -> None:
    """At start there is nothing to reconnect to: the error is raised (the CLI exits 1;
    systemd's Restart=on-failure tries again)."""
    nowhere = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
    with LibvirtDriver(client, nowhere) as driver, pytest.raises(HypervisorUnavailable):
        await watch(driver)


def test_cli_watch_without_libvirt_is_an_error_not_a_traceback(boxvold: Daemon) -> None:
    env = {**os.environ, "BOXVOL_SOCKET": str(boxvold.socket)}
    nowhere = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
    done = subprocess.run(
        [str(VENV_BIN / "boxvol"), "vm", "watch", "--connect", nowhere],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "boxvol: error: cannot connect to libvirt" in done.stderr
    assert "Traceback" not in done.stderr
