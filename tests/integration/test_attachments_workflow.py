"""The attach workflow (``vmdriver.attachments``) against a fake backend and a real boxvold:
every rollback path, every removal outcome, records matched by backend and instance. The
same workflow runs for real against QEMU in tests/vm/test_qmp_backend.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import pytest
import trio

from vmdriver.attachments import Attachments, anonymous_consumer
from vmdriver.backends.base import Device, NewDevice, VmRef
from vmdriver.driver import (
    DeviceRemovalFailed,
    DeviceRemovalTimeout,
    DomainNotFound,
    DomainNotPrepared,
    DomainStateConflict,
    HypervisorError,
    Scope,
)
from volumed.client import Client
from volumed.errors import HostPathRefused, InvalidArgument


@dataclasses.dataclass
class FakeVm:
    instance: str
    devices: dict[str, Device] = dataclasses.field(default_factory=dict)
    alive: bool = True
    ready: bool = True


class FakeBackend:
    """A VMM in memory: VMs by name, devices by tag, failures on demand."""

    label = "fake"
    names_vms = False

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.vms: dict[str, FakeVm] = {}
        self.fail_add_at: int | None = None
        self.removal: str = "ok"  # ok | timeout | refused
        self.added = 0
        self.calls: list[str] = []

    def lookup(self, name: str) -> VmRef:
        vm = self.vms.get(name)
        if vm is None or not vm.alive:
            raise DomainNotFound(f"no VM {name}")
        return VmRef(name, vm.instance, running=True, persistent=False)

    def instance_exists(self, instance: str) -> bool:
        return any(vm.instance == instance and vm.alive for vm in self.vms.values())

    def _vm(self, ref: VmRef) -> FakeVm:
        return self.vms[ref.name]

    def devices(self, vm: VmRef) -> list[Device]:
        return list(self._vm(vm).devices.values())

    def check_ready(self, vm: VmRef, scope: Scope, guest_paths: Sequence[str]) -> None:
        if not self._vm(vm).ready:
            raise DomainNotPrepared("no shared memory")

    def add_device(self, vm: VmRef, device: NewDevice, scope: Scope) -> None:
        self.added += 1
        if self.fail_add_at == self.added:
            raise HypervisorError("the VMM refused the device")
        self.calls.append(f"add {device.tag}")
        self._vm(vm).devices[device.tag] = Device(device.tag, device.device_id)

    def remove_device(self, vm: VmRef, device: Device, scope: Scope, timeout: float) -> None:
        if self.removal == "timeout":
            raise DeviceRemovalTimeout("the guest did not release it")
        if self.removal == "refused":
            raise DeviceRemovalFailed("the guest refused")
        self.calls.append(f"remove {device.tag}")
        self._vm(vm).devices.pop(device.tag, None)

    async def watch(
        self,
        on_ended: Callable[[str], Awaitable[object]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()
        await trio.sleep_forever()

    def close(self) -> None:
        pass


def workflow(client: Client, backend: FakeBackend, tmp_path: Path) -> Attachments:
    return Attachments(client, backend, lock_dir=str(tmp_path / "locks"))


def test_attach_list_detach_in_order(client: Client, tmp_path: Path) -> None:
    backend = FakeBackend("fake:///one")
    backend.vms["vm1"] = FakeVm("i-1")
    flow = workflow(client, backend, tmp_path)
    made = flow.attach("vm1", ["data:/data", "/scratch:ro"])
    assert [a.guest_path for a in made] == ["/data", "/scratch"]
    listed = flow.list_attachments("vm1")
    assert [(a.tag, a.live, a.guest_path) for a in listed] == [
        (made[0].tag, True, "/data"),
        (made[1].tag, True, "/scratch"),
    ]
    anon = made[1].volume
    assert anon is not None
    assert client.get_volume(anon.id)["consumer"] == anonymous_consumer("fake:///one", "i-1")
    flow.detach("vm1", ["/scratch"])
    # device first, then export, then the anonymous volume
    assert backend.calls[-1] == f"remove {made[1].tag}"
    assert [v["id"] for v in client.list_volumes()] == [made[0].volume.id]  # type: ignore[union-attr]
    assert len(client.list_exports()) == 1


def test_bad_specs_change_nothing(client: Client, tmp_path: Path) -> None:
    backend = FakeBackend("fake:///one")
    backend.vms["vm1"] = FakeVm("i-1")
    flow = workflow(client, backend, tmp_path)
    with pytest.raises(HostPathRefused):
        flow.attach("vm1", ["/etc:/data"])
    with pytest.raises(InvalidArgument):
        flow.attach("vm1", ["a:/x", "b:/x"])
    with pytest.raises(DomainStateConflict):
        flow.attach("vm1", ["a:/x"], scope=Scope(live=True, config=True))
    backend.vms["vm1"].ready = False
    with pytest.raises(DomainNotPrepared):
        flow.attach("vm1", ["a:/x"])
    assert client.list_volumes() == [] and client.list_exports() == []
    assert backend.calls == []


@pytest.mark.parametrize("failing", [1, 2])
def test_failed_attach_is_rolled_back(client: Client, tmp_path: Path, failing: int) -> None:
    backend = FakeBackend("fake:///one")
    backend.vms["vm1"] = FakeVm("i-1")
    backend.fail_add_at = failing
    flow = workflow(client, backend, tmp_path)
    with pytest.raises(HypervisorError, match="refused the device"):
        flow.attach("vm1", ["/a", "/b"])
    assert backend.vms["vm1"].devices == {}
    assert client.list_exports() == []
    assert client.list_volumes() == []


def test_rollback_keeps_what_the_guest_still_holds(client: Client, tmp_path: Path) -> None:
    backend = FakeBackend("fake:///one")
    backend.vms["vm1"] = FakeVm("i-1")
    backend.fail_add_at = 2
    backend.removal = "timeout"
    flow = workflow(client, backend, tmp_path)
    with pytest.raises(HypervisorError):
        flow.attach("vm1", ["/a", "/b"])
    # The first device could not be removed: its export and volume stay for detach.
    assert len(backend.vms["vm1"].devices) == 1
    assert len(client.list_exports()) == 1
    assert len(client.list_volumes()) == 1


@pytest.mark.parametrize(
    ("outcome", "error"), [("timeout", DeviceRemovalTimeout), ("refused", DeviceRemovalFailed)]
)
def test_detach_that_the_guest_does_not_finish_keeps_the_export(
    client: Client, tmp_path: Path, outcome: str, error: type[Exception]
) -> None:
    backend = FakeBackend("fake:///one")
    backend.vms["vm1"] = FakeVm("i-1")
    flow = workflow(client, backend, tmp_path)
    flow.attach("vm1", ["/a"])
    backend.removal = outcome
    with pytest.raises(error):
        flow.detach("vm1")
    assert len(client.list_exports()) == 1 and len(client.list_volumes()) == 1
    backend.removal = "ok"
    flow.detach("vm1")
    assert client.list_exports() == [] and client.list_volumes() == []


def test_same_name_on_two_backends_released_apart(client: Client, tmp_path: Path) -> None:
    one, two = FakeBackend("fake:///one"), FakeBackend("fake:///two")
    one.vms["vm"] = FakeVm("i-1")
    two.vms["vm"] = FakeVm("i-2")
    flow_one, flow_two = workflow(client, one, tmp_path), workflow(client, two, tmp_path)
    flow_one.attach("vm", ["shared:/data", "/scratch"])
    flow_two.attach("vm", ["shared:/data", "/scratch"])
    assert len(client.list_exports()) == 4
    # The VM on backend one ends: only its records go, whoever reconciles.
    one.vms["vm"].alive = False
    assert flow_two.reconcile() == []
    [event] = flow_one.reconcile()
    assert event.kind == "gone" and len(event.released.exports) == 2  # type: ignore[union-attr]
    left = client.list_exports()
    assert {e["consumer"]["backend"] for e in left} == {"fake:///two"}
    assert [a.guest_path for a in flow_two.list_attachments("vm")] == ["/data", "/scratch"]
    assert len(client.list_volumes()) == 2  # "shared" and backend two's anonymous volume
    with pytest.raises(DomainStateConflict):
        flow_two.release("i-2")


def test_a_vm_is_called_by_its_recorded_name(client: Client, tmp_path: Path) -> None:
    backend = FakeBackend("fake:///one")
    backend.vms["vm1"] = FakeVm("i-1")
    backend.vms["alias"] = backend.vms["vm1"]
    flow = workflow(client, backend, tmp_path)
    flow.attach("vm1", ["/a"])
    with pytest.raises(InvalidArgument, match="recorded as 'vm1'"):
        flow.list_attachments("alias")
