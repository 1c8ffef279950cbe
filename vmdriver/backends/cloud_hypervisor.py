"""Cloud Hypervisor, to its published REST API: ``ch:///ABSOLUTE/PATH/api.sock``.

One Cloud Hypervisor process serves one VM on the unix socket of its ``--api-socket``. The VM
instance is that process (pid and start time from the socket's peer credentials).

- attach: ``GET /api/v1/vm.info`` first, refusing a VM without ``memory.shared`` (vhost-user
  needs it) or not created; then ``PUT /api/v1/vm.add-fs`` with ``tag``, ``socket``,
  ``num_queues``, ``queue_size`` and ``id``;
- detach: ``PUT /api/v1/vm.remove-device`` with ``id``; the removal is done when the guest
  has ejected the device, which shows as the id leaving ``vm.info``'s ``config.fs``; that is
  awaited with a deadline;
- lifecycle: the process is watched through a pidfd, like QEMU's.

Each answer's status maps to one error: 404 (the VM is not created, or no such device), 409
(a device with that id exists), 400 (a configuration it refuses), 5xx (it failed).

**Not yet run against a real Cloud Hypervisor**: none can be installed on the machines this
was written on. It is tested against ``tests/ch_simulator.py``, written from the published
OpenAPI document (docs/backends.md).
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from vmdriver.backends.base import Device, NewDevice, VmRef
from vmdriver.domain_xml import ALIAS_PREFIX
from vmdriver.driver import (
    DeviceRemovalTimeout,
    DomainNotFound,
    DomainNotPrepared,
    HypervisorError,
    HypervisorUnavailable,
    Scope,
)
from vmdriver.processes import (
    ProcessInstance,
    follow_processes,
    instance_alive,
    peer_instance,
    socket_uri_path,
)
from volumed.client import parse_response
from volumed.errors import Conflict, InvalidArgument, ProtocolError

log = logging.getLogger(__name__)

SCHEME = "ch"
#: How long one API call may take.
CALL_TIMEOUT = 30.0
#: How often a removal is looked for in ``vm.info``.
POLL_SECONDS = 0.2
MAX_ANSWER_BYTES = 16 << 20
#: VM states in which devices can be hot-plugged.
_LIVE_STATES = {"Running", "Paused"}


def socket_path(uri: str) -> str:
    """The API socket a ``ch:///PATH`` URI names; refuses anything else."""
    return socket_uri_path(uri, SCHEME, "Cloud Hypervisor", "api.sock")


class ChApiError(HypervisorError):
    """Cloud Hypervisor answered with an error status."""

    code = "cloud_hypervisor_error"

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class CloudHypervisorBackend:
    """boxvol's backend for one Cloud Hypervisor API socket (``vmdriver.backends.base``)."""

    label = "Cloud Hypervisor"
    names_vms = False

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.path = socket_path(uri)

    def close(self) -> None:
        """Nothing stays open between calls."""

    # -- HTTP over the API socket -----------------------------------------------------

    def _call(
        self, method: str, endpoint: str, body: dict[str, Any] | None = None
    ) -> tuple[int, Any, ProcessInstance]:
        """One request; the status, the decoded answer (None if empty) and the process."""
        payload = b"" if body is None else json.dumps(body).encode()
        head = (
            f"{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            f"Accept: application/json\r\nContent-Length: {len(payload)}\r\n"
        )
        if body is not None:
            head += "Content-Type: application/json\r\n"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(CALL_TIMEOUT)
            try:
                sock.connect(self.path)
            except OSError as exc:
                raise HypervisorUnavailable(
                    f"cannot connect to Cloud Hypervisor at {self.path}: {exc.strerror or exc}; "
                    f"is it running with --api-socket path={self.path}?"
                ) from None
            instance = peer_instance(sock)
            try:
                sock.sendall(head.encode() + b"\r\n" + payload)
                raw = _read_answer(sock)
            except OSError as exc:
                raise HypervisorUnavailable(
                    f"Cloud Hypervisor at {self.path} dropped {endpoint}: {exc}"
                ) from None
        try:
            status, data = parse_response(raw)
        except ProtocolError:
            raise HypervisorError(
                f"Cloud Hypervisor at {self.path} answered {endpoint} with something that is "
                "not HTTP"
            ) from None
        try:
            decoded = json.loads(data) if data.strip() else None
        except ValueError:
            decoded = data.decode(errors="replace")
        return status, decoded, instance

    def _ok(self, method: str, endpoint: str, body: dict[str, Any] | None, what: str) -> Any:
        status, answer, _ = self._call(method, endpoint, body)
        if status < 300:
            return answer
        detail = f" ({answer})" if answer else ""
        message = f"Cloud Hypervisor at {self.path} refused {what}: HTTP {status}{detail}"
        if status == 404:
            raise DomainNotFound(message)
        if status == 409:
            raise Conflict(message)
        if status == 400:
            raise InvalidArgument(message)
        raise ChApiError(message, status)

    def _info(self, vm: VmRef | None = None) -> dict[str, Any]:
        status, answer, instance = self._call("GET", "vm.info")
        if vm is not None and str(instance) != vm.instance:
            raise DomainNotFound(
                f"Cloud Hypervisor at {self.path} is now another process ({instance}); VM "
                f"{vm.name} ({vm.instance}) has ended"
            )
        if status == 404:
            raise DomainNotFound(f"Cloud Hypervisor at {self.path} has no VM created yet")
        if status >= 300 or not isinstance(answer, dict):
            raise ChApiError(
                f"Cloud Hypervisor at {self.path} answered vm.info with HTTP {status}", status
            )
        return answer

    # -- the Backend interface --------------------------------------------------------

    def lookup(self, name: str) -> VmRef:
        """The VM behind the socket, under the name boxvol records for it."""
        try:
            _, _, instance = self._call("GET", "vmm.ping")
            info = self._info()
        except HypervisorUnavailable as exc:
            raise DomainNotFound(f"no Cloud Hypervisor for VM {name}: {exc.message}") from None
        running = str(info.get("state")) in _LIVE_STATES
        return VmRef(name, str(instance), running=running, persistent=False)

    def instance_exists(self, instance: str) -> bool:
        """Whether that Cloud Hypervisor process still runs."""
        return instance_alive(instance, "Cloud Hypervisor")

    def devices(self, vm: VmRef) -> list[Device]:
        """boxvol's virtio-fs devices in the VM's configuration (ids ``ua-boxvol-...``)."""
        config = self._info(vm).get("config") or {}
        return [
            Device(str(fs.get("tag")), str(fs["id"]), live=True, config=False)
            for fs in config.get("fs") or []
            if str(fs.get("id", "")).startswith(ALIAS_PREFIX)
        ]

    def check_ready(self, vm: VmRef, scope: Scope, guest_paths: Sequence[str]) -> None:
        """Shared memory (``memory.shared`` in the VM's configuration)."""
        config = self._info(vm).get("config") or {}
        memory = config.get("memory") or {}
        zones = memory.get("zones") or []
        shared = bool(memory.get("shared")) or (zones and all(z.get("shared") for z in zones))
        if not shared:
            raise DomainNotPrepared(
                f"Cloud Hypervisor VM {vm.name} runs without shared memory, which vhost-user-fs "
                "needs: start it with --memory size=<RAM>,shared=on"
            )

    def add_device(self, vm: VmRef, device: NewDevice, scope: Scope) -> None:
        """``vm.add-fs``."""
        self._info(vm)
        self._ok(
            "PUT",
            "vm.add-fs",
            {
                "tag": device.tag,
                "socket": device.socket,
                "num_queues": device.num_queues,
                "queue_size": device.queue_size,
                "id": device.device_id,
            },
            f"adding {device.tag} to {vm.name}",
        )

    def remove_device(self, vm: VmRef, device: Device, scope: Scope, timeout: float) -> None:
        """``vm.remove-device``, then the id awaited out of ``vm.info``'s ``config.fs``."""
        if not self._has(vm, device):
            return
        self._ok("PUT", "vm.remove-device", {"id": device.device_id}, f"removing {device.tag}")
        deadline = time.monotonic() + timeout
        while self._has(vm, device):
            if time.monotonic() > deadline:
                raise DeviceRemovalTimeout(
                    f"the guest of Cloud Hypervisor VM {vm.name} did not release {device.tag} "
                    f"within {timeout:.0f} s; its export keeps running; unmount it in the guest "
                    "and detach again, or give a longer --timeout"
                )
            time.sleep(POLL_SECONDS)

    def _has(self, vm: VmRef, device: Device) -> bool:
        return any(d.device_id == device.device_id for d in self.devices(vm))

    async def watch(
        self,
        on_ended: Callable[[str], Awaitable[object]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Follow the Cloud Hypervisor processes behind the socket, one after another."""

        async def probe() -> ProcessInstance:
            _, _, instance = await trio.to_thread.run_sync(self._call, "GET", "vmm.ping")
            return instance

        task_status.started()
        await follow_processes(probe, on_ended, f"Cloud Hypervisor at {self.path}")


def _read_answer(sock: socket.socket) -> bytes:
    """One HTTP answer: its head, then as many body bytes as its Content-Length says (or
    up to EOF without one); a server that keeps the connection open is not waited for."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = sock.recv(65536)
        if not chunk:
            return raw
        raw += chunk
        if len(raw) > MAX_ANSWER_BYTES:
            raise OSError(f"answer over {MAX_ANSWER_BYTES} bytes")
    head, _, body = raw.partition(b"\r\n\r\n")
    length = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            length = int(value.strip())
    if length is not None and length > MAX_ANSWER_BYTES:
        raise OSError(f"answer over {MAX_ANSWER_BYTES} bytes")
    while length is None or len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            raise OSError(f"answer over {MAX_ANSWER_BYTES} bytes")
    return head + b"\r\n\r\n" + body
