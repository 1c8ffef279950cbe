"""boxvold killed (SIGKILL) while a real guest uses one of its shares, then started again.

A direct share keeps serving the guest through the crash and its virtiofsd is re-adopted. A
via=fuse share loses its source with the crash: a connected guest gets errors (not a hang),
boxvold reports ``source_lost``, and the domain's next boot writes through a fresh virtiofsd
on the new FUSE view; with no guest connected, the stale virtiofsd is replaced at once. All
end with no virtiofsd, QEMU or FUSE mount left behind.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from tests.helpers import Daemon, wait_for
from tests.vm.helpers import Domains, alive, qemu_for, volume_dir
from vmdriver.backends.libvirt import LibvirtDriver
from volumed.client import Client

#: Writes, waits for the host's go (a file in the volume), writes again, powers off.
KEEPS_WRITING = """\
echo ready > /data/before.txt && sync
echo "STEP: mounted"
while [ ! -e /data/go ]; do sleep 0.2; done
echo after > /data/after.txt && sync
echo "STEP: wrote after"
"""

#: First boot: writes, then reports each change in whether the share answers. A later boot
#: (the host leaves ``second-boot`` in the volume) writes once and powers off.
PROBES = """\
if [ -e /data/second-boot ]; then
  echo again > /data/again.txt && sync && echo "STEP: wrote again"
  exit 0
fi
echo ready > /data/before.txt && sync
echo "STEP: mounted"
last=
n=0
while true; do
  n=$((n+1))
  if ls /data > /dev/null 2>&1 && echo $n > /data/probe.txt 2>/dev/null
  then r=ok; else r=failed; fi
  if [ "$r" != "$last" ]; then echo "PROBE: $r"; last=$r; fi
  sleep 0.3
done
"""


WRITES_ONCE = """\
set -e
echo booted > /data/after-crash.txt && sync
"""


def fuse_mounts(runtime_dir: Path) -> list[str]:
    """Mount points of boxvold's FUSE exports under ``runtime_dir`` (dead ones included)."""
    with open("/proc/self/mounts") as mounts:
        return [
            fields[1]
            for fields in (line.split() for line in mounts)
            if fields[1].startswith(str(runtime_dir)) and fields[2].startswith("fuse")
        ]


def crash_and_restart(boxvold: Daemon) -> int:
    """SIGKILL boxvold, start it again; the log offset where the new process begins."""
    assert boxvold.stop(signal.SIGKILL) == -signal.SIGKILL
    offset = boxvold.log_offset()
    boxvold.start()
    return offset


def virtiofsd_of(client: Client, export_id: str) -> dict[str, Any]:
    info: dict[str, Any] = client.get_export(export_id)["virtiofsd"]
    return info


def test_direct_share_survives_a_boxvold_crash(
    driver: LibvirtDriver, domains: Domains, boxvold: Daemon, client: Client
) -> None:
    guest = domains.define(script=KEEPS_WRITING, timeout=0)
    driver.prepare(guest.name)
    [att] = driver.attach(guest.name, ["crashy:/data"])
    export_id = att.export_id or ""
    guest.start()
    guest.wait_console("STEP: mounted")
    host = volume_dir(boxvold, client.get_volume("crashy"))
    serving = virtiofsd_of(client, export_id)["pid"]
    assert serving and alive(serving)

    offset = crash_and_restart(boxvold)
    assert alive(serving), "the direct virtiofsd died with boxvold"
    info = virtiofsd_of(client, export_id)
    assert info["pid"] == serving and not info["source_lost"], info
    assert f"virtiofsd re-adopted export={export_id} pid={serving}" in boxvold.log_since(offset)
    # A direct share has no FUSE view: no mount at all, and none left behind.
    assert fuse_mounts(boxvold.runtime_dir) == []

    # The guest goes on writing through the virtiofsd that outlived the crash.
    (host / "go").touch()
    guest.wait_console("STEP: wrote after")
    guest.wait_stopped()
    guest.check_done()
    assert (host / "after.txt").read_text() == "after\n"

    # Its session over, the re-adopted virtiofsd exits and a fresh one is armed.
    def rearmed() -> int | None:
        pid: int | None = virtiofsd_of(client, export_id)["pid"]
        return pid if pid and pid != serving else None

    fresh = wait_for("a fresh virtiofsd after the adopted one", rearmed)
    assert alive(fresh) and not alive(serving)
    [detached] = driver.detach(guest.name, ["/data"])
    assert detached.export_id == export_id and client.list_exports() == []
    wait_for("the fresh virtiofsd to stop", lambda: not alive(fresh))


def test_via_fuse_share_keeps_serving_through_a_boxvold_crash(
    driver: LibvirtDriver, domains: Domains, boxvold: Daemon, client: Client
) -> None:
    """The FUSE view's server and the virtiofsd on it outlive a SIGKILLed boxvold; the next
    boxvold re-adopts both, and the guest's I/O never fails."""
    guest = domains.define(script=PROBES, timeout=0)
    driver.prepare(guest.name)
    [att] = driver.attach(guest.name, ["stacked:/data"], via="fuse")
    export_id = att.export_id or ""
    guest.start()
    guest.wait_console("PROBE: ok")
    host = volume_dir(boxvold, client.get_volume("stacked"))
    assert (host / "before.txt").read_text() == "ready\n"
    serving = virtiofsd_of(client, export_id)["pid"]
    server = client.get_export(export_id)["server"]["pid"]

    offset = crash_and_restart(boxvold)
    info = virtiofsd_of(client, export_id)
    assert info["pid"] == serving and info["source_lost"] is False, info
    assert client.get_export(export_id)["server"]["pid"] == server
    logged = boxvold.log_since(offset)
    assert f"export server re-adopted export={export_id} pid={server}" in logged, logged
    assert f"virtiofsd re-adopted export={export_id} pid={serving}" in logged, logged
    assert fuse_mounts(boxvold.runtime_dir) == [str(boxvold.runtime_dir / "fs" / export_id)]

    # The guest goes on writing through the same virtiofsd and the same server.
    count = int((host / "probe.txt").read_text())
    wait_for(
        "the guest to write through the re-adopted share",
        lambda: int((host / "probe.txt").read_text() or 0) > count + 3,
    )
    assert "PROBE: failed" not in guest.console()
    guest.dom.destroy()
    wait_for("QEMU to exit", lambda: not qemu_for(guest.name))
    [detached] = driver.detach(guest.name, ["/data"])
    assert detached.export_id == export_id and client.list_exports() == []
    wait_for("the virtiofsd to stop", lambda: not alive(serving))
    assert not alive(server)


def test_a_stopped_domains_via_fuse_share_serves_its_next_boot_after_a_crash(
    driver: LibvirtDriver, domains: Domains, boxvold: Daemon, client: Client
) -> None:
    # No guest connected at the crash: the FUSE view survives it (its server is re-adopted),
    # and so does the virtiofsd on it, which the next boot connects to.
    guest = domains.define(script=WRITES_ONCE)
    driver.prepare(guest.name)
    [att] = driver.attach(guest.name, ["idle:/data"], via="fuse")
    export = client.get_export(att.export_id or "")
    armed = export["virtiofsd"]["pid"]
    ready = Path(export["socket"]).with_suffix(".log")
    wait_for("virtiofsd to be ready", lambda: "Waiting for vhost-user" in ready.read_text())

    crash_and_restart(boxvold)
    info = virtiofsd_of(client, export["id"])
    assert info["pid"] == armed and not info["source_lost"], info

    guest.start()
    guest.wait_stopped()
    guest.check_done()
    host = volume_dir(boxvold, client.get_volume("idle"))
    assert (host / "after-crash.txt").read_text() == "booted\n"
    [detached] = driver.detach(guest.name, ["/data"])
    assert detached.export_id == export["id"] and client.list_exports() == []
