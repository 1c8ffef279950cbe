"""boxvold as a system service under a real systemd (PID 1 in a container made for the test),
installed the way docs/operator.md says: notify readiness, socket activation, mounts a
host-namespace process uses, a restart that keeps what is in use, a stop that leaves
nothing, the API socket's group, and the VM watcher beside libvirtd."""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest.build import build_guest, default_out_dir
from tests.helpers import wait_for
from tests.systemd.helpers import Container, wheelhouse
from tests.vm.helpers import QemuGuest
from volumed.vhost import connected_at


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    """One booted container with boxvol installed and boxvold.socket enabled."""
    wheels = wheelhouse(tmp_path_factory.mktemp("wheels"))
    made = Container(tmp_path_factory.mktemp("container"), wheels)
    try:
        made.boot()
        made.install_boxvol()
        yield made
    finally:
        made.shutdown()


def boxvol(container: Container, *args: str, check: bool = True) -> str:
    return container.run("boxvol", *args, check=check).stdout


def host_process(container: Container, script: str) -> str:
    """``script`` run by systemd as a unit of its own, in the host's (PID 1's) namespaces:
    not boxvold's unit, nothing of its sandbox."""
    return container.run(
        "systemd-run", "--wait", "--pipe", "--quiet", "sh", "-c", script, timeout=120
    ).stdout


def mounts_of_boxvol(container: Container) -> list[str]:
    """FUSE and ext4 mounts under boxvol's directories, as PID 1 sees them."""
    table = container.run("cat", "/proc/1/mountinfo").stdout
    return [
        line.split()[4]
        for line in table.splitlines()
        if line.split()[4].startswith(("/run/boxvol/", "/var/lib/boxvol/"))
    ]


def vmm_connected(container: Container, socket_path: str, pid: int = 1) -> bool:
    """True once a connected socket bound to ``socket_path`` shows in the unix socket table
    of ``pid``'s network namespace (a connection's accepted end lives in the client's)."""
    return connected_at(container.run("cat", f"/proc/{pid}/net/unix").stdout, socket_path)


def boxvol_processes(container: Container) -> list[str]:
    out = container.sh("ps -eo args | grep -E 'volumed.fs.server|virtiofsd' | grep -v grep || true")
    return out.stdout.split("\n")[:-1]


def test_start_is_active_only_once_the_api_answers(container: Container) -> None:
    container.run("systemctl", "stop", "boxvold.service")
    assert (
        container.run("systemctl", "show", "-P", "Type", "boxvold.service").stdout.strip()
        == "notify"
    )
    container.run("systemctl", "start", "boxvold.service")  # returns at READY=1
    # No retry: the API answers the moment start returned.
    assert "boxvold" in boxvol(container, "version")
    assert container.run("systemctl", "is-active", "boxvold.service").stdout.strip() == "active"
    owner = container.run("stat", "-c", "%U:%G %a", "/run/boxvol/boxvold.sock").stdout.strip()
    assert owner == "root:boxvol 660"


def test_a_host_process_uses_an_export_and_a_sized_volume(container: Container) -> None:
    boxvol(container, "create", "shared", "--size", "32M")
    export_id, mountpoint = boxvol(container, "export", "create", "shared").split()
    quoted = shlex.quote(mountpoint)
    assert host_process(container, f"echo through-the-view > {quoted}/f && cat {quoted}/f") == (
        "through-the-view\n"
    )
    volume = "/var/lib/boxvol/volumes/named/shared"
    assert host_process(container, f"cat {volume}/f") == "through-the-view\n"
    assert host_process(container, f"df -k --output=size {volume} | tail -n 1").strip()
    assert mountpoint in mounts_of_boxvol(container) and volume in mounts_of_boxvol(container)
    boxvol(container, "export", "rm", export_id)
    boxvol(container, "rm", "shared")


def test_the_first_client_starts_boxvold(container: Container) -> None:
    container.run("systemctl", "stop", "boxvold.service")
    assert container.run("systemctl", "is-active", "boxvold.socket").stdout.strip() == "active"
    assert (
        container.run("systemctl", "is-active", "boxvold.service", check=False).stdout.strip()
        == "inactive"
    )
    assert boxvol(container, "ls", "-q") == ""  # started by this very request
    assert container.run("systemctl", "is-active", "boxvold.service").stdout.strip() == "active"
    assert "api socket inherited from systemd" in container.journal("boxvold.service")


def test_a_restart_keeps_an_export_in_use_and_loses_no_byte(container: Container) -> None:
    boxvol(container, "create", "busy")
    export_id, mountpoint = boxvol(container, "export", "create", "busy").split()
    server = json.loads(boxvol(container, "export", "inspect", export_id))[0]["server"]["pid"]
    # A writer in its own unit: a line every 20 ms through a file it holds open.
    container.run(
        "systemd-run",
        "--unit=writer",
        "--quiet",
        "sh",
        "-c",
        f"exec 3>>{shlex.quote(mountpoint)}/log; i=0; "
        "while [ $i -lt 100000 ]; do echo $i >&3 || exit 7; i=$((i+1)); sleep 0.02; done",
    )
    log = f"{shlex.quote(mountpoint)}/log"

    def written() -> int:
        return len(host_process(container, f"cat {log} 2>/dev/null || true").split())

    wait_for("the writer's first lines", lambda: written() >= 20)
    container.run("systemctl", "restart", "boxvold.service")
    inspected = json.loads(boxvol(container, "export", "inspect", export_id))[0]
    assert inspected["server"]["pid"] == server  # the same server, re-adopted
    assert "export left serving at stop" in container.journal("boxvold.service")
    before = written()
    wait_for("lines written after the restart", lambda: written() >= before + 20)
    container.run("systemctl", "stop", "writer")
    lines = host_process(container, f"cat {log}").split()
    assert lines == [str(i) for i in range(len(lines))]  # no gap, nothing failed
    boxvol(container, "export", "rm", export_id)
    boxvol(container, "rm", "busy")


def test_a_stop_leaves_nothing_unless_in_use(container: Container) -> None:
    boxvol(container, "create", "idle", "--size", "16M")
    boxvol(container, "create", "held")
    boxvol(container, "export", "create", "idle")
    _, held_at = boxvol(container, "export", "create", "held").split()
    container.run(
        "systemd-run",
        "--unit=holder",
        "--quiet",
        "sh",
        "-c",
        f"cd {shlex.quote(held_at)} && exec sleep 600",
    )
    container.run("systemctl", "stop", "boxvold.service")
    assert mounts_of_boxvol(container) == [held_at]  # in use: kept, and reported
    assert "export left serving at stop" in container.journal("boxvold.service")
    container.run("systemctl", "stop", "holder")
    boxvol(container, "ls")  # started again (socket activation); adopts the kept one
    for export in json.loads(boxvol(container, "export", "ls", "--format", "json")):
        boxvol(container, "export", "rm", export["id"])
    boxvol(container, "rm", "idle", "held")
    boxvol(container, "create", "again", "--size", "16M")
    boxvol(container, "export", "create", "again")
    container.run("systemctl", "stop", "boxvold.service")
    assert mounts_of_boxvol(container) == []
    assert boxvol_processes(container) == []
    boxvol(container, "ls")
    for export in json.loads(boxvol(container, "export", "ls", "--format", "json")):
        boxvol(container, "export", "rm", export["id"])
    boxvol(container, "rm", "again")


def test_only_root_and_the_boxvol_group_reach_the_api(container: Container) -> None:
    container.sh("id outsider >/dev/null 2>&1 || useradd -M outsider")
    container.sh("id member >/dev/null 2>&1 || useradd -M -G boxvol member")
    outside = container.run(
        "setpriv",
        "--reuid=outsider",
        "--regid=outsider",
        "--init-groups",
        "boxvol",
        "ls",
        check=False,
    )
    assert outside.returncode == 1
    assert "permission denied" in outside.stderr and "group 'boxvol'" in outside.stderr
    inside = container.run(
        "setpriv",
        "--reuid=member",
        "--regid=member",
        "--init-groups",
        "boxvol",
        "ls",
        "-q",
        check=False,
    )
    assert inside.returncode == 0, inside.stderr


def test_the_vm_watcher_runs_after_libvirtd_and_outlives_its_restart(container: Container) -> None:
    container.run("systemctl", "start", "libvirtd.service")
    container.run("systemctl", "start", "boxvol-vmwatch.service")
    after = container.run("systemctl", "show", "-P", "After", "boxvol-vmwatch.service").stdout
    assert "libvirtd.service" in after and "boxvold.service" in after
    watcher = int(container.run("systemctl", "show", "-P", "MainPID", "boxvol-vmwatch").stdout)
    wait_for(
        "the watcher's libvirt connection",
        lambda: vmm_connected(container, "/run/libvirt/libvirt-sock", watcher),
    )
    container.run("systemctl", "restart", "libvirtd.service")
    # It notices the lost connection and reconnects, in the same process.
    wait_for(
        "the watcher's reconnection",
        lambda: "reconnected to libvirt" in container.journal("boxvol-vmwatch.service"),
        detail=lambda: container.journal("boxvol-vmwatch.service"),
    )
    assert (
        container.run("systemctl", "is-active", "boxvol-vmwatch.service").stdout.strip() == "active"
    )
    restarts = container.run("systemctl", "show", "-P", "NRestarts", "boxvol-vmwatch.service")
    assert restarts.stdout.strip() == "0", container.journal("boxvol-vmwatch.service")


def test_a_restart_keeps_a_virtiofs_share_a_vmm_is_connected_to(container: Container) -> None:
    """A direct virtio-fs share with its VMM connected (a process standing in for QEMU's
    vhost-user connection: no guest boots in this container) keeps its virtiofsd through
    `systemctl restart`; the next boxvold re-adopts it."""
    boxvol(container, "create", "vmdata")
    container.run("systemctl", "start", "boxvold.service")
    # boxvol's own client (the CLI exports virtio-fs through `boxvol vm attach` only).
    export = container.run(
        "/opt/boxvol/bin/python",
        "-c",
        "import json; from volumed.client import Client\n"
        "print(json.dumps(Client('/run/boxvol/boxvold.sock').create_export("
        "'vmdata', kind='virtiofs', consumer={'vm': 'vm1', 'tag': 'data'})))",
    ).stdout
    created = json.loads(export)
    socket_path, export_id = created["socket"], created["id"]
    virtiofsd = created["virtiofsd"]["pid"]
    container.run(
        "systemd-run",
        "--unit=vmm",
        "--quiet",
        "python3",
        "-c",
        "import socket, time\n"
        f"s = socket.socket(socket.AF_UNIX); s.connect({socket_path!r}); time.sleep(600)",
    )
    wait_for("the VMM's connection", lambda: vmm_connected(container, socket_path))
    container.run("systemctl", "restart", "boxvold.service")
    inspected = json.loads(boxvol(container, "export", "inspect", export_id))[0]
    assert inspected["virtiofsd"]["pid"] == virtiofsd  # the same virtiofsd, re-adopted
    assert "reason=a VMM is connected" in container.journal("boxvold.service")
    container.run("systemctl", "stop", "vmm")
    boxvol(container, "export", "rm", export_id)
    boxvol(container, "rm", "vmdata")


#: Writes a numbered line every 50 ms (synced) to its share until the host says stop.
GUEST_WRITER = """\
i=0
while [ ! -e /data/stop ]; do
  echo $i >> /data/log && sync || { echo "WRITE FAILED at $i"; exit 1; }
  i=$((i+1))
  sleep 0.05
done
echo "WROTE: $i"
"""


def test_a_restart_keeps_a_real_guests_direct_share_and_loses_no_byte(
    container: Container, tmp_path: Path
) -> None:
    """A TCG guest (QEMU on the host, connected to the container's vhost-user socket through
    /proc/PID/root) writes through a direct virtio-fs share while `systemctl restart boxvold`
    runs: its virtiofsd is kept and re-adopted, and every line arrives."""
    boxvol(container, "create", "guestdata")
    created = json.loads(
        container.run(
            "/opt/boxvol/bin/python",
            "-c",
            "import json; from volumed.client import Client\n"
            "print(json.dumps(Client('/run/boxvol/boxvold.sock').create_export("
            "'guestdata', kind='virtiofs', consumer={'vm': 'guest1', 'tag': 'data'})))",
        ).stdout
    )
    virtiofsd = created["virtiofsd"]["pid"]
    host_socket = f"/proc/{container.init_pid}/root{created['socket']}"
    guest = QemuGuest(build_guest(default_out_dir()), tmp_path, script=GUEST_WRITER)
    append = guest.command.index("-append") + 1
    guest.command[append] += " boxvol.mount=data:/data"
    guest.command += [
        "-chardev",
        f"socket,id=fs0,path={host_socket}",
        "-device",
        "vhost-user-fs-pci,chardev=fs0,tag=data,bus=rp1",
    ]
    volume_log = "/var/lib/boxvol/volumes/named/guestdata/log"
    guest.start()
    try:

        def lines() -> list[str]:
            return container.run("cat", volume_log, check=False).stdout.split()

        deadline = time.monotonic() + 120
        while len(lines()) < 20:
            assert time.monotonic() < deadline, guest.console()[-3000:]
            time.sleep(0.5)
        container.run("systemctl", "restart", "boxvold.service")
        inspected = json.loads(boxvol(container, "export", "inspect", created["id"]))[0]
        assert inspected["virtiofsd"]["pid"] == virtiofsd  # kept through the restart
        before = len(lines())
        while len(lines()) < before + 20:  # still writing after it
            assert time.monotonic() < deadline + 120, guest.console()[-3000:]
            time.sleep(0.5)
        container.run("touch", "/var/lib/boxvol/volumes/named/guestdata/stop")
        guest.wait_stopped()
    finally:
        guest.stop()
    [wrote] = [
        line.split("WROTE: ")[1] for line in guest.console().splitlines() if "WROTE: " in line
    ]
    assert lines() == [str(i) for i in range(int(wrote))]  # no line lost, none failed
    boxvol(container, "export", "rm", created["id"])
    boxvol(container, "rm", "guestdata")
