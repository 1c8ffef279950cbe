"""Helpers of the real-guest tests (imported by them and by their conftest)."""

from __future__ import annotations

import base64
import contextlib
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

import libvirt

from guest.build import GuestImage
from guest.domain import guest_domain_xml
from guest.processes import processes_naming
from tests.helpers import Daemon

URI = "qemu:///system"
DOMAIN_PREFIX = "boxvol-test-"
MARKER = "BOXVOL-GUEST: "
#: Host-side limit for one guest's life; TCG boots take 5-15 s here, more under load.
GUEST_TIMEOUT = 180.0
#: The persistent definition, as ``virsh dumpxml --inactive`` shows it.
INACTIVE = libvirt.VIR_DOMAIN_XML_INACTIVE


def share_waits(tag: str) -> str:
    """Shell functions for a guest script that follows hot-plugged shares: ``devs`` (virtio-fs
    devices present), ``wait_mount`` (mount TAG at /mnt once it appears) and ``wait_gone``
    (until no virtio-fs device is left), each giving up after 5 minutes with a STEP line."""
    return f"""\
devs() {{ ls /sys/bus/virtio/drivers/virtiofs/ 2>/dev/null | grep -c '^virtio'; }}
wait_mount() {{
    i=0
    until mount -t virtiofs {tag} /mnt 2>/dev/null; do
        i=$((i+1)); [ $i -gt 3000 ] && {{ echo "STEP: no-tag"; exit 3; }}; sleep 0.1
    done
}}
wait_gone() {{
    i=0
    while [ "$(devs)" != 0 ]; do
        i=$((i+1)); [ $i -gt 3000 ] && {{ echo "STEP: still-there"; exit 4; }}; sleep 0.1
    done
}}
"""


def virtiofsd_serving(*paths: Path) -> dict[int, str]:
    """virtiofsd processes whose command line names one of ``paths`` (pid -> command)."""
    return processes_naming(*(str(p) for p in paths), program="virtiofsd")


def volume_dir(daemon: Daemon, volume: dict[str, Any]) -> Path:
    """Where boxvold keeps a volume on the host (named: by name; anonymous: by id)."""
    name: str | None = volume["name"]
    if name is not None:
        return daemon.home / "volumes" / "named" / name
    return daemon.home / "volumes" / "anonymous" / str(volume["id"])


def virtiofsd_running(export: dict[str, Any]) -> bool:
    """Whether the virtiofsd boxvold reports for ``export`` runs."""
    pid = (export.get("virtiofsd") or {}).get("pid")
    return bool(pid) and Path(f"/proc/{pid}").exists()


class TestDomain:
    """One persistent test domain and its console."""

    __test__ = False  # not a test class, whatever its name says

    def __init__(self, conn: Any, name: str, console_log: Path) -> None:
        self.conn = conn
        self.name = name
        self.console_log = console_log

    @property
    def dom(self) -> Any:
        return self.conn.lookupByName(self.name)

    def start(self) -> None:
        self.started = time.monotonic()
        self.dom.create()

    def console(self) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return text.replace("\r", "")

    def markers(self) -> list[str]:
        return [ln.split(MARKER, 1)[1] for ln in self.console().splitlines() if MARKER in ln]

    def lines_with(self, prefix: str) -> list[str]:
        return [ln.split(prefix, 1)[1] for ln in self.console().splitlines() if prefix in ln]

    def wait_console(self, text: str, timeout: float = GUEST_TIMEOUT) -> float:
        """Wait for ``text`` on the console; returns when it came (monotonic)."""
        deadline = time.monotonic() + timeout
        while text not in self.console():
            if not self.dom.isActive():
                raise AssertionError(f"{self.name} stopped before {text!r}:\n{self.console()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} from {self.name}:\n{self.console()[-3000:]}")
            time.sleep(0.05)
        return time.monotonic()

    def wait_stopped(self, timeout: float = GUEST_TIMEOUT) -> float:
        """Wait for the guest to power off; returns the seconds since ``start``."""
        deadline = time.monotonic() + timeout
        while self.dom.isActive():
            if time.monotonic() > deadline:
                self.dom.destroy()
                raise AssertionError(f"{self.name} still running:\n{self.console()[-3000:]}")
            time.sleep(0.1)
        return time.monotonic() - self.started

    def check_done(self) -> None:
        """The guest ran its script to exit 0 and powered off cleanly."""
        markers = self.markers()
        errors = [m for m in markers if m.startswith("error:")]
        assert not errors and markers and markers[-1] == "done", self.console()
        assert "script exit=0" in markers, self.console()


#: The test guest's definition (shared with the demo).
domain_xml = guest_domain_xml


def gone(conn: Any, name: str) -> bool:
    try:
        conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return True
        raise
    return False


class Domains:
    """Defines test domains and removes every one of them afterwards."""

    def __init__(self, conn: Any, image: GuestImage, workdir: Path) -> None:
        self.conn = conn
        self.image = image
        self.workdir = workdir
        self.names: list[str] = []

    def define(self, *, script: str, timeout: int = 120) -> TestDomain:
        name = f"{DOMAIN_PREFIX}{secrets.token_hex(4)}"
        console_log = self.workdir / f"{name}.console.log"
        self.names.append(name)
        self.conn.defineXML(
            domain_xml(name, self.image, console_log, script=script, timeout=timeout)
        )
        return TestDomain(self.conn, name, console_log)

    def cleanup(self) -> None:
        for name in self.names:
            try:
                dom = self.conn.lookupByName(name)
            except libvirt.libvirtError:
                continue
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefine()


class QemuGuest:
    """The test guest in a QEMU process of the test's own (no libvirt): q35, TCG, guest RAM
    in shared memory (or not, with ``shared_memory=False``), ``root_ports`` free
    pcie-root-ports, and a QMP socket, as a sandbox runtime would start it."""

    __test__ = False

    def __init__(
        self,
        image: GuestImage,
        workdir: Path,
        *,
        script: str,
        timeout: int = 300,
        shared_memory: bool = True,
        root_ports: int = 2,
    ) -> None:
        self.qmp_socket = workdir / f"qmp-{secrets.token_hex(4)}.sock"
        self.console_log = workdir / f"console-{secrets.token_hex(4)}.log"
        words = [
            "console=ttyS0",
            "panic=-1",
            f"boxvol.timeout={timeout}",
            f"boxvol.script64={base64.b64encode(script.encode()).decode()}",
        ]
        machine = "q35,accel=tcg"
        memory = ["-m", "256M"]
        if shared_memory:
            machine += ",memory-backend=mem"
            memory += ["-object", "memory-backend-memfd,id=mem,size=256M,share=on"]
        ports = []
        for n in range(1, root_ports + 1):
            ports += ["-device", f"pcie-root-port,id=rp{n},chassis={n},slot={n}"]
        self.command = [
            "qemu-system-x86_64",
            "-machine",
            machine,
            *memory,
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            str(image.kernel),
            "-initrd",
            str(image.initrd),
            "-append",
            " ".join(words),
            "-serial",
            f"file:{self.console_log}",
            "-qmp",
            f"unix:{self.qmp_socket},server=on,wait=off",
            *ports,
        ]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"qmp://{self.qmp_socket}"

    def start(self) -> None:
        errors = self.console_log.with_suffix(".stderr")
        with errors.open("wb") as stderr:
            self.process = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
            )
        deadline = time.monotonic() + 30
        while not self.qmp_socket.exists():
            if self.process.poll() is not None:
                raise AssertionError(f"QEMU exited: {errors.read_text()}")
            assert time.monotonic() < deadline, "QEMU made no QMP socket in 30 s"
            time.sleep(0.05)

    def console(self) -> str:
        try:
            return self.console_log.read_text(errors="replace").replace("\r", "")
        except FileNotFoundError:
            return ""

    def markers(self) -> list[str]:
        return [ln.split(MARKER, 1)[1] for ln in self.console().splitlines() if MARKER in ln]

    def wait_console(self, text: str, timeout: float = GUEST_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.console():
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"QEMU ended before {text!r}:\n{self.console()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} from the guest:\n{self.console()[-3000:]}")
            time.sleep(0.05)

    def wait_stopped(self, timeout: float = GUEST_TIMEOUT) -> None:
        assert self.process is not None
        self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def qemu_for(domain: str) -> list[int]:
    """QEMU processes running ``domain``."""
    return list(processes_naming(f"guest={domain},", program="qemu-system"))


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (exists and is not a zombie)."""
    try:
        state = next(
            ln
            for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
            if ln.startswith("State:")
        )
    except (OSError, StopIteration):
        return False
    return "Z" not in state.split()[1]
