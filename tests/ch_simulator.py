"""A Cloud Hypervisor API simulator, for the backend's tests (no Cloud Hypervisor can be
installed on the machines boxvol is tested on).

Written from Cloud Hypervisor's published OpenAPI document (vmm/src/api/openapi/
cloud-hypervisor.yaml): the endpoints the backend uses, their required fields and types, and
their status codes. It refuses whatever the document says the real one refuses:

- ``GET /api/v1/vmm.ping``: 200 ``{"version", "pid"}``;
- ``GET /api/v1/vm.info``: 200 ``{"config": VmConfig, "state"}``, 404 when no VM is created;
- ``PUT /api/v1/vm.add-fs`` with ``FsConfig`` (``tag``, ``socket``, ``num_queues``,
  ``queue_size`` required; ``id``, ``pci_segment``, ``pci_device_id`` optional; nothing else):
  200 ``PciDeviceInfo``, 204 while the VM is created but not booted, 400 for a configuration
  it refuses (a missing or mistyped field, a tag over 36 bytes), 404 with no VM, 409 for an id
  already in use, 500 when the vhost-user socket cannot be connected to (the real one connects
  to the backend when the device is added);
- ``PUT /api/v1/vm.remove-device`` with ``VmRemoveDevice`` (``id``): 204, 404 with no VM or no
  such device. As with the real one, the device leaves the configuration only when the guest
  has ejected it: here after ``--eject-after`` seconds, or never with ``--never-eject``.
- any other endpoint: 404; a known endpoint with another method: 405.

Fault injection (not part of the API): ``--fail-add-after N`` answers 500 to every add-fs
after the first N, as a Cloud Hypervisor that runs out of PCI slots or memory would.

Run: ``python tests/ch_simulator.py --api-socket PATH [--shared-memory] [--not-created]
[--eject-after S | --never-eject]``; it serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from typing import Any

FS_REQUIRED = {"tag": str, "socket": str, "num_queues": int, "queue_size": int}
FS_OPTIONAL = {"id": str, "pci_segment": int, "pci_device_id": int}
MAX_TAG_BYTES = 36


class Vm:
    """The simulated VM: its configuration, and the vhost-user connections of its devices."""

    def __init__(
        self,
        *,
        created: bool,
        shared: bool,
        eject_after: float | None,
        fail_add_after: int | None = None,
    ) -> None:
        self.created = created
        self.adds_left = fail_add_after
        self.lock = threading.Lock()
        self.config: dict[str, Any] = {
            "payload": {"kernel": "/simulated/vmlinux"},
            "memory": {"size": 256 << 20, "shared": shared},
            "fs": [],
        }
        self.connections: dict[str, socket.socket] = {}
        self.eject_after = eject_after
        self.next_slot = 4

    def add_fs(self, body: dict[str, Any]) -> tuple[int, Any]:
        error = check_fields(body, FS_REQUIRED, FS_OPTIONAL)
        if error:
            return 400, error
        if len(body["tag"].encode()) > MAX_TAG_BYTES:
            return 400, f"tag longer than {MAX_TAG_BYTES} bytes"
        if body["num_queues"] < 1 or body["queue_size"] < 1:
            return 400, "num_queues and queue_size must be at least 1"
        with self.lock:
            if not self.created:
                return 404, "VM is not created"
            device_id = body.get("id") or f"_fs{len(self.config['fs'])}"
            if any(fs.get("id") == device_id for fs in self.config["fs"]):
                return 409, f"a device with identifier {device_id} already exists"
            if self.adds_left is not None:
                if self.adds_left == 0:
                    return 500, "failed to add the virtio-fs device: no PCI slot left"
                self.adds_left -= 1
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                connection.connect(body["socket"])
            except OSError as exc:
                connection.close()
                return 500, f"failed to connect to vhost-user backend {body['socket']}: {exc}"
            self.connections[device_id] = connection
            self.config["fs"].append({**body, "id": device_id})
            slot = self.next_slot
            self.next_slot += 1
        return 200, {"id": device_id, "bdf": f"0000:00:{slot:02x}.0"}

    def remove_device(self, body: dict[str, Any]) -> tuple[int, Any]:
        error = check_fields(body, {"id": str}, {})
        if error:
            return 400, error
        with self.lock:
            if not self.created:
                return 404, "VM is not created"
            if not any(fs.get("id") == body["id"] for fs in self.config["fs"]):
                return 404, f"no device with identifier {body['id']}"
        if self.eject_after is not None:
            timer = threading.Timer(self.eject_after, self._ejected, args=(body["id"],))
            timer.daemon = True
            timer.start()
        return 204, None

    def _ejected(self, device_id: str) -> None:
        with self.lock:
            self.config["fs"] = [fs for fs in self.config["fs"] if fs.get("id") != device_id]
            connection = self.connections.pop(device_id, None)
        if connection is not None:
            connection.close()

    def info(self) -> tuple[int, Any]:
        with self.lock:
            if not self.created:
                return 404, "VM is not created"
            return 200, {"config": json.loads(json.dumps(self.config)), "state": "Running"}


def check_fields(body: Any, required: dict[str, type], optional: dict[str, type]) -> str | None:
    """Why ``body`` is not an object of exactly these fields and types, or None."""
    if not isinstance(body, dict):
        return "the body is not a JSON object"
    for name in required:
        if name not in body:
            return f"missing field `{name}`"
    for name, value in body.items():
        expected = required.get(name) or optional.get(name)
        if expected is None:
            return f"unknown field `{name}`"
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is int):
            return f"invalid type for `{name}`"
    return None


ROUTES = {
    "/api/v1/vmm.ping": "GET",
    "/api/v1/vm.info": "GET",
    "/api/v1/vm.add-fs": "PUT",
    "/api/v1/vm.remove-device": "PUT",
}


class Handler(http.server.BaseHTTPRequestHandler):
    """The API's requests, one per connection."""

    server: Server
    protocol_version = "HTTP/1.1"

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"ch-sim: {format % args}\n")

    def do_GET(self) -> None:
        self._route("GET")

    def do_PUT(self) -> None:
        self._route("PUT")

    def _route(self, method: str) -> None:
        expected = ROUTES.get(self.path)
        if expected is None:
            return self._answer(404, "unknown endpoint")
        if expected != method:
            return self._answer(405, f"{self.path} takes {expected}")
        body: Any = None
        if method == "PUT":
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length))
            except ValueError:
                return self._answer(400, "the body is not JSON")
        vm = self.server.vm
        if self.path == "/api/v1/vmm.ping":
            return self._answer(200, {"version": "simulator", "pid": os.getpid()})
        if self.path == "/api/v1/vm.info":
            return self._answer(*vm.info())
        if self.path == "/api/v1/vm.add-fs":
            return self._answer(*vm.add_fs(body))
        return self._answer(*vm.remove_device(body))

    def _answer(self, status: int, body: Any) -> None:
        payload = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if payload:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The API socket."""

    daemon_threads = True

    def __init__(self, path: str, vm: Vm) -> None:
        self.vm = vm
        super().__init__(path, Handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--api-socket", required=True)
    parser.add_argument("--shared-memory", action="store_true")
    parser.add_argument("--not-created", action="store_true")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--eject-after", type=float, default=0.2)
    group.add_argument("--never-eject", action="store_true")
    parser.add_argument("--fail-add-after", type=int, default=None)
    args = parser.parse_args(argv)
    vm = Vm(
        created=not args.not_created,
        shared=args.shared_memory,
        eject_after=None if args.never_eject else args.eject_after,
        fail_add_after=args.fail_add_after,
    )
    server = Server(args.api_socket, vm)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
        os.unlink(args.api_socket)
        time.sleep(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
