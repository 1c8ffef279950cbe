"""The libvirt definition of a test guest: TCG q35, the test kernel and initramfs, a serial
console to a file, and a script run by the guest's init. No shares: attaching is the job of
the code under test (vmdriver)."""

from __future__ import annotations

import base64
import xml.etree.ElementTree as ET
from pathlib import Path

from guest.build import GuestImage


def guest_domain_xml(
    name: str, image: GuestImage, console_log: Path, *, script: str, timeout: int = 120
) -> str:
    """A domain that boots the test guest, runs ``script`` (given to init on the kernel
    command line) and powers off; every exit path destroys it."""
    dom = ET.Element("domain", type="qemu")  # TCG: KVM guests hang on this host
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = "256"
    ET.SubElement(dom, "vcpu").text = "1"
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="q35").text = "hvm"
    ET.SubElement(os_, "kernel").text = str(image.kernel)
    ET.SubElement(os_, "initrd").text = str(image.initrd)
    encoded = base64.b64encode(script.encode()).decode()
    words = ["console=ttyS0", "panic=-1", f"boxvol.timeout={timeout}", f"boxvol.script64={encoded}"]
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
