"""A real systemd as PID 1 in a container made for the tests, with boxvol installed in it the
way docs/operator.md tells an operator to.

The root filesystem is a minimal Debian 12 (``debootstrap``) with systemd, FUSE, e2fsprogs,
QEMU's virtiofsd and libvirt, made once and cached under /var/cache/boxvol-test (about a
minute). Each container boots from an overlay on it (the cache is never written), with
/dev/fuse, /dev/loop-control and the host's /dev/loopN passed in, and the wheels of this
checkout (built once per session with pip) mounted read-only at /wheels. Commands run inside
with ``nsenter`` into the container's PID 1 (``systemd-nspawn --register=no --keep-unit``:
the host has no system bus).
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path("/var/cache/boxvol-test")
#: What the container has besides a minimal Debian: systemd and its bus, what boxvold runs
#: (FUSE, mkfs/e2fsck, mount/nsenter, QEMU's virtiofsd), a Python with venv for the install,
#: and libvirt for the VM watcher.
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "fuse3",
    "python3",
    "python3-venv",
    "e2fsprogs",
    "util-linux",
    "qemu-system-common",
    "libvirt-daemon-system",
    "libvirt-clients",
    # libvirt's polkitd depends on the virtual default-logind, which debootstrap cannot pick.
    "libpam-systemd",
)
BOOT_TIMEOUT = 120.0
#: The operator's install, as docs/operator.md gives it (the wheels stand in for PyPI).
INSTALL = (
    "python3 -m venv /opt/boxvol",
    "/opt/boxvol/bin/pip install -q --no-index --find-links /wheels boxvol",
    "/opt/boxvol/bin/boxvol-install",
    "systemctl enable --now boxvold.socket",
)


def rootfs() -> Path:
    """The cached root filesystem (made if missing). Blocking: debootstrap, about a minute."""
    key = hashlib.sha256(" ".join(PACKAGES).encode()).hexdigest()[:12]
    tree = CACHE / f"bookworm-{key}"
    if (tree / ".complete").exists():
        return tree
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = CACHE / f"bookworm-{key}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    made = subprocess.run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            "bookworm",
            str(partial),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if made.returncode != 0:
        log = partial / "debootstrap" / "debootstrap.log"
        detail = log.read_text(errors="replace")[-3000:] if log.exists() else made.stderr
        raise AssertionError(f"debootstrap failed ({made.returncode}):\n{detail}")
    (partial / ".complete").touch()
    partial.rename(tree)
    return tree


def wheelhouse(directory: Path) -> Path:
    """This checkout and its dependencies as wheels (pip's cache makes it quick)."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            str(REPO / ".venv" / "bin" / "pip"),
            "wheel",
            "-q",
            "--wheel-dir",
            str(directory),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=1800,
    )
    return directory


class Container:
    """One booted systemd container; ``run`` executes a command inside it."""

    def __init__(self, workdir: Path, wheels: Path) -> None:
        self.workdir = workdir
        self.wheels = wheels
        self.merged = workdir / "root"
        self.log = workdir / "console.log"
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.init_pid = 0

    def boot(self) -> None:
        """Boot the container and wait until systemd says the system is up."""
        lower = rootfs()
        for name in ("upper", "work", "root"):
            (self.workdir / name).mkdir(parents=True, exist_ok=True)
        upper, work = self.workdir / "upper", self.workdir / "work"
        subprocess.run(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                f"lowerdir={lower},upperdir={upper},workdir={work}",
                str(self.merged),
            ],
            check=True,
        )
        loops = [f"--bind={path}" for path in sorted(glob.glob("/dev/loop[0-9]*"))]
        with self.log.open("wb") as console:
            self.nspawn = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "-D",
                    str(self.merged),
                    "-b",
                    "--register=no",
                    "--keep-unit",
                    f"--machine=bvtest{os.getpid()}",
                    "--bind=/dev/fuse",
                    "--bind=/dev/loop-control",
                    *loops,
                    "--property=DeviceAllow=/dev/fuse rwm",
                    "--property=DeviceAllow=/dev/loop-control rwm",
                    "--property=DeviceAllow=block-loop rwm",
                    f"--bind-ro={self.wheels}:/wheels",
                ],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            assert self.nspawn.poll() is None, f"nspawn exited:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, f"no boot:\n{self.log.read_text()[-3000:]}"
            children = subprocess.run(
                ["pgrep", "-P", str(self.nspawn.pid)], capture_output=True, text=True, check=False
            ).stdout.split()
            if children:
                self.init_pid = int(children[0])
                state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.3)

    def run(
        self, *argv: str, check: bool = True, timeout: float = 300, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``argv`` inside the container (all its namespaces, as root)."""
        result = subprocess.run(
            ["nsenter", "-t", str(self.init_pid), "-a", "--", *argv],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            input=input,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
            )
        return result

    def sh(
        self, script: str, *, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """A shell script inside the container."""
        return self.run("sh", "-c", script, check=check, timeout=timeout)

    def install_boxvol(self) -> None:
        """Install boxvol as docs/operator.md says."""
        for command in INSTALL:
            self.sh(command)

    def journal(self, unit: str) -> str:
        """The unit's journal, for failure messages."""
        return self.run("journalctl", "-u", unit, "--no-pager", "-o", "cat", check=False).stdout

    def shutdown(self) -> None:
        """Power the container off (killed after a while) and remove its overlay."""
        if self.nspawn is not None and self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)  # nspawn asks PID 1 to power off
            try:
                self.nspawn.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait()
        subprocess.run(["umount", "-l", str(self.merged)], check=False)
