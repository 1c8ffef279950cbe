"""The same real-guest cases (TCG) for every backend that can run here: libvirt, and QEMU
over QMP started by the test itself (q35, memfd shared memory, free root ports; no libvirt
involved). One attach workflow (``vmdriver.attachments``) drives both: attach a named volume,
the guest writes, the file is on the host; read-only holds after a guest ``remount,rw``;
hot-unplug leaves no device, no chardev and no virtiofsd; an anonymous volume is removed by
``boxvol vm watch`` when its VM ends. Cloud Hypervisor runs the workflow cases against its
API simulator (tests/integration/test_cloud_hypervisor_backend.py)."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from guest.build import GuestImage
from tests.helpers import VENV_BIN, Daemon
from tests.vm.helpers import (
    GUEST_TIMEOUT,
    URI,
    QemuGuest,
    TestDomain,
    share_waits,
    virtiofsd_serving,
)
from vmdriver.attachments import Attachments, anonymous_consumer
from vmdriver.backends.base import NewDevice
from vmdriver.backends.libvirt import LibvirtDriver
from vmdriver.backends.qmp import QmpBackend
from vmdriver.driver import DomainNotPrepared, Scope
from vmdriver.qmp import QmpCommandError, QmpConnection
from volumed.client import Client

SCRIPT = (
    share_waits("bv-data")
    + """\
mkdir -p /mnt
echo "STEP: waiting"
wait_mount
echo hello > /mnt/hello.txt && sync
umount /mnt
echo "STEP: unmounted1"
wait_gone
echo "STEP: gone1"
wait_mount
if mount -o remount,rw /mnt 2>/dev/null && echo evil > /mnt/evil.txt 2>/dev/null; then
    echo "STEP: ro-broken"
else
    echo "STEP: ro-held"
fi
umount /mnt
echo "STEP: unmounted2"
wait_gone
echo "STEP: gone2"
i=0
until [ "$(devs)" != 0 ]; do
    i=$((i+1)); [ $i -gt 3000 ] && { echo "STEP: no-anon"; exit 5; }; sleep 0.1
done
echo "STEP: anon-seen"
"""
)


def qmp(guest: QemuGuest, command: str, **arguments: Any) -> Any:
    """One QMP command on the guest's socket, from the test's own session."""

    async def run() -> Any:
        async with QmpConnection.open(str(guest.qmp_socket)) as session:
            return await session.execute(command, arguments or None)

    return trio.run(run)


def boxvol_chardevs(guest: QemuGuest) -> list[str]:
    return [c["label"] for c in qmp(guest, "query-chardev") if "boxvol" in c["label"]]


@dataclasses.dataclass
class Target:
    """One VM on one backend, with what differs between backends."""

    name: str
    uri: str
    flow: Attachments
    guest: TestDomain | QemuGuest
    #: Make the VM end as its backend means it (libvirt: powered off, then undefined).
    end: Callable[[], None]
    #: What the VMM still holds of boxvol's devices besides the devices (QMP: chardevs).
    leftovers: Callable[[], list[str]]


@pytest.fixture(params=["libvirt", "qmp"])
def target(
    request: pytest.FixtureRequest,
    guest_image: GuestImage,
    workdir: Path,
    boxvold: Daemon,
    client: Client,
) -> Iterator[Target]:
    if request.param == "libvirt":
        domain = request.getfixturevalue("domains").define(script=SCRIPT, timeout=300)
        with LibvirtDriver(client, URI) as driver:
            driver.prepare(domain.name)
            domain.start()

            def undefine() -> None:
                domain.wait_stopped()
                domain.dom.undefine()

            yield Target(domain.name, URI, driver, domain, undefine, list)
        return
    guest = QemuGuest(guest_image, workdir, script=SCRIPT)
    try:
        guest.start()
        with Attachments(client, QmpBackend(guest.uri)) as flow:
            yield Target(
                "vm1", guest.uri, flow, guest, guest.wait_stopped, lambda: boxvol_chardevs(guest)
            )
    finally:
        guest.stop()


def test_attach_write_readonly_unplug_and_release_at_the_end(
    target: Target, boxvold: Daemon, client: Client
) -> None:
    flow, guest = target.flow, target.guest
    watch = subprocess.Popen(
        [str(VENV_BIN / "boxvol"), "vm", "watch", "--connect", target.uri],
        env=boxvold.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        guest.wait_console("STEP: waiting")
        # 1: a named volume, read-write: the guest writes, the file is on the host, and the
        # record is in boxvold.
        [att] = flow.attach(target.name, ["data:/mnt"])
        assert (att.tag, att.live) == ("bv-data", True)
        vm = flow.backend.lookup(target.name)
        consumer = client.get_export(att.export_id or "")["consumer"]
        assert (consumer["backend"], consumer["instance"]) == (target.uri, vm.instance)
        assert consumer["guest_path"] == "/mnt"
        assert [a.tag for a in flow.list_attachments(target.name)] == ["bv-data"]
        guest.wait_console("STEP: unmounted1")
        host = boxvold.home / "volumes" / "named" / "data"
        assert (host / "hello.txt").read_text() == "hello\n"
        # Hot-unplug leaves no device, no chardev, no export and no virtiofsd.
        flow.detach(target.name, ["/mnt"])
        guest.wait_console("STEP: gone1")
        assert flow.backend.devices(vm) == []
        assert target.leftovers() == []
        assert client.list_exports() == []
        assert not virtiofsd_serving(host)
        assert flow.list_attachments(target.name) == []

        # 2: read-only holds after the guest remounts read-write.
        flow.attach(target.name, ["data:/mnt:ro"])
        guest.wait_console("STEP: unmounted2")
        assert "STEP: ro-held" in guest.console()
        assert not (host / "evil.txt").exists()
        flow.detach(target.name, ["bv-data"])
        guest.wait_console("STEP: gone2")

        # 3: an anonymous volume goes when its VM ends: the watcher releases it.
        [anon] = flow.attach(target.name, ["/scratch"])
        assert anon.volume is not None
        volume = client.get_volume(anon.volume.id)
        assert volume["consumer"] == anonymous_consumer(target.uri, vm.instance)
        guest.wait_console("STEP: anon-seen")
        target.end()
        deadline = time.monotonic() + GUEST_TIMEOUT
        while client.list_exports() or any(v["id"] == volume["id"] for v in client.list_volumes()):
            assert watch.poll() is None, watch.communicate()
            assert time.monotonic() < deadline, f"the watcher did not release {target.name}"
            time.sleep(0.1)
        assert [v["name"] for v in client.list_volumes()] == ["data"]
    finally:
        watch.terminate()
        out, err = watch.communicate(timeout=30)
    assert watch.returncode == 0, err
    released = rf"^{re.escape(target.name)} \w+: released 1 export\(s\), removed 1 anonymous"
    assert re.search(released, out, re.MULTILINE), (out, err)


@pytest.mark.parametrize(
    ("qemu", "needle"),
    [({"shared_memory": False}, "memory-backend-memfd"), ({"root_ports": 0}, "pcie-root-port")],
)
def test_qemu_that_cannot_take_a_share_is_refused_and_nothing_made(
    guest_image: GuestImage,
    workdir: Path,
    boxvold: Daemon,
    client: Client,
    qemu: dict[str, Any],
    needle: str,
) -> None:
    guest = QemuGuest(guest_image, workdir, script="sleep 300\n", **qemu)
    try:
        guest.start()
        with (
            Attachments(client, QmpBackend(guest.uri)) as flow,
            pytest.raises(DomainNotPrepared, match=needle),
        ):
            flow.attach("vm1", ["data:/mnt", "/scratch"])
        assert client.list_volumes() == [] and client.list_exports() == []
        assert boxvol_chardevs(guest) == []
        peripherals = qmp(guest, "qom-list", path="/machine/peripheral")
        assert [e["name"] for e in peripherals if "vhost-user-fs" in e["type"]] == []
    finally:
        guest.stop()


def test_qemu_refusal_names_the_vm_and_leaves_nothing(
    guest_image: GuestImage, workdir: Path
) -> None:
    guest = QemuGuest(guest_image, workdir, script="sleep 300\n")
    try:
        guest.start()
        backend = QmpBackend(guest.uri)
        vm = backend.lookup("vm1")
        device = NewDevice("bv-x", "ua-boxvol-bv-x", str(workdir / "no-such.sock"))
        with pytest.raises(QmpCommandError, match=rf"^QEMU VM vm1 \({re.escape(guest.uri)}\): "):
            backend.add_device(vm, device, Scope(live=True, config=False))
        assert boxvol_chardevs(guest) == [] and backend.devices(vm) == []
    finally:
        guest.stop()
