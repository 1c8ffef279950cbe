"""Sized volumes: a sparse ext4 image per volume, loop-mounted at the volume's directory.

The kernel enforces the cap: a write past the image's size fails with ENOSPC at native speed,
whatever exports the volume (direct virtio-fs, a FUSE view). Images live in ``<home>/images``
as ``<volume-id>.ext4``, never inside a volume. The image is made with ``mkfs.ext4``, checked
with ``e2fsck -p`` before every mount (a no-op on a clean filesystem, a journal replay and
repair after an unclean stop), mounted ``nosuid,nodev`` through a loop device that the kernel
frees on unmount (in the host's mount namespace: ``volumed.host_namespace``), and grown
offline with ``resize2fs``.

``ImageMounts`` is also the set of mounts boxvold made at volume directories, by mount id:
the gate accepts exactly those (``gate.NO_OWN_MOUNTS`` describes the seam) and refuses to
serve an image volume whose image is not mounted. The pure rules (journal size, mkfs
arguments, fsck verdicts) are functions apart from the subprocesses. Blocking: every method
of ``ImageMounts`` that touches the disk; the store calls them from worker threads.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence

from volumed.errors import DiskFull, ImageUnavailable, InUse, StorageError
from volumed.host_namespace import command_prefix
from volumed.locations import Layout
from volumed.model import Volume
from volumed.mounts import MountEntry, fdinfo_mount_id, parse_mountinfo

log = logging.getLogger(__name__)

#: Mount options of every image: no set-id program and no device node on it acts on the host.
NO_LOOP_OPTIONS = "nosuid,nodev,noatime,errors=remount-ro"
MOUNT_OPTIONS = "loop," + NO_LOOP_OPTIONS
#: One inode per this many bytes unless the volume asks for a count (ext4's usual ratio for
#: filesystems above 512M; mkfs's "small" ratio of 4K would spend 6% of a 64M image on inodes).
BYTES_PER_INODE = 16384
#: The journal: 1/64 of the image, from 1 MiB (mkfs's minimum) to 64 MiB.
MIN_JOURNAL_MIB = 1
MAX_JOURNAL_MIB = 64
SUFFIX = ".ext4"
_COMMAND_TIMEOUT = 600.0


def journal_mib(size_bytes: int) -> int:
    """The journal size for an image of ``size_bytes``, in MiB."""
    return max(MIN_JOURNAL_MIB, min(MAX_JOURNAL_MIB, size_bytes >> 26))


def mkfs_command(image: str, size_bytes: int, inode_limit: int | None) -> list[str]:
    """The ``mkfs.ext4`` call making a volume's filesystem in ``image`` (already sized)."""
    inodes = ["-N", str(inode_limit)] if inode_limit is not None else ["-i", str(BYTES_PER_INODE)]
    return [
        "mkfs.ext4",
        "-q",
        "-F",
        # No blocks reserved for root: the volume's owner gets its whole cap.
        "-m",
        "0",
        *inodes,
        "-J",
        f"size={journal_mib(size_bytes)}",
        # root_owner: the root directory is root's whatever runs mkfs; nodiscard: the
        # image is a fresh sparse file, nothing to discard.
        "-E",
        "root_owner=0:0,nodiscard",
        image,
    ]


@dataclasses.dataclass(frozen=True, slots=True)
class FsckVerdict:
    """What an ``e2fsck -p`` exit status means for mounting the image."""

    mountable: bool
    repaired: bool
    detail: str


def fsck_verdict(status: int, output: str) -> FsckVerdict:
    """Read ``e2fsck -p``'s exit status (e2fsck(8)): 0 clean, 1 or 2 errors corrected,
    4 and above errors left (or e2fsck failed): such an image is never mounted."""
    tail = output.strip().splitlines()[-1] if output.strip() else ""
    if status == 0:
        return FsckVerdict(True, False, "clean")
    if status in (1, 2, 3):
        return FsckVerdict(True, True, f"errors corrected ({tail})")
    return FsckVerdict(False, False, f"e2fsck -p exit status {status}: {tail or 'no output'}")


def image_mount_at(entries: Iterable[MountEntry], directory: str) -> MountEntry | None:
    """The topmost mount at ``directory`` (canonical), if any, from a mountinfo table."""
    found = None
    for entry in entries:
        if entry.mount_point == directory:
            found = entry
    return found


@dataclasses.dataclass(frozen=True, slots=True)
class ImageUsage:
    """A mounted image's filesystem, as ``statvfs`` reports it."""

    size_bytes: int
    used_bytes: int
    total_inodes: int
    used_inodes: int
    #: Host blocks the (sparse) image file takes.
    allocated_bytes: int


class ImageMounts:
    """The images under one home and the mounts boxvold made of them.

    ``in`` answers whether a mount id is one of those mounts (the gate's ``own_mounts``).
    """

    layout: Layout
    _ids: dict[str, int]
    _lock: threading.Lock

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        #: volume id -> mount id of its image, for the mounts made (or found) by this process.
        self._ids = {}
        self._lock = threading.Lock()

    def __contains__(self, mount_id: object) -> bool:
        with self._lock:
            return mount_id in self._ids.values()

    def path(self, volume: Volume) -> str:
        """The image file of ``volume``."""
        return os.path.join(self.layout.images, volume.id + SUFFIX)

    def is_mounted(self, volume: Volume) -> bool:
        """True while this process knows the volume's image is mounted."""
        with self._lock:
            return volume.id in self._ids

    # -- lifecycle ----------------------------------------------------------------------

    def make(self, volume: Volume, directory: str) -> None:
        """Create ``volume``'s image (sparse, its size), make its filesystem and mount it at
        ``directory``, whose root becomes 0700 (holding only ext4's lost+found, root's).
        All or nothing."""
        assert volume.size_bytes is not None
        image = self.path(volume)
        fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                os.ftruncate(fd, volume.size_bytes)
            finally:
                os.close(fd)
            _run(mkfs_command(image, volume.size_bytes, volume.inode_limit), "make the filesystem")
            self._mount(volume, image, directory)
            try:
                # lost+found stays: e2fsck wants it and would make it again anyway.
                os.chmod(directory, 0o700)
            except BaseException:
                self.unmount(volume, directory)
                raise
        except BaseException:
            _unlink_quietly(image)
            raise
        log.info(
            "image made id=%s size=%d inodes=%s", volume.id, volume.size_bytes, volume.inode_limit
        )

    def mount(self, volume: Volume, directory: str) -> FsckVerdict:
        """Check the image (``e2fsck -p``) and mount it at ``directory``; ImageUnavailable
        if it is missing or cannot be repaired (it is then left exactly as it is)."""
        image = self.path(volume)
        if not os.path.exists(image):
            raise ImageUnavailable(
                f"volume {volume.key!r} has no image ({image} is missing); its data is gone. "
                f"Remove the volume with 'boxvol rm {volume.key}'"
            )
        live = _loop_device_of(image)
        if live is not None:
            # Still attached: mounted in another mount namespace (a virtiofsd's sandbox that
            # outlived the last boxvold). Mount that very device: one superblock, no check of
            # a live filesystem, never a second loop device on the same image.
            log.info("image still attached id=%s device=%s", volume.id, live)
            self._mount(volume, live, directory)
            return FsckVerdict(True, False, f"still attached to {live}")
        verdict = self.check(volume)
        if not verdict.mountable:
            raise ImageUnavailable(
                f"volume {volume.key!r}: its image {image} is damaged beyond what 'e2fsck -p' "
                f"repairs ({verdict.detail}); it stays unmounted. Repair it by hand with "
                f"'e2fsck {image}', then restart boxvold"
            )
        self._mount(volume, image, directory)
        return verdict

    def check(self, volume: Volume, *, force: bool = False) -> FsckVerdict:
        """Run ``e2fsck -p`` (``-f``: even if it is marked clean) on the volume's unmounted
        image."""
        result = subprocess.run(
            ["e2fsck", *(["-f"] if force else []), "-p", self.path(volume)],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=_COMMAND_TIMEOUT,
            check=False,
        )
        verdict = fsck_verdict(result.returncode, result.stdout + result.stderr)
        if verdict.repaired or not verdict.mountable:
            log.warning("image checked id=%s result=%s", volume.id, verdict.detail)
        return verdict

    def _mount(self, volume: Volume, source: str, directory: str) -> None:
        """Mount ``source`` (the image, through a new loop device; or a loop device already
        attached to it) at ``directory`` and remember the mount's id."""
        options = MOUNT_OPTIONS if not source.startswith("/dev/") else NO_LOOP_OPTIONS
        _run(
            [*command_prefix(), "mount", "-t", "ext4", "-o", options, source, directory],
            "mount the image",
        )
        if not source.startswith("/dev/"):
            self._direct_io(volume, directory)
        fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        parent = os.open(os.path.dirname(directory), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            mount_id, parent_id = _fd_mount_id(fd), _fd_mount_id(parent)
        finally:
            os.close(fd)
            os.close(parent)
        if mount_id == parent_id:
            # Mounted in the host's namespace, but it did not propagate into ours: never
            # record the bare directory as the image.
            raise StorageError(
                f"the image of volume {volume.key!r} was mounted in the host's mount namespace "
                "but does not show in boxvold's: the host's mounts must propagate into "
                "boxvold's namespace (systemd does this; mount --make-rshared / does it by hand)"
            )
        with self._lock:
            self._ids[volume.id] = mount_id
        log.info("image mounted id=%s mount_id=%d", volume.id, mount_id)

    def _direct_io(self, volume: Volume, directory: str) -> None:
        """Switch the new loop device to direct I/O: the image's blocks are then cached once
        (in the volume's filesystem), not twice (also in the image file's page cache), which
        makes writes about 1.5x faster here (bench/storage.py). The kernel falls back to
        buffered I/O where the host filesystem cannot; a refusal is only logged."""
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as table:
            entry = image_mount_at(parse_mountinfo(table.read()), directory)
        if entry is None or not entry.source.startswith("/dev/loop"):
            return
        try:
            _run(
                ["losetup", "--direct-io=on", entry.source], "switch the loop device to direct I/O"
            )
        except StorageError as exc:
            log.warning("image without direct I/O id=%s reason=%s", volume.id, exc.message)

    def unmount(self, volume: Volume, directory: str) -> None:
        """Unmount the volume's image (never lazily: a busy volume raises InUse and stays
        mounted); the loop device goes with it."""
        try:
            _run([*command_prefix(), "umount", directory], "unmount the image")
        except StorageError as exc:
            if "busy" in exc.message:
                raise InUse(
                    f"volume {volume.key!r} is busy: a process has files open on it "
                    "(see 'fuser -vm' on its directory); close them and try again"
                ) from None
            raise
        with self._lock:
            self._ids.pop(volume.id, None)
        log.info("image unmounted id=%s", volume.id)

    def unmount_all(self, directories: dict[str, tuple[Volume, str]]) -> None:
        """Unmount every image this process has mounted (boxvold's stop); one that is busy
        stays mounted, logged, and the next boxvold adopts it."""
        with self._lock:
            mounted = list(self._ids)
        for volume_id in mounted:
            if volume_id not in directories:
                continue
            volume, directory = directories[volume_id]
            try:
                self.unmount(volume, directory)
            except (InUse, StorageError) as exc:
                log.warning("image left mounted id=%s reason=%s", volume_id, exc.message)

    def grow(self, volume: Volume, directory: str, size_bytes: int) -> None:
        """Grow the image to ``size_bytes`` and its filesystem with it, offline: unmount,
        extend the file, ``e2fsck -f``, ``resize2fs``, mount again. (Online growth needs
        CAP_SYS_RESOURCE, which a confined boxvold may lack, and a volume only grows while
        it is not exported.) A failure leaves the filesystem at its old size, mounted."""
        image = self.path(volume)
        old_size = os.stat(image).st_size
        self.unmount(volume, directory)
        holder = _still_attached(image)
        if holder is not None:
            # Still mounted in another mount namespace (a sandbox, a guest's virtiofsd):
            # its filesystem is live, never to be checked or resized from here.
            self._mount(volume, holder, directory)
            raise InUse(
                f"volume {volume.key!r} is still in use by another process (its filesystem "
                f"is mounted through {holder} elsewhere); stop what uses it and try again"
            )
        try:
            fd = os.open(image, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, size_bytes)
            finally:
                os.close(fd)
            self._check_before_growing(volume)
            _run(["resize2fs", image], "grow the filesystem")
        except BaseException:
            if _filesystem_bytes(image) <= old_size:
                os.truncate(image, old_size)
            self._mount(volume, image, directory)
            raise
        self._mount(volume, image, directory)
        log.info("image grown id=%s size=%d", volume.id, size_bytes)

    def _check_before_growing(self, volume: Volume) -> None:
        verdict = self.check(volume, force=True)
        if not verdict.mountable:
            raise ImageUnavailable(
                f"cannot grow volume {volume.key!r}: its filesystem has errors e2fsck -p "
                f"cannot repair ({verdict.detail})"
            )

    def adopt(self, volumes: Iterable[tuple[Volume, str]]) -> list[Volume]:
        """Take over the mounts of images a previous boxvold made (their loop device's backing
        file is the volume's image); returns the volumes whose image is not mounted."""
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as table:
            entries = parse_mountinfo(table.read())
        unmounted = []
        for volume, directory in volumes:
            entry = image_mount_at(entries, directory)
            if entry is not None and _backing_file(entry.source) == self.path(volume):
                with self._lock:
                    self._ids[volume.id] = entry.mount_id
                log.info("image adopted id=%s mount_id=%d", volume.id, entry.mount_id)
            else:
                unmounted.append(volume)
        return unmounted

    def usage(self, volume: Volume, directory: str) -> ImageUsage:
        """Size and use of the mounted image's filesystem, and what the image takes on the
        host."""
        st = os.statvfs(directory)
        try:
            allocated = os.stat(self.path(volume)).st_blocks * 512
        except FileNotFoundError:
            allocated = 0
        return ImageUsage(
            size_bytes=st.f_blocks * st.f_frsize,
            used_bytes=(st.f_blocks - st.f_bfree) * st.f_frsize,
            total_inodes=st.f_files,
            used_inodes=st.f_files - st.f_ffree,
            allocated_bytes=allocated,
        )


def _backing_file(source: str) -> str | None:
    """The file behind loop device ``source`` (``/dev/loopN``), if it is one."""
    if not source.startswith("/dev/loop"):
        return None
    name = os.path.basename(source)
    try:
        with open(f"/sys/block/{name}/loop/backing_file", encoding="utf-8") as backing:
            return backing.read().strip()
    except OSError:
        return None


def _filesystem_bytes(image: str) -> int:
    """The size the ext4 filesystem in ``image`` says it has (from ``dumpe2fs -h``)."""
    result = subprocess.run(
        ["dumpe2fs", "-h", image], capture_output=True, text=True, errors="replace", check=False
    )
    fields = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
    try:
        return int(fields["Block count"]) * int(fields["Block size"])
    except (KeyError, ValueError):
        return 0


#: Seconds the kernel gets to free an unmounted image's loop device (it may do so a moment
#: after the unmount returns) before the image counts as held by another mount namespace.
DETACH_GRACE = 2.0


def _still_attached(image: str) -> str | None:
    """The loop device still attached to ``image`` DETACH_GRACE after its last mount here
    went, if any: then another mount namespace holds it."""
    deadline = time.monotonic() + DETACH_GRACE
    while (device := _loop_device_of(image)) is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    return device


def _loop_device_of(image: str) -> str | None:
    """A loop device the kernel has attached to ``image``, if any."""
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return None
    for name in sorted(names):
        if name.startswith("loop") and _backing_file(f"/dev/{name}") == image:
            return f"/dev/{name}"
    return None


def _fd_mount_id(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as info:
        return fdinfo_mount_id(info.read())


def _run(argv: Sequence[str], what: str) -> None:
    try:
        result = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            errors="replace",
            timeout=_COMMAND_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StorageError(f"cannot {what}: {argv[0]}: {exc}") from exc
    if result.returncode != 0:
        output = " ".join((result.stderr or result.stdout).split()) or str(result.returncode)
        message = f"cannot {what}: {argv[0]} failed: {output}"
        if os.strerror(errno.ENOSPC) in output or "not enough space" in output.lower():
            raise DiskFull(message)
        raise StorageError(message)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:  # pragma: no cover - reported; gc finds the orphan image
        log.error("image cleanup failed path=%s error=%s", path, exc)
