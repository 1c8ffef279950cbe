"""The libvirt driver with real guests: libvirtd + QEMU (TCG) + boxvold's virtiofsd + the
test guest. Each test boots its guests through libvirt and reads what they did from their
console and from the volume on the host."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import threading
import time
from typing import Any

import libvirt
import pytest
import trio

from tests.helpers import REPO, VENV_BIN, Daemon
from tests.vm.helpers import (
    INACTIVE,
    URI,
    Domains,
    TestDomain,
    share_waits,
    virtiofsd_running,
    volume_dir,
)
from vmdriver import domain_xml as dx
from vmdriver.attachments import anonymous_consumer
from vmdriver.backends.libvirt import LibvirtDriver
from vmdriver.cli import main_vm
from vmdriver.driver import DeviceRemovalTimeout, HypervisorError, LifecycleEvent, Scope
from volumed.client import Client
from volumed.errors import HostPathRefused, NotFound
from volumed.specs import parse_specs


def config_xml(domain: TestDomain) -> str:
    return str(domain.dom.XMLDesc(INACTIVE))


def live_xml(domain: TestDomain) -> str:
    return str(domain.dom.XMLDesc(0))


# -- 1: boot-time attachment of a named volume, shared by two domains -----------------------

WRITER = """\
set -e
echo "hello from $(uname -r)" > /data/hello.txt
mkdir -p /data/sub && echo nested > /data/sub/n.txt
sync
echo "WROTE: ok"
"""

READER = """\
echo "READ: $(cat /in/hello.txt)"
if echo x > /in/nope.txt 2>/dev/null; then echo "RO: writable"; else echo "RO: refused"; fi
"""


def test_boot_time_named_volume_written_then_read_by_another_domain(
    driver: LibvirtDriver,
    domains: Domains,
    boxvold: Daemon,
    client: Client,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    writer = domains.define(script=WRITER)
    prepared = driver.prepare(writer.name)
    assert "added <memoryBacking>" in prepared.changes and not prepared.restart_needed
    assert driver.prepare(writer.name).changes == ()  # idempotent on a real definition too

    [att] = driver.attach(writer.name, parse_specs(["shared:/data"]))
    assert (att.tag, att.guest_path, att.live, att.config) == ("bv-shared", "/data", False, True)
    assert att.socket is not None and att.socket.startswith(str(boxvold.runtime_dir))
    xml = config_xml(writer)
    assert [f.tag for f in dx.boxvol_filesystems(xml)] == ["bv-shared"]
    assert "boxvol.mount=bv-shared:/data" in dx.cmdline(xml)
    assert [r.guest_path for r in dx.attachment_records(xml)] == ["/data"]
    volume = client.get_volume("shared")
    assert volume["in_use"] and volume["kind"] == "named"
    # libvirt was told a socket of boxvold's, never the volume's directory.
    assert str(boxvold.home) not in xml

    writer.start()
    seconds = writer.wait_stopped()
    writer.check_done()
    assert "mounted bv-shared at /data (rw)" in writer.markers()
    assert writer.lines_with("WROTE: ") == ["ok"]
    host = volume_dir(boxvold, volume)
    # The kernel's own messages share the console and may follow on the same line.
    started = re.search(r"start kernel=([\w.+-]+)", writer.console())
    assert started is not None, writer.console()
    kernel = started[1]
    assert (host / "hello.txt").read_text() == f"hello from {kernel}\n"
    assert (host / "sub" / "n.txt").read_text() == "nested\n"
    # The writer stopped; its export stays armed for its next boot.
    assert client.get_export(att.export_id or "")["id"] == att.export_id
    print(f"writer guest: {seconds:.1f} s from start to power-off")

    # The second domain goes through the real CLI, read-only.
    reader = domains.define(script=READER)
    monkeypatch.setenv("BOXVOL_SOCKET", str(boxvold.socket))
    assert main_vm(["prepare", reader.name, "--connect", URI]) == 0
    assert main_vm(["attach", reader.name, "-v", "shared:/in:ro", "--connect", URI]) == 0
    capsys.readouterr()
    assert main_vm(["ls", reader.name, "--format", "json", "--connect", URI]) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert listed["guest_path"] == "/in" and listed["read_only"] and listed["config"]
    assert listed["volume"] == {"id": volume["id"], "name": "shared"}
    assert "boxvol.mount=bv-shared:/in:ro" in dx.cmdline(config_xml(reader))

    reader.start()
    seconds = reader.wait_stopped()
    reader.check_done()
    assert reader.lines_with("READ: ") == [f"hello from {kernel}"]
    assert reader.lines_with("RO: ") == ["refused"]
    assert not (host / "nope.txt").exists()
    print(f"reader guest: {seconds:.1f} s from start to power-off")

    # The writer boots again on the same export: boxvold re-armed its virtiofsd.
    (host / "hello.txt").unlink()
    writer.start()
    writer.wait_stopped()
    writer.check_done()
    assert (host / "hello.txt").read_text() == f"hello from {kernel}\n"

    # Detaching from the stopped domains: config, record and cmdline word go, then the export.
    for domain in (writer, reader):
        [attached] = driver.list_attachments(domain.name)
        [detached] = driver.detach(domain.name, ["bv-shared"])
        assert detached.export_id == attached.export_id
        xml = config_xml(domain)
        assert dx.boxvol_filesystems(xml) == [] and dx.attachment_records(xml) == []
        assert "boxvol.mount=" not in dx.cmdline(xml)
        with pytest.raises(NotFound):
            client.get_export(attached.export_id or "")
    assert not client.get_volume("shared")["in_use"]
    assert (host / "hello.txt").exists()  # a named volume outlives its attachments


# -- 2: hot-plug, hot-unplug in the right order, attach again; a guest that does not answer --

HOTPLUG = (
    share_waits("bv-hot")
    + """\
mkdir -p /mnt
echo "STEP: waiting"
for n in 1 2 3; do
    wait_mount
    echo "cycle $n" > /mnt/cycle$n.txt && sync
    umount /mnt
    echo "STEP: unmounted$n"
    wait_gone
    echo "STEP: gone$n"
done
"""
)


class RecordingClient(Client):
    """boxvold's client, noting when each export deletion was sent."""

    def __init__(self, socket_path: str) -> None:
        super().__init__(socket_path)
        self.deleted: list[tuple[float, str]] = []

    def remove_export(self, export_id: str) -> dict[str, Any]:
        self.deleted.append((time.monotonic(), export_id))
        return super().remove_export(export_id)


class RemovalEvents:
    """The test's own DEVICE_REMOVED subscription: (time, domain, alias) as they come."""

    def __init__(self, conn: Any) -> None:
        self.seen: list[tuple[float, str, str]] = []
        self._lock = threading.Lock()
        self.conn = conn
        self.id = conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._on_removed, None
        )

    def _on_removed(self, _conn: Any, dom: Any, alias: str, _opaque: Any) -> None:
        with self._lock:
            self.seen.append((time.monotonic(), dom.name(), alias))

    def when(self, domain: str, alias: str) -> float:
        with self._lock:
            times = [t for t, d, a in self.seen if (d, a) == (domain, alias)]
        assert times, f"no DEVICE_REMOVED for {alias} of {domain}: {self.seen}"
        return times[-1]

    def close(self) -> None:
        self.conn.domainEventDeregisterAny(self.id)


def test_hotplug_unplug_in_order_and_again(
    conn: Any, domains: Domains, boxvold: Daemon, client: Client
) -> None:
    recording = RecordingClient(str(boxvold.socket))
    events = RemovalEvents(conn)
    guest = domains.define(script=HOTPLUG, timeout=300)
    try:
        with LibvirtDriver(recording, URI) as driver:
            driver.prepare(guest.name)
            guest.start()
            guest.wait_console("STEP: waiting")
            host = None
            for cycle in (1, 2, 3):
                t0 = time.monotonic()
                [att] = driver.attach(guest.name, parse_specs(["hot:/mnt"]))
                attach_seconds = time.monotonic() - t0
                assert (att.tag, att.live, att.config) == ("bv-hot", True, True)
                assert [f.alias for f in dx.boxvol_filesystems(live_xml(guest))] == [att.alias]
                assert [f.tag for f in dx.boxvol_filesystems(config_xml(guest))] == ["bv-hot"]
                export = client.get_export(att.export_id or "")
                guest.wait_console(f"STEP: unmounted{cycle}")
                mounted_seconds = time.monotonic() - t0
                host = volume_dir(boxvold, client.get_volume("hot"))
                assert (host / f"cycle{cycle}.txt").read_text() == f"cycle {cycle}\n"

                if cycle == 2:
                    # A guest that cannot answer (vCPUs paused): the detach gives up, says
                    # so, and leaves the export and its virtiofsd running.
                    guest.dom.suspend()
                    with pytest.raises(DeviceRemovalTimeout, match="keeps running"):
                        driver.detach(guest.name, ["/mnt"], timeout=3)
                    assert client.get_export(export["id"])["id"] == export["id"]
                    assert virtiofsd_running(client.get_export(export["id"]))
                    assert export["id"] not in [e for _, e in recording.deleted]
                    assert [a.tag for a in driver.list_attachments(guest.name)] == ["bv-hot"]
                    guest.dom.resume()

                t1 = time.monotonic()
                [detached] = driver.detach(guest.name, ["/mnt"])
                detach_seconds = time.monotonic() - t1
                assert detached.export_id == export["id"]
                # Order: the guest released the device, libvirt said so, and only then was
                # the export (and with it virtiofsd) deleted.
                removed_at = events.when(guest.name, att.alias or "")
                [deleted_at] = [t for t, e in recording.deleted if e == export["id"]]
                assert removed_at < deleted_at
                with pytest.raises(NotFound):
                    client.get_export(export["id"])
                assert dx.boxvol_filesystems(live_xml(guest)) == []
                assert dx.boxvol_filesystems(config_xml(guest)) == []
                assert driver.list_attachments(guest.name) == []
                guest.wait_console(f"STEP: gone{cycle}")
                print(
                    f"cycle {cycle}: attach {attach_seconds:.2f} s, guest wrote "
                    f"{mounted_seconds:.2f} s after attach, detach {detach_seconds:.2f} s"
                )
            guest.wait_stopped()
            guest.check_done()
            assert host is not None and sorted(p.name for p in host.iterdir()) == [
                "cycle1.txt",
                "cycle2.txt",
                "cycle3.txt",
            ]
    finally:
        events.close()


# -- 2b: a hot-plug that fails half-way is rolled back in the safe order ---------------------


def test_failed_hotplug_is_rolled_back(
    driver: LibvirtDriver, domains: Domains, boxvold: Daemon, client: Client
) -> None:
    guest = domains.define(script="sleep 300\n", timeout=0)
    # One spare root port: the first device takes it, the second has nowhere to go.
    driver.prepare(guest.name, spare_root_ports=1)
    guest.start()
    guest.wait_console("script start")
    with pytest.raises(HypervisorError, match="could not attach"):
        driver.attach(guest.name, parse_specs(["/first", "/second", "named:/third"]))
    # The first device was unplugged (confirmed) before its export was deleted; nothing of
    # the attempt is left but the named volume, which outlives attachments by design.
    for xml in (live_xml(guest), config_xml(guest)):
        assert dx.boxvol_filesystems(xml) == [] and dx.attachment_records(xml) == []
    assert client.list_exports() == []
    assert [v["name"] for v in client.list_volumes()] == ["named"]
    assert driver.list_attachments(guest.name) == []
    guest.dom.destroy()


# -- 3: an anonymous volume lives as long as its domain ---------------------------------------

SCRATCH = """\
echo scratch > /scratch/s.txt && sync && echo "SCRATCH: ok"
"""


async def test_anonymous_volume_removed_when_domain_undefined(
    driver: LibvirtDriver, domains: Domains, boxvold: Daemon, client: Client
) -> None:
    guest = domains.define(script=SCRATCH)
    seen: list[LifecycleEvent] = []
    released = trio.Event()

    def on_event(event: LifecycleEvent) -> None:
        seen.append(event)
        if event.domain == guest.name and event.released is not None:
            released.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(driver.watch_lifecycle, on_event=on_event))

        def attach_and_boot() -> dict[str, Any]:
            driver.prepare(guest.name)
            [att] = driver.attach(guest.name, parse_specs(["/scratch"]), scope=Scope(False, True))
            assert att.volume is not None and att.volume.name is None
            volume = client.get_volume(att.volume.id)
            assert volume["kind"] == "anonymous"
            assert volume["consumer"] == anonymous_consumer(URI, guest.dom.UUIDString())
            guest.start()
            guest.wait_stopped()
            guest.check_done()
            return volume

        volume = await trio.to_thread.run_sync(attach_and_boot)
        host = volume_dir(boxvold, volume)
        assert (host / "s.txt").read_text() == "scratch\n"
        # Stopped, not undefined: the volume and its export stay.
        await trio.sleep(0.5)
        assert client.get_volume(volume["id"])["in_use"]
        assert not released.is_set()

        await trio.to_thread.run_sync(guest.dom.undefine)
        with trio.fail_after(30):
            await released.wait()
        nursery.cancel_scope.cancel()

    [event] = [e for e in seen if e.released is not None]
    assert event.kind == "undefined"
    assert event.released is not None and event.released.volumes == (volume["id"],)
    assert len(event.released.exports) == 1
    with pytest.raises(NotFound):
        client.get_volume(volume["id"])
    assert client.list_exports() == []
    assert not host.exists()
    kinds = [e.kind for e in seen if e.domain == guest.name]
    assert "started" in kinds and "stopped" in kinds


# -- 4: a host path is refused before libvirt is touched --------------------------------------


def test_host_path_refused_before_libvirt(
    domains: Domains, boxvold: Daemon, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    guest = domains.define(script="true\n")
    before = config_xml(guest)

    # In another process: exit 2, and libvirt was not even imported.
    code = (
        "import sys\n"
        "from vmdriver.cli import main_vm\n"
        f"rc = main_vm(['attach', {guest.name!r}, '-v', '/etc:/guest', '-v', 'ok:/x'])\n"
        "assert 'libvirt' not in sys.modules, 'libvirt was imported'\n"
        "sys.exit(rc)\n"
    )
    env = {**os.environ, "BOXVOL_SOCKET": str(boxvold.socket)}
    result = subprocess.run(
        [str(VENV_BIN / "python"), "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "host bind mounts are not supported" in result.stderr

    # In this process, where libvirt is loaded: no connection is ever opened.
    def refuse(*_args: Any) -> None:
        raise AssertionError("libvirt was touched")

    for name in ("open", "openAuth", "openReadOnly"):
        monkeypatch.setattr(libvirt, name, refuse)
    monkeypatch.setenv("BOXVOL_SOCKET", str(boxvold.socket))
    for spec in ("/host:/guest", "./rel:/guest", "~/x:/guest"):
        assert main_vm(["attach", guest.name, "-v", "named:/ok", "-v", spec]) == 2
        # The driver itself, given the same list, refuses it before connecting.
        with LibvirtDriver(client, URI) as fresh, pytest.raises(HostPathRefused):
            fresh.attach(guest.name, ["named:/ok", spec])
    # Nothing happened anywhere: no volume, no export, the domain as it was.
    assert client.list_volumes() == []
    assert client.list_exports() == []
    monkeypatch.undo()
    assert config_xml(guest) == before
    assert sys.modules["libvirt"] is libvirt


def test_cli_usage_errors_exit_2_without_touching_anything(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(*_args: Any) -> None:
        raise AssertionError("libvirt was touched")

    for name in ("open", "openAuth", "openReadOnly"):
        monkeypatch.setattr(libvirt, name, refuse)
    # Nothing listens here: a command that got as far as boxvold would exit 1, not 2.
    monkeypatch.setenv("BOXVOL_SOCKET", "/nonexistent/boxvold.sock")
    for argv in (
        ["attach", "dom"],  # no -v
        ["attach", "dom", "-v", "data:relative"],
        ["attach", "dom", "-v", "a:/x", "-v", "b:/x"],  # two volumes at one guest path
        ["attach", "dom", "-v", "data:/x", "--via", "nfs"],
        ["detach", "dom"],  # neither a target nor --all
        ["detach", "dom", "bv-x", "--all"],
        ["prepare"],
        ["frobnicate", "dom"],
    ):
        assert main_vm(argv) == 2, argv
    assert main_vm(["--help"]) == 0
    assert "prepare" in capsys.readouterr().out
