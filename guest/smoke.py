"""Smoke proof of the test guest: boot it under libvirt with real virtio-fs shares.

Two runs, each a transient TCG domain on qemu:///system with QEMU 7.2's virtiofsd serving
temporary directories:

1. rw: a share at /data and a read-only "ctl" share carrying the script (boxvol.script=); the
   script writes /data/hello.txt with the guest's `uname -r`; the host reads it back.
2. ro: the share at /data:ro and an inline script (boxvol.script64=) that tries to write, then
   tries `mount -o remount,rw /data` and writes again. The first write must fail in the guest;
   what the remount does is reported, not judged (libvirt 9.0 ignores <readonly/> for an
   external virtiofsd, so only the guest's own mount flag stands in the way here).

Everything it starts is torn down in reverse order even on failure: the domain destroyed, each
virtiofsd stopped, the temporary directory removed. Run from the repository root:
`.venv/bin/python -m guest.smoke` (or `.venv/bin/python guest/smoke.py`).

This is a proof script, not part of boxvold: it may import libvirt and nothing from boxvol but
the guest package.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

if __package__ in (None, ""):
    # Run as a file: make the repository root importable for guest.build.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from guest.build import GuestImage, build_guest, default_out_dir
from guest.domain import guest_domain_xml

log = logging.getLogger(__name__)

URI = "qemu:///system"
VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")
QEMU_GROUP = "kvm"  # the group libvirt-qemu runs with on Debian: it must reach the socket
MARKER = "BOXVOL-GUEST: "
RO_PROBE = "RO-PROBE: "


class SmokeError(Exception):
    """The guest did not do what the smoke test expected."""


@dataclass(frozen=True)
class Share:
    tag: str
    host_dir: Path
    guest_path: str
    read_only: bool = False


@dataclass
class GuestRun:
    console: str
    wall_seconds: float
    markers: list[str] = field(default_factory=list)

    @property
    def script_exit(self) -> int | None:
        for m in self.markers:
            if m.startswith("script exit="):
                return int(m.removeprefix("script exit="))
        return None

    def lines_with(self, prefix: str) -> list[str]:
        return [line.split(prefix, 1)[1] for line in self.console.splitlines() if prefix in line]


def _console_lines(text: str) -> list[str]:
    return [line.rstrip("\r") for line in text.splitlines()]


@contextlib.contextmanager
def _virtiofsd(share: Share, socket: Path, logfile: Path) -> Iterator[subprocess.Popen[bytes]]:
    """One virtiofsd for one boot (it serves a single connection, then exits)."""
    cmd = [
        str(VIRTIOFSD),
        f"--socket-path={socket}",
        f"--socket-group={QEMU_GROUP}",
        "-o",
        f"source={share.host_dir},sandbox=namespace,cache=auto",
    ]
    with logfile.open("wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 10
        while not socket.exists():
            if proc.poll() is not None:
                raise SmokeError(f"virtiofsd exited with {proc.returncode}: {logfile.read_text()}")
            if time.monotonic() > deadline:
                raise SmokeError(f"virtiofsd made no socket in 10 s: {logfile.read_text()}")
            time.sleep(0.05)
        yield proc
    finally:
        # After the guest is gone virtiofsd exits by itself; give it a moment, then insist.
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.info("virtiofsd for %s ended with %s", share.tag, proc.returncode)


def domain_xml(
    name: str,
    image: GuestImage,
    shares: Sequence[tuple[Share, Path]],
    console_log: Path,
    *,
    words: Sequence[str],
    script_text: str | None,
) -> str:
    """The test guest's domain (``guest.domain``) with shared memory and the shares, each
    wired to its virtiofsd's socket."""
    dom = ET.fromstring(
        guest_domain_xml(
            name, image, console_log, script=script_text, timeout=60, extra_words=words
        )
    )
    # virtio-fs needs guest RAM that virtiofsd can map: shared memfd.
    backing = ET.Element("memoryBacking")
    ET.SubElement(backing, "source", type="memfd")
    ET.SubElement(backing, "access", mode="shared")
    vcpu = dom.find("vcpu")
    assert vcpu is not None
    dom.insert(list(dom).index(vcpu) + 1, backing)
    devices = dom.find("devices")
    assert devices is not None
    for position, (share, socket) in enumerate(shares):
        fs = ET.Element("filesystem", type="mount")
        ET.SubElement(fs, "driver", type="virtiofs", queue="1024")
        ET.SubElement(fs, "source", socket=str(socket))
        ET.SubElement(fs, "target", dir=share.tag)
        devices.insert(position, fs)
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")


def share_words(shares: Sequence[Share], *, script: tuple[str, str] | None = None) -> list[str]:
    """Kernel command line words telling init what to mount (and which script to run)."""
    words = [f"boxvol.mount={s.tag}:{s.guest_path}{':ro' if s.read_only else ''}" for s in shares]
    if script is not None:
        words.append(f"boxvol.script={script[0]}:{script[1]}")
    return words


def _domain_gone(conn: libvirt.virConnect, name: str) -> bool:
    try:
        dom = conn.lookupByName(name)
        return not dom.isActive()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return True
        raise


def run_guest(
    conn: libvirt.virConnect,
    image: GuestImage,
    workdir: Path,
    shares: Sequence[Share],
    words: Sequence[str],
    *,
    script_text: str | None = None,
    timeout: float = 120.0,
) -> GuestRun:
    """Boot one transient guest with a virtiofsd per share; return once it has shut off."""
    name = f"boxvol-smoke-{secrets.token_hex(4)}"
    console_log = workdir / f"{name}.console.log"
    with contextlib.ExitStack() as stack:
        wired: list[tuple[Share, Path]] = []
        for share in shares:
            socket = workdir / f"{share.tag}.sock"
            stack.enter_context(_virtiofsd(share, socket, workdir / f"virtiofsd-{share.tag}.log"))
            wired.append((share, socket))
        xml = domain_xml(name, image, wired, console_log, words=words, script_text=script_text)
        log.debug("domain XML:\n%s", xml)
        (workdir / f"{name}.xml").write_text(xml)
        started = time.monotonic()
        dom = conn.createXML(xml, 0)
        stack.callback(_destroy, conn, name)  # runs before the virtiofsd teardowns above
        log.info("started %s (extra cmdline words: %s)", name, " ".join(words))
        while not _domain_gone(conn, name):
            if time.monotonic() - started > timeout:
                dom.destroy()
                tail = console_log.read_text(errors="replace")[-3000:]
                raise SmokeError(f"{name} still running after {timeout:.0f} s; console:\n{tail}")
            time.sleep(0.1)
        wall = time.monotonic() - started
    console = console_log.read_text(errors="replace")
    log.debug("console of %s:\n%s", name, console)
    lines = _console_lines(console)
    markers = [line.split(MARKER, 1)[1] for line in lines if MARKER in line]
    return GuestRun(console="\n".join(lines), wall_seconds=wall, markers=markers)


def _destroy(conn: libvirt.virConnect, name: str) -> None:
    try:
        conn.lookupByName(name).destroy()
        log.warning("destroyed %s, which was still running", name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() not in (
            libvirt.VIR_ERR_NO_DOMAIN,
            libvirt.VIR_ERR_OPERATION_INVALID,
        ):
            raise


def _check_done(run: GuestRun, what: str) -> None:
    errors = [m for m in run.markers if m.startswith("error:")]
    if errors or not run.markers or run.markers[-1] != "done":
        raise SmokeError(f"{what}: guest did not finish cleanly {errors}; console:\n{run.console}")


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    # mkdtemp makes 0700, which QEMU (libvirt-qemu) cannot traverse to reach the socket.
    path = Path(tempfile.mkdtemp(prefix="boxvol-smoke-", dir="/tmp"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def smoke_rw(conn: libvirt.virConnect, image: GuestImage) -> GuestRun:
    with _workdir() as work:
        data = work / "data"
        ctl = work / "ctl"
        data.mkdir(mode=0o755)
        ctl.mkdir(mode=0o755)
        (ctl / "run.sh").write_text(
            "set -e\nuname -r > /data/hello.txt\nsync\ncat /data/hello.txt\nls -l /data\n"
        )
        shares = [Share("data", data, "/data"), Share("ctl", ctl, "/boxvol/ctl", read_only=True)]
        run = run_guest(conn, image, work, shares, share_words(shares, script=("ctl", "run.sh")))
        _check_done(run, "rw run")
        if run.script_exit != 0:
            raise SmokeError(f"rw run: script exit={run.script_exit}; console:\n{run.console}")
        hello = data / "hello.txt"
        if not hello.is_file():
            raise SmokeError(f"rw run: {hello} missing on the host; console:\n{run.console}")
        got = hello.read_text().strip()
        if got != image.kernel_version:
            raise SmokeError(f"rw run: hello.txt has {got!r}, want {image.kernel_version!r}")
        log.info("rw run: host sees hello.txt = %r", got)
        return run


def _probe(label: str, command: str) -> str:
    """A shell line that runs `command` and prints `RO-PROBE: label=ok|failed`."""
    return (
        f'if {command}; then echo "{RO_PROBE}{label}=ok"; else echo "{RO_PROBE}{label}=failed"; fi'
    )


RO_SCRIPT = "\n".join(
    (
        _probe("write", "echo x > /data/ro-probe.txt"),
        _probe("remount", "mount -o remount,rw /data"),
        "grep ' /data ' /proc/mounts",
        _probe("write-after-remount", "echo y > /data/after-remount.txt"),
        "",
    )
)


def smoke_ro(conn: libvirt.virConnect, image: GuestImage) -> tuple[GuestRun, dict[str, str]]:
    with _workdir() as work:
        data = work / "data"
        data.mkdir(mode=0o755)
        (data / "existing.txt").write_text("from the host\n")
        shares = [Share("data", data, "/data", read_only=True)]
        run = run_guest(conn, image, work, shares, share_words(shares), script_text=RO_SCRIPT)
        _check_done(run, "ro run")
        probes = dict(p.split("=", 1) for p in run.lines_with(RO_PROBE))
        probes["host-sees-ro-probe"] = str((data / "ro-probe.txt").exists())
        probes["host-sees-after-remount"] = str((data / "after-remount.txt").exists())
        if probes.get("write") != "failed" or probes["host-sees-ro-probe"] != "False":
            raise SmokeError(f"ro run: the write to a :ro mount was not refused: {probes}")
        return run, probes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Boot the boxvol test guest twice (rw, ro).")
    parser.add_argument("--out-dir", type=Path, default=None, help="guest build directory")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if os.geteuid() != 0:
        log.error("run as root (virtiofsd with sandbox=namespace and qemu:///system need it)")
        return 1
    image = build_guest(args.out_dir or default_out_dir())
    # libvirt prints every error to stderr by default, even those handled here by error code.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(URI)
    try:
        rw = smoke_rw(conn, image)
        ro, probes = smoke_ro(conn, image)
    except SmokeError as exc:
        log.error("%s", exc)
        return 1
    finally:
        conn.close()
    print(f"rw run: OK, boot-to-poweroff {rw.wall_seconds:.1f} s wall, guest markers:")
    for m in rw.markers:
        print(f"  {m}")
    print(f"ro run: OK, boot-to-poweroff {ro.wall_seconds:.1f} s wall, probes:")
    for k, v in probes.items():
        print(f"  {k}={v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
