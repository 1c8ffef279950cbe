"""The Cloud Hypervisor backend through the attach workflow, against the API simulator
(tests/ch_simulator.py: no Cloud Hypervisor can be installed here) and a real boxvold with
real virtiofsd (the simulator connects to each vhost-user socket, as the real one does)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO, VENV_BIN, Daemon
from vmdriver.attachments import Attachments, anonymous_consumer
from vmdriver.backends.base import NewDevice
from vmdriver.backends.cloud_hypervisor import ChApiError, CloudHypervisorBackend
from vmdriver.driver import DeviceRemovalTimeout, DomainNotFound, DomainNotPrepared, Scope
from volumed.client import Client
from volumed.errors import Conflict, HostPathRefused


class Simulator:
    """One simulated Cloud Hypervisor process and its API socket."""

    def __init__(self, socket_path: Path, *options: str) -> None:
        self.socket = socket_path
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "tests" / "ch_simulator.py"),
                "--api-socket",
                str(socket_path),
                *options,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not socket_path.exists():
            assert self.process.poll() is None, "the simulator exited"
            assert time.monotonic() < deadline, "the simulator made no socket"
            time.sleep(0.02)

    @property
    def uri(self) -> str:
        return f"ch://{self.socket}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture
def simulators(runtime_dir: Path) -> Iterator[Callable[..., Simulator]]:
    made: list[Simulator] = []

    def start(*options: str) -> Simulator:
        sim = Simulator(runtime_dir / f"ch-{len(made)}.sock", *options)
        made.append(sim)
        return sim

    yield start
    for sim in made:
        sim.stop()


def workflow(client: Client, sim: Simulator, tmp_path: Path) -> Attachments:
    return Attachments(client, CloudHypervisorBackend(sim.uri), lock_dir=str(tmp_path / "locks"))


def test_attach_list_detach_and_release_on_end(
    client: Client, simulators: Callable[..., Simulator], tmp_path: Path
) -> None:
    sim = simulators("--shared-memory")
    flow = workflow(client, sim, tmp_path)
    made = flow.attach("vm1", ["data:/data", "/scratch:ro"])
    assert [(a.tag, a.live, a.config) for a in made] == [
        ("bv-data", True, False),
        (made[1].tag, True, False),
    ]
    assert [a.guest_path for a in flow.list_attachments("vm1")] == ["/data", "/scratch"]
    backend = CloudHypervisorBackend(sim.uri)
    vm = backend.lookup("vm1")
    assert sorted(d.tag for d in backend.devices(vm)) == sorted(a.tag for a in made)
    # Detach: the device leaves the VM's configuration first, then the export goes.
    [detached] = flow.detach("vm1", ["/data"])
    assert detached.tag == "bv-data"
    assert [d.tag for d in backend.devices(vm)] == [made[1].tag]
    assert [e["consumer"]["tag"] for e in client.list_exports()] == [made[1].tag]
    # A duplicate device id is a conflict, mapped from the API's 409.
    export = client.list_exports()[0]
    with pytest.raises(Conflict, match="HTTP 409"):
        backend.add_device(
            vm,
            NewDevice(made[1].tag, made[1].alias or "", str(export["socket"])),
            Scope(live=True, config=False),
        )
    # The process ends: its records and its anonymous volume are released; "data" stays.
    anon = made[1].volume
    assert anon is not None
    assert client.get_volume(anon.id)["consumer"] == anonymous_consumer(sim.uri, vm.instance)
    sim.stop()
    [event] = flow.reconcile()
    assert event.released is not None and event.released.volumes == (anon.id,)
    assert client.list_exports() == []
    assert [v["name"] for v in client.list_volumes()] == ["data"]


def test_refusals_change_nothing(
    client: Client, simulators: Callable[..., Simulator], tmp_path: Path
) -> None:
    unshared = simulators()
    with pytest.raises(DomainNotPrepared, match="shared=on"):
        workflow(client, unshared, tmp_path).attach("vm1", ["data:/data", "/scratch"])
    not_created = simulators("--shared-memory", "--not-created")
    with pytest.raises(DomainNotFound, match="no VM created"):
        workflow(client, not_created, tmp_path).attach("vm1", ["data:/data"])
    with pytest.raises(HostPathRefused):
        workflow(client, unshared, tmp_path).attach("vm1", ["/etc:/data"])
    assert client.list_volumes() == [] and client.list_exports() == []


def test_a_guest_that_does_not_eject_keeps_its_export(
    client: Client, simulators: Callable[..., Simulator], tmp_path: Path
) -> None:
    sim = simulators("--shared-memory", "--never-eject")
    flow = workflow(client, sim, tmp_path)
    flow.attach("vm1", ["data:/data"])
    with pytest.raises(DeviceRemovalTimeout, match="keeps running"):
        flow.detach("vm1", ["/data"], timeout=1)
    assert len(client.list_exports()) == 1


def test_cli_names_the_schemes_and_reaches_the_backend(
    daemon: Daemon, simulators: Callable[..., Simulator]
) -> None:
    help_text = subprocess.run(
        [str(VENV_BIN / "boxvol"), "vm", "attach", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for example in ("qemu:///system", "qmp:///", "ch:///"):
        assert example in help_text
    sim = simulators("--shared-memory")
    done = subprocess.run(
        [str(VENV_BIN / "boxvol"), "vm", "attach", "--connect", sim.uri, "vm1", "-v", "data:/d"],
        capture_output=True,
        text=True,
        env=daemon.env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    listed = subprocess.run(
        [str(VENV_BIN / "boxvol"), "vm", "ls", "--connect", sim.uri, "vm1", "-q"],
        capture_output=True,
        text=True,
        env=daemon.env,
        check=False,
    )
    assert listed.stdout.split() == ["bv-data"], listed.stderr


def test_watch_over_two_uris_releases_only_the_vm_that_ended(
    daemon: Daemon, client: Client, simulators: Callable[..., Simulator], tmp_path: Path
) -> None:
    """Two VMs called "vm" on two Cloud Hypervisor sockets, one watcher for both: when one
    ends, only its exports and anonymous volume go."""
    first, second = simulators("--shared-memory"), simulators("--shared-memory")
    workflow(client, first, tmp_path).attach("vm", ["/scratch"])
    [kept] = workflow(client, second, tmp_path).attach("vm", ["/scratch"])
    watch = subprocess.Popen(
        [str(VENV_BIN / "boxvol"), "vm", "watch", "--connect", first.uri, "--connect", second.uri],
        env=daemon.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Whether the watcher sees the end as it happens or at its start-up reconcile, the
        # outcome is the same; the report says which ("stopped" or "gone").
        first.stop()
        deadline = time.monotonic() + 60
        while len(client.list_exports()) > 1 or len(client.list_volumes()) > 1:
            assert watch.poll() is None, watch.communicate()
            assert time.monotonic() < deadline, "the watcher did not release the first vm"
            time.sleep(0.1)
        [left] = client.list_exports()
        assert left["consumer"]["backend"] == second.uri
        assert kept.volume is not None
        assert [v["id"] for v in client.list_volumes()] == [kept.volume.id]
    finally:
        watch.terminate()
        out, err = watch.communicate(timeout=30)
    assert watch.returncode == 0, err
    assert re.fullmatch(
        r"vm (stopped|gone): released 1 export\(s\), removed 1 anonymous volume\(s\)\n", out
    ), (out, err)


def test_a_refused_device_rolls_the_attach_back(
    client: Client, simulators: Callable[..., Simulator], tmp_path: Path
) -> None:
    """The second add-fs fails (500): the first device is removed again (after the guest
    ejected it), then its export, then both anonymous volumes; nothing is left."""
    sim = simulators("--shared-memory", "--fail-add-after", "1")
    flow = workflow(client, sim, tmp_path)
    with pytest.raises(ChApiError, match="HTTP 500"):
        flow.attach("vm1", ["/a", "/b"])
    backend = CloudHypervisorBackend(sim.uri)
    assert backend.devices(backend.lookup("vm1")) == []
    assert client.list_exports() == [] and client.list_volumes() == []
