"""Build boxvol's test guest: the host's Debian kernel plus a busybox-static initramfs.

The initramfs holds `/init` (guest/init, a busybox `sh` script), `/bin/busybox`, the virtio-fs
kernel modules of the installed `linux-image-amd64` (decompressed, with `/etc/boxvol/modules`
naming them in load order) and `/dev/console`. The cpio archive is written here, in Python, so
no root privileges are needed for its device node and the output is byte-for-byte reproducible
(fixed owners and times, gzip without a timestamp).

The kernel is the bzImage's payload, decompressed, as `vmlinux-<version>`: an ELF file with a
PVH entry point, which QEMU boots directly. Under TCG this skips the in-guest decompression of
the xz-packed bzImage, about 5 s of an 11 s boot here. A kernel without a PVH note, or packed in
a way not handled here, is copied as it is (`vmlinuz-<version>`). Either way it is a copy, so
libvirt's DAC driver relabels that file and not the one in /boot. Both outputs land in one
directory with `initrd-<version>.img` and a stamp holding a digest of every input; a build whose
stamp matches is skipped.

Usable as a library (`build_guest(out_dir) -> GuestImage`) and as a command
(`python guest/build.py [OUT_DIR]`, which prints the two paths). Standard library only; it must
not import the rest of boxvol, libvirt or trio.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import logging
import lzma
import os
import re
import shlex
import stat
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Bump when the layout of the initramfs changes, so old stamps stop matching.
BUILDER_VERSION = "1"

# The modules virtio-fs needs over virtio-pci, in load order. Their dependencies from
# modules.dep are pulled in ahead of them, so a kernel that splits things differently still
# gets a working order; a name the kernel builds in, or does not have, is simply left out.
WANTED_MODULES: tuple[str, ...] = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "fuse",
    "virtiofs",
)

INIT_SCRIPT = Path(__file__).resolve().parent / "init"
BUSYBOX = Path("/bin/busybox")
BOOT_DIR = Path("/boot")
MODULES_ROOT = Path("/lib/modules")
KERNEL_PACKAGE = "linux-image-amd64"

_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


class GuestBuildError(Exception):
    """The guest cannot be built on this host (a missing package, kernel or file)."""


@dataclass(frozen=True)
class GuestImage:
    """What a domain needs for direct kernel boot of the test guest."""

    kernel: Path
    initrd: Path
    kernel_version: str
    pvh: bool  # kernel is an uncompressed ELF booted through its PVH entry point


@dataclass(frozen=True)
class _Module:
    name: str  # as in /sys/module: underscores, no suffix
    path: Path  # the file under /lib/modules/<version>/, possibly compressed


def default_out_dir() -> Path:
    """/var/cache/boxvol-guest as root, else $XDG_CACHE_HOME/boxvol-guest (~/.cache/...).

    Mind that QEMU under qemu:///system runs as libvirt-qemu: every directory above the output
    must be traversable by it, which a 0700 home is not.
    """
    if os.geteuid() == 0:
        return Path("/var/cache/boxvol-guest")
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "boxvol-guest"


def installed_kernel_version() -> str:
    """The kernel release that the installed linux-image-amd64 depends on, e.g. 6.1.0-57-amd64.

    The host may run another kernel (`uname -r`); the guest boots this one. Without dpkg's
    answer, the newest /boot/vmlinuz-* that has its /lib/modules directory is taken.
    """
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Depends}", KERNEL_PACKAGE],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        log.debug("dpkg-query for %s failed: %s", KERNEL_PACKAGE, exc)
        out = ""
    for match in re.finditer(r"linux-image-(\S+?)(?:\s|,|$)", out):
        version = match.group(1)
        if (BOOT_DIR / f"vmlinuz-{version}").is_file() and (MODULES_ROOT / version).is_dir():
            return version
    candidates = [
        p.name.removeprefix("vmlinuz-")
        for p in BOOT_DIR.glob("vmlinuz-*")
        if (MODULES_ROOT / p.name.removeprefix("vmlinuz-")).is_dir()
    ]
    if not candidates:
        raise GuestBuildError(
            f"no kernel with modules found in {BOOT_DIR} (apt-get install {KERNEL_PACKAGE})"
        )
    return max(candidates, key=_version_key)


def _version_key(version: str) -> tuple[tuple[int, str], ...]:
    return tuple((int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.-]", version))


def _module_name(relpath: str) -> str:
    base = relpath.rsplit("/", 1)[-1]
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def resolve_modules(
    modules_dir: Path, wanted: Iterable[str] = WANTED_MODULES
) -> tuple[list[_Module], list[str], list[str]]:
    """Modules to load in order (dependencies first), the built-in names, the missing names."""
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        target, _, rest = line.partition(":")
        deps[_module_name(target)] = (target, [_module_name(d) for d in rest.split()])
    builtin_file = modules_dir / "modules.builtin"
    builtin = (
        {_module_name(line) for line in builtin_file.read_text().split()}
        if builtin_file.is_file()
        else set()
    )

    order: list[_Module] = []
    seen: set[str] = set()
    builtins: list[str] = []
    missing: list[str] = []

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name in deps:
            target, requires = deps[name]
            for dep in requires:
                visit(dep)
            order.append(_Module(name, modules_dir / target))
        elif name in builtin:
            builtins.append(name)
        else:
            missing.append(name)

    for name in wanted:
        visit(name)
    return order, builtins, missing


def _read_module(path: Path) -> bytes:
    """The module's ELF bytes: busybox insmod takes only uncompressed modules."""
    data = path.read_bytes()
    name = path.name
    if name.endswith(".ko"):
        return data
    if name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if name.endswith(".ko.zst"):
        # No zstd in this Python's standard library: the zstd command (package zstd) does it.
        try:
            return subprocess.run(
                ["zstd", "-dcq", str(path)], check=True, capture_output=True
            ).stdout
        except (OSError, subprocess.CalledProcessError) as exc:
            raise GuestBuildError(
                f"cannot decompress {path} (apt-get install zstd): {exc}"
            ) from exc
    raise GuestBuildError(f"unknown module format: {path}")


class _Cpio:
    """A cpio "newc" archive, as the kernel unpacks an initramfs. Owners root, times zero."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = (
            self._ino,  # inode number: unique per entry, so nothing is taken for a hard link
            mode,
            0,  # uid
            0,  # gid
            2 if stat.S_ISDIR(mode) else 1,  # nlink
            0,  # mtime: fixed, for reproducible archives
            len(data),
            0,  # devmajor
            0,  # devminor
            rdev[0],
            rdev[1],
            len(encoded),
            0,  # check (unused by "newc")
        )
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._parts += [header, encoded, _pad(len(header) + len(encoded)), data, _pad(len(data))]

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._ino = 0
        self._entry("TRAILER!!!", 0)
        return b"".join(self._parts)


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _initramfs(
    version: str,
    busybox: bytes,
    init: bytes,
    modules: Sequence[tuple[str, bytes]],
    builtins: Sequence[str],
    missing: Sequence[str],
) -> bytes:
    cpio = _Cpio()
    for d in (
        "bin",
        "dev",
        "etc",
        "etc/boxvol",
        "lib",
        "lib/modules",
        f"lib/modules/{version}",
        "proc",
        "sys",
        "run",
        "tmp",
    ):
        cpio.directory(d)
    # The kernel opens /dev/console for init before init can mount devtmpfs: without this
    # node init starts with no stdout and every marker is lost.
    cpio.char_device("dev/console", 5, 1)
    cpio.char_device("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", busybox, 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", init, 0o755)
    for name, data in modules:
        cpio.file(f"lib/modules/{version}/{name}.ko", data)
    cpio.file("etc/boxvol/modules", "".join(f"{n}\n" for n, _ in modules).encode())
    cpio.file("etc/boxvol/builtin", "".join(f"{n}\n" for n in builtins).encode())
    cpio.file("etc/boxvol/missing", "".join(f"{n}\n" for n in missing).encode())
    cpio.file("etc/boxvol/version", f"builder {BUILDER_VERSION}\nkernel {version}\n".encode())
    return gzip.compress(cpio.finish(), compresslevel=9, mtime=0)


# A bzImage carries its kernel as one compressed stream after the setup code; these magics find
# it. The kernel's own config says which (Debian: CONFIG_KERNEL_XZ).
_XZ_MAGIC = b"\xfd7zXZ\x00"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC = b"\x1f\x8b\x08"
# The ELF note that tells QEMU where a kernel's PVH entry is: XEN_ELFNOTE_PHYS32_ENTRY (18),
# name "Xen", a 4- or 8-byte address.
_PVH_NOTES = tuple(struct.pack("<III", 4, size, 18) + b"Xen\0" for size in (4, 8))


def _pvh_kernel(bzimage: bytes) -> bytes | None:
    """The ELF vmlinux inside a bzImage if it has a PVH entry point, else None."""
    payload: bytes | None = None
    if (at := bzimage.find(_XZ_MAGIC)) >= 0:
        try:
            payload = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[at:])
        except lzma.LZMAError as exc:
            log.debug("xz payload at %d did not decompress: %s", at, exc)
    elif (at := bzimage.find(_ZSTD_MAGIC)) >= 0:
        try:
            payload = subprocess.run(
                ["zstd", "-dcq"], input=bzimage[at:], check=False, capture_output=True
            ).stdout
        except OSError as exc:
            log.debug("zstd is not available for the kernel payload: %s", exc)
    elif (at := bzimage.find(_GZIP_MAGIC)) >= 0:
        try:
            payload = zlib.decompressobj(wbits=31).decompress(bzimage[at:])
        except zlib.error as exc:
            log.debug("gzip payload at %d did not decompress: %s", at, exc)
    if not payload or not payload.startswith(b"\x7fELF"):
        return None
    if not any(note in payload for note in _PVH_NOTES):
        return None
    return payload


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write beside the target and rename: a concurrent reader sees the old file or the new."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # 0644 whatever the umask: QEMU reads these as libvirt-qemu.
        Path(tmp).chmod(0o644)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_guest(
    out_dir: Path,
    *,
    kernel_version: str | None = None,
    busybox: Path = BUSYBOX,
    init: Path = INIT_SCRIPT,
    force: bool = False,
    pvh: bool = True,
) -> GuestImage:
    """Build (or find up to date) the kernel and initramfs of the test guest in `out_dir`.

    With `pvh` (the default) the kernel is the bzImage's ELF payload when it has a PVH entry;
    without, or when there is none, it is the bzImage itself.
    """
    version = kernel_version or installed_kernel_version()
    kernel_src = BOOT_DIR / f"vmlinuz-{version}"
    modules_dir = MODULES_ROOT / version
    for needed, package in (
        (kernel_src, KERNEL_PACKAGE),
        (modules_dir, KERNEL_PACKAGE),
        (busybox, "busybox-static"),
        (init, "this repository"),
    ):
        if not needed.exists():
            raise GuestBuildError(f"{needed} is missing (from {package})")

    modules, builtins, missing = resolve_modules(modules_dir)
    if missing:
        log.warning(
            "kernel %s has neither module nor built-in for: %s", version, ", ".join(missing)
        )
    if "virtiofs" in missing:
        raise GuestBuildError(f"kernel {version} has no virtiofs: the guest could not mount")

    kernel_bytes = kernel_src.read_bytes()
    busybox_bytes = busybox.read_bytes()
    init_bytes = init.read_bytes()
    module_bytes = [(m.name, _read_module(m.path)) for m in modules]
    stamp_digest = _digest(
        BUILDER_VERSION.encode(),
        version.encode(),
        kernel_bytes,
        busybox_bytes,
        init_bytes,
        *(n.encode() + b"\0" + d for n, d in module_bytes),
        ",".join(builtins).encode(),
        b"pvh" if pvh else b"bzimage",
    )

    if not out_dir.is_dir():
        out_dir.mkdir(parents=True)
        out_dir.chmod(0o755)  # whatever the umask: QEMU, as libvirt-qemu, must reach the files
    initrd = out_dir / f"initrd-{version}.img"
    stamp = out_dir / f"initrd-{version}.stamp"
    # The stamp: the digest, then the kernel file's name (which depends on PVH being found).
    if not force and stamp.is_file() and initrd.is_file():
        digest, _, kernel_name = stamp.read_text().partition("\n")
        kernel = out_dir / kernel_name.strip()
        if digest == stamp_digest and kernel_name.strip() and kernel.is_file():
            log.info("guest for kernel %s is up to date in %s", version, out_dir)
            return GuestImage(kernel, initrd, version, pvh=kernel.name.startswith("vmlinux-"))

    log.info(
        "building guest for kernel %s in %s (modules: %s; built in: %s)",
        version,
        out_dir,
        " ".join(n for n, _ in module_bytes) or "none",
        " ".join(builtins) or "none",
    )
    # No stamp while the outputs change: an interrupted build is rebuilt next time.
    stamp.unlink(missing_ok=True)
    vmlinux = _pvh_kernel(kernel_bytes) if pvh else None
    elf, bz = out_dir / f"vmlinux-{version}", out_dir / f"vmlinuz-{version}"
    if vmlinux is not None:
        kernel, stale = elf, bz
        _write_atomic(kernel, vmlinux)
    else:
        if pvh:
            log.warning("no PVH entry found in %s: booting the bzImage (slower)", kernel_src)
        kernel, stale = bz, elf
        _write_atomic(kernel, kernel_bytes)
    stale.unlink(missing_ok=True)  # the other form, from an earlier build
    _write_atomic(
        initrd, _initramfs(version, busybox_bytes, init_bytes, module_bytes, builtins, missing)
    )
    _write_atomic(stamp, f"{stamp_digest}\n{kernel.name}\n".encode())
    return GuestImage(kernel, initrd, version, pvh=vmlinux is not None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "out_dir",
        nargs="?",
        type=Path,
        default=None,
        help=f"output directory (default {default_out_dir()})",
    )
    parser.add_argument(
        "--kernel-version",
        help=f"a /lib/modules version (default: the one {KERNEL_PACKAGE} depends on)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument(
        "--no-pvh", action="store_true", help="keep the bzImage (do not extract the ELF kernel)"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    out_dir: Path = args.out_dir if args.out_dir is not None else default_out_dir()
    try:
        image = build_guest(
            out_dir, kernel_version=args.kernel_version, force=args.force, pvh=not args.no_pvh
        )
    except (GuestBuildError, OSError) as exc:
        log.error("%s", exc)
        return 1
    # The one output meant for a caller: shell assignments, `eval`-able.
    sys.stdout.write(
        f"KERNEL={shlex.quote(str(image.kernel))}\n"
        f"INITRD={shlex.quote(str(image.initrd))}\n"
        f"KERNEL_VERSION={shlex.quote(image.kernel_version)}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
