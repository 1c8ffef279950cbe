"""The libvirt side of the test guest: its domain definition (TCG q35, the test kernel and
initramfs, a serial console to a file, a script run by the guest's init; no shares, which
are the job of the code under test) and the host daemons it needs."""

from __future__ import annotations

import base64
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path

import libvirt

from guest.build import GuestImage

URI = "qemu:///system"


def _running(name: str) -> bool:
    return subprocess.run(["pgrep", "-x", name], capture_output=True, check=False).returncode == 0


def _libvirt_answers(uri: str) -> bool:
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return False
    conn.close()
    return True


def ensure_libvirt(
    uri: str = URI, *, say: Callable[[str], None] | None = None, timeout: float = 30.0
) -> None:
    """Start virtlogd (it writes the console files) and libvirtd where they are not running
    (no systemd as PID 1 here), and wait until libvirtd answers on ``uri``.

    Raises TimeoutError if it does not answer within ``timeout`` seconds.
    """
    for daemon in ("virtlogd", "libvirtd"):
        if not _running(daemon):
            if say is not None:
                say(f"$ {daemon} -d")
            subprocess.run([daemon, "-d"], check=True)
    deadline = time.monotonic() + timeout
    while not _libvirt_answers(uri):
        if time.monotonic() > deadline:
            raise TimeoutError(f"libvirtd does not answer on {uri} after {timeout:.0f} s")
        time.sleep(0.2)


def guest_domain_xml(
    name: str,
    image: GuestImage,
    console_log: Path,
    *,
    script: str | None,
    timeout: int = 120,
    extra_words: Sequence[str] = (),
) -> str:
    """A domain that boots the test guest, runs ``script`` (given to init on the kernel
    command line; None: the caller adds a ``boxvol.script=`` word later) and powers off;
    every exit path destroys it. ``extra_words`` go on the kernel command line too."""
    dom = ET.Element("domain", type="qemu")  # TCG: KVM guests hang on this host
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = "256"
    ET.SubElement(dom, "vcpu").text = "1"
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="q35").text = "hvm"
    ET.SubElement(os_, "kernel").text = str(image.kernel)
    ET.SubElement(os_, "initrd").text = str(image.initrd)
    words = ["console=ttyS0", "panic=-1", f"boxvol.timeout={timeout}", *extra_words]
    if script is not None:
        words.append(f"boxvol.script64={base64.b64encode(script.encode()).decode()}")
    ET.SubElement(os_, "cmdline").text = " ".join(words)
    ET.SubElement(ET.SubElement(dom, "features"), "acpi")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(dom, event).text = "destroy"
    devices = ET.SubElement(dom, "devices")
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=str(console_log))
    ET.SubElement(serial, "target", port="0")
    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "memballoon", model="none")
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")
