"""QEMU over QMP for real: a QEMU process the test starts itself (q35, TCG, memfd shared
memory, free pcie-root-ports, a QMP socket; no libvirt), the attach workflow
(``vmdriver.attachments``) over ``vmdriver.backends.qmp``, and a booted guest that mounts
what is hot-plugged."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from guest.build import GuestImage
from tests.helpers import VENV_BIN, Daemon
from tests.vm.helpers import GUEST_TIMEOUT, QemuGuest, virtiofsd_serving
from vmdriver.attachments import Attachments, anonymous_consumer
from vmdriver.backends.qmp import QmpBackend, chardev_id
from vmdriver.driver import DomainNotPrepared
from vmdriver.qmp import QmpConnection
from volumed.client import Client

SCRIPT = """\
devs() { ls /sys/bus/virtio/drivers/virtiofs/ 2>/dev/null | grep -c '^virtio'; }
wait_mount() {
    i=0
    until mount -t virtiofs bv-data /mnt 2>/dev/null; do
        i=$((i+1)); [ $i -gt 3000 ] && { echo "STEP: no-tag"; exit 3; }; sleep 0.1
    done
}
wait_gone() {
    i=0
    while [ "$(devs)" != 0 ]; do
        i=$((i+1)); [ $i -gt 3000 ] && { echo "STEP: still-there"; exit 4; }; sleep 0.1
    done
}
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


@pytest.fixture
def qemu_guests(guest_image: GuestImage, workdir: Path) -> Iterator[list[QemuGuest]]:
    """QEMU processes of the test; killed at the end whatever happened."""
    made: list[QemuGuest] = []
    yield made
    for guest in made:
        guest.stop()


def qmp(guest: QemuGuest, command: str, **arguments: Any) -> Any:
    """One QMP command on the guest's socket, from the test's own session."""
    import trio

    async def run() -> Any:
        async with QmpConnection.open(str(guest.qmp_socket)) as session:
            return await session.execute(command, arguments or None)

    return trio.run(run)


def chardevs(guest: QemuGuest) -> list[str]:
    return [c["label"] for c in qmp(guest, "query-chardev")]


def peripherals(guest: QemuGuest) -> list[str]:
    return [e["name"] for e in qmp(guest, "qom-list", path="/machine/peripheral")]


def test_attach_write_readonly_unplug_and_release_on_end(
    qemu_guests: list[QemuGuest],
    guest_image: GuestImage,
    workdir: Path,
    boxvold: Daemon,
    client: Client,
) -> None:
    guest = QemuGuest(guest_image, workdir, script=SCRIPT)
    qemu_guests.append(guest)
    guest.start()
    watch = subprocess.Popen(
        [str(VENV_BIN / "boxvol"), "vm", "watch", "--connect", guest.uri],
        env=boxvold.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with Attachments(client, QmpBackend(guest.uri)) as workflow:
            guest.wait_console("STEP: waiting")
            # 1: a named volume, read-write; the guest writes, the file is on the host.
            [att] = workflow.attach("vm1", ["data:/mnt"])
            assert (att.tag, att.live, att.config) == ("bv-data", True, False)
            export = client.get_export(att.export_id or "")
            assert export["consumer"]["backend"] == guest.uri
            assert export["consumer"]["guest_path"] == "/mnt"
            assert [a.tag for a in workflow.list_attachments("vm1")] == ["bv-data"]
            guest.wait_console("STEP: unmounted1")
            volume = client.get_volume("data")
            host = boxvold.home / "volumes" / "named" / "data"
            assert (host / "hello.txt").read_text() == "hello\n"
            # Hot-unplug: no device, no chardev, no virtiofsd left.
            workflow.detach("vm1", ["/mnt"])
            guest.wait_console("STEP: gone1")
            assert att.alias not in peripherals(guest)
            assert chardev_id(att.alias or "") not in chardevs(guest)
            assert client.list_exports() == []
            assert not virtiofsd_serving(host)
            assert workflow.list_attachments("vm1") == []

            # 2: read-only holds after the guest remounts read-write.
            workflow.attach("vm1", ["data:/mnt:ro"])
            guest.wait_console("STEP: unmounted2")
            assert "STEP: ro-held" in guest.console()
            assert not (host / "evil.txt").exists()
            workflow.detach("vm1", ["bv-data"])
            guest.wait_console("STEP: gone2")

            # 3: an anonymous volume goes when its VM ends (the watcher releases it).
            [anon] = workflow.attach("vm1", ["/scratch"])
            assert anon.volume is not None
            anon_volume = client.get_volume(anon.volume.id)
            assert anon_volume["consumer"] == anonymous_consumer(
                guest.uri, workflow.backend.lookup("vm1").instance
            )
            guest.wait_stopped()
        deadline = time.monotonic() + GUEST_TIMEOUT
        while client.list_exports() or any(
            v["id"] == anon.volume.id for v in client.list_volumes()
        ):
            assert watch.poll() is None, watch.communicate()
            assert time.monotonic() < deadline, "the watcher did not release vm1's volumes"
            time.sleep(0.1)
        assert [v["name"] for v in client.list_volumes()] == [volume["name"]]
    finally:
        watch.terminate()
        out, err = watch.communicate(timeout=30)
    assert watch.returncode == 0, err
    assert "vm1 stopped: released 1 export(s), removed 1 anonymous volume(s)" in out, (out, err)


def test_qemu_without_shared_memory_or_ports_is_refused_and_nothing_made(
    qemu_guests: list[QemuGuest],
    guest_image: GuestImage,
    workdir: Path,
    boxvold: Daemon,
    client: Client,
) -> None:
    for kwargs, needle in (
        ({"shared_memory": False}, "memory-backend-memfd"),
        ({"root_ports": 0}, "pcie-root-port"),
    ):
        guest = QemuGuest(guest_image, workdir, script="sleep 300\n", **kwargs)
        qemu_guests.append(guest)
        guest.start()
        with (
            Attachments(client, QmpBackend(guest.uri)) as workflow,
            pytest.raises(DomainNotPrepared, match=needle),
        ):
            workflow.attach("vm1", ["data:/mnt", "/scratch"])
        assert client.list_volumes() == []
        assert client.list_exports() == []
        assert chardevs(guest) == [c for c in chardevs(guest) if not c.startswith("ua-boxvol")]
        guest.stop()
    assert (
        os.listdir(boxvold.runtime_dir / "vhost") == []
        if (boxvold.runtime_dir / "vhost").exists()
        else True
    )
