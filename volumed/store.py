"""The volume store: creates, finds, lists, removes and measures managed volumes.

It owns the directories under the managed roots and keeps them in step with the registry:
every create and remove is all-or-nothing across row and directory. Directories are only
ever touched relative to root directory fds opened once, and volume data is reached only
through the gate. A volume whose directory is a mount boxvold did not make (``ForeignMount``)
is never measured, removed, pruned, adopted or quarantined: each such path refuses or skips
it and says so. Blocking: every public method does disk I/O; the daemon calls them from
worker threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import logging
import os
import shutil
import stat
import threading
from collections.abc import Container, Iterable, Iterator

from ulid import ULID

from volumed.errors import (
    AmbiguousReference,
    Conflict,
    DiskFull,
    ForeignMount,
    ImageUnavailable,
    InUse,
    InvalidArgument,
    NotFound,
    OutsideManagedRoots,
    StorageError,
)
from volumed.gate import check_not_mounted_over, foreign_mount, volume_directory
from volumed.gc import Finding, allocated_bytes, log_findings
from volumed.images import SUFFIX as IMAGE_SUFFIX
from volumed.images import ImageMounts, ImageUsage
from volumed.locations import Layout
from volumed.model import KINDS, ListFilter, Volume, VolumeKind
from volumed.mounts import mounts_below, parse_mountinfo
from volumed.names import (
    CONSUMER,
    check_labels,
    check_name,
    check_reference,
    is_id_prefix,
    is_valid_name,
    is_volume_id,
)
from volumed.registry import Registry
from volumed.reserve import DEFAULT_RESERVE_BYTES, Reserve
from volumed.sizes import check_fits, check_inodes, check_inodes_fit, check_size, format_size

log = logging.getLogger(__name__)

DIR_MODE = 0o700
#: Free space below which a change that writes the registry is refused before it starts.
MIN_WRITE_ROOM = 1 << 20


def utc_now() -> str:
    """The current time as RFC 3339 UTC, as records store it."""
    return (
        datetime.datetime.now(datetime.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


@dataclasses.dataclass(frozen=True, slots=True)
class VolumeState:
    """A volume with its live export count, as listings report it."""

    volume: Volume
    exports: int

    @property
    def in_use(self) -> bool:
        """True while the volume has live exports."""
        return self.exports > 0


@dataclasses.dataclass(frozen=True, slots=True)
class Usage:
    """Space and inodes a volume takes (hard links counted once); for a sized volume, also
    its image's filesystem (its size and inode count are the caps)."""

    bytes: int
    inodes: int
    image: ImageUsage | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ReconcileAction:
    """One repair made when the registry and the disk disagreed at start-up."""

    action: str
    kind: str
    key: str
    detail: str


def _open_dir(path: str) -> int:
    # Readable (not O_PATH): reconciliation lists these directories through the fd.
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _ensure_private_dir(path: str) -> None:
    os.makedirs(path, mode=DIR_MODE, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise StorageError(f"{path} is not a directory; move it away and start boxvold again")
    if stat.S_IMODE(st.st_mode) != DIR_MODE:
        os.chmod(path, DIR_MODE)


class VolumeStore:
    """Managed volumes under one home."""

    layout: Layout
    registry: Registry
    #: Sized volumes' images and their mounts. It is also ``own_mounts``: the mounts boxvold
    #: made at volume directories, which the gate accepts (see ``gate.NO_OWN_MOUNTS``).
    #: Exports reach volumes through the same set.
    images: ImageMounts
    own_mounts: Container[int]
    reserve: Reserve
    _root_fds: dict[str, int]
    _trash_fd: int
    _quarantine_fd: int

    def __init__(
        self, layout: Layout, registry: Registry, *, reserve: Reserve | None = None
    ) -> None:
        self.layout = layout
        self.registry = registry
        self.images = ImageMounts(layout)
        self.own_mounts = self.images
        self.reserve = reserve if reserve is not None else Reserve(layout.reserve)
        #: Volumes whose data a worker is reading or replacing (archive, restore), by id:
        #: what, and how many. Exports, removals and resizes wait for them to finish.
        self._busy: dict[str, tuple[str, int]] = {}
        self._busy_lock = threading.Lock()
        self._root_fds = {kind: _open_dir(layout.root(kind)) for kind in KINDS}
        self._trash_fd = _open_dir(layout.trash)
        self._quarantine_fd = _open_dir(layout.quarantine)

    @classmethod
    def open(cls, home: str, *, reserve_bytes: int | None = None) -> VolumeStore:
        """Create (0700) or open the home's layout and registry. On a nearly full home the
        reserve is released first, so that opening never needs free space."""
        layout = Layout(os.path.realpath(home))
        try:
            for path in (
                layout.home,
                layout.volumes,
                layout.named,
                layout.anonymous,
                layout.trash,
                layout.quarantine,
                layout.images,
            ):
                _ensure_private_dir(path)
        except OSError as exc:
            raise StorageError(
                f"cannot prepare the boxvol home {home}: {exc}; give boxvold a home it can "
                "write (--home or BOXVOL_HOME)"
            ) from exc
        reserve = Reserve(
            layout.reserve, DEFAULT_RESERVE_BYTES if reserve_bytes is None else reserve_bytes
        )
        reserve.release_if_low()
        return cls(layout, Registry(layout.registry), reserve=reserve)

    def close(self) -> None:
        """Unmount the images this store mounted, release the root fds and the registry."""
        self.images.unmount_all(
            {v.id: (v, self._directory(v)) for v in self.registry.all() if v.backing == "image"}
        )
        for fd in (*self._root_fds.values(), self._trash_fd, self._quarantine_fd):
            os.close(fd)
        self.registry.close()

    # -- create -------------------------------------------------------------------------

    def create(
        self,
        *,
        name: str | None = None,
        labels: dict[str, str] | None = None,
        size_bytes: int | None = None,
        inode_limit: int | None = None,
        consumer: str | None = None,
    ) -> Volume:
        """Create a named volume (``name`` given) or an anonymous one, all or nothing.

        With ``size_bytes`` the volume is an image of that size (``volumed.images``), made
        and mounted at its directory before the row commits.
        """
        if name is not None:
            check_name(name)
        check_labels(labels or {})
        if size_bytes is not None:
            check_size(size_bytes)
        if inode_limit is not None:
            check_inodes(inode_limit)
            if size_bytes is None:
                raise InvalidArgument(
                    "an inode limit needs a size (--size): both are properties of the "
                    "volume's own filesystem image"
                )
        if consumer is not None:
            CONSUMER.check(consumer)
        if size_bytes is not None:
            if inode_limit is not None:
                check_inodes_fit(size_bytes, inode_limit)
            self._check_fits("create a volume of", size_bytes)
        volume = Volume(
            id=str(ULID()),
            kind="named" if name is not None else "anonymous",
            created_at=utc_now(),
            name=name,
            labels=dict(labels or {}),
            size_bytes=size_bytes,
            inode_limit=inode_limit,
            consumer=consumer,
            backing="image" if size_bytes is not None else "directory",
        )
        root_fd = self._root_fds[volume.kind]
        made = False
        try:
            with self.registry.inserting(volume):
                try:
                    os.mkdir(volume.key, DIR_MODE, dir_fd=root_fd)
                except FileExistsError:
                    raise Conflict(
                        f"a directory for volume {volume.key!r} exists without a registry "
                        "record; restart boxvold so it reconciles (it adopts the directory)"
                    ) from None
                made = True
                # mkdir honours the umask; the mode must be exactly 0700 whatever it is.
                fd = os.open(
                    volume.key, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root_fd
                )
                try:
                    os.fchmod(fd, DIR_MODE)
                finally:
                    os.close(fd)
                if volume.backing == "image":
                    self.images.make(volume, self._directory(volume))
        except OSError as exc:
            self._undo_create(volume, made)
            if exc.errno == errno.ENOSPC:
                raise DiskFull(f"cannot create volume {volume.key!r}: {exc}") from exc
            raise StorageError(f"cannot create volume {volume.key!r}: {exc}") from exc
        except BaseException:
            self._undo_create(volume, made)
            raise
        log.info(
            "volume created id=%s name=%s kind=%s backing=%s size=%s",
            volume.id,
            volume.name,
            volume.kind,
            volume.backing,
            volume.size_bytes,
        )
        return volume

    def _undo_create(self, volume: Volume, made: bool) -> None:
        """Take back what a failed create made: the image's mount and file, the directory."""
        if not made:
            return
        if self.images.is_mounted(volume):
            try:
                self.images.unmount(volume, self._directory(volume))
            except BaseException as exc:  # pragma: no cover - reported; gc finds the rest
                log.error("create cleanup failed id=%s error=%s", volume.id, exc)
                return
        if volume.backing == "image":
            try:
                os.unlink(self.images.path(volume))
            except FileNotFoundError:
                pass
        self._rmdir_quietly(volume.key, self._root_fds[volume.kind])

    def _directory(self, volume: Volume) -> str:
        """The path of a volume's directory (a mount point, for a sized volume)."""
        return os.path.join(self.layout.root(volume.kind), volume.key)

    def _check_fits(self, what: str, size_bytes: int) -> None:
        space = self.host_space()
        check_fits(what, size_bytes, space["free_bytes"], self.reserve.target_bytes)

    def _rmdir_quietly(self, key: str, root_fd: int) -> None:
        try:
            os.rmdir(key, dir_fd=root_fd)
        except OSError as exc:  # pragma: no cover - reported, reconciliation finishes it
            log.error("cleanup failed key=%s error=%s", key, exc)

    # -- busy volumes -------------------------------------------------------------------

    @contextlib.contextmanager
    def occupied(self, volume: Volume, what: str, *, shared: bool = False) -> Iterator[None]:
        """Mark ``volume`` as busy with ``what`` ("being archived", "being restored") for
        the block: exports, removals, resizes and other exclusive work on it are refused
        meanwhile. ``shared`` work (archives) may overlap with more of the same."""
        with self._busy_lock:
            current = self._busy.get(volume.id)
            if current is not None and not (shared and current[0] == what):
                raise InUse(f"volume {volume.key!r} is {current[0]}; try again when that is done")
            self._busy[volume.id] = (what, (current[1] if current else 0) + 1)
        try:
            yield
        finally:
            with self._busy_lock:
                what_now, count = self._busy[volume.id]
                if count > 1:
                    self._busy[volume.id] = (what_now, count - 1)
                else:
                    del self._busy[volume.id]

    def check_not_busy(self, volume: Volume) -> None:
        """Raise InUse while a worker reads or replaces the volume's data."""
        with self._busy_lock:
            current = self._busy.get(volume.id)
        if current is not None:
            raise InUse(f"volume {volume.key!r} is {current[0]}; try again when that is done")

    # -- lookup -------------------------------------------------------------------------

    def resolve(self, ref: str) -> Volume:
        """The volume a reference names: a name, an id, or a unique id prefix."""
        check_reference(ref)
        volume = self.registry.by_name(ref)
        if volume is None and is_volume_id(ref):
            volume = self.registry.by_id(ref)
        if volume is None and is_id_prefix(ref):
            matches = self.registry.by_id_prefix(ref)
            if len(matches) > 1:
                raise AmbiguousReference(
                    f"{ref!r} is the start of several volume ids; give more characters"
                )
            volume = matches[0] if matches else None
        if volume is None:
            raise NotFound(
                f"no volume named {ref!r} or with that id; list volumes with 'boxvol ls'"
            )
        return volume

    def state(self, ref: str) -> VolumeState:
        """The volume a reference names, with its export count."""
        volume = self.resolve(ref)
        return VolumeState(volume, self.registry.export_counts().get(volume.id, 0))

    def list_volumes(self, where: ListFilter | None = None) -> list[VolumeState]:
        """Volumes passing ``where``, oldest first."""
        return [
            VolumeState(volume, exports)
            for volume, exports in self.registry.select(where or ListFilter())
        ]

    def list_json(self, where: ListFilter | None = None) -> str:
        """The same listing as a JSON array in the API's shape, built inside SQLite
        (a 10,000-volume listing is answered without a Python object per volume)."""
        return self.registry.select_json(where or ListFilter())

    # -- remove -------------------------------------------------------------------------

    def remove(self, ref: str, *, force: bool = False) -> Volume:
        """Remove a volume and its data; refused while in use unless ``force``.

        A sized volume's image is unmounted first (a busy one refuses, changing nothing).
        The directory (and image) are then renamed into the trash (atomic), the row goes, and
        the trash entries are deleted; a crash in between leaves trash that reconciliation
        clears, or puts back if the row stayed.
        """
        volume, present = self._check_removable(self.state(ref), force=force)
        root_fd = self._root_fds[volume.kind]
        unmounted = moved = image_moved = False
        try:
            with self.registry.deleting(volume.id):
                if self.images.is_mounted(volume):
                    self.images.unmount(volume, self._directory(volume))
                    unmounted = True
                if present:
                    os.rename(volume.key, volume.id, src_dir_fd=root_fd, dst_dir_fd=self._trash_fd)
                    moved = True
                if volume.backing == "image" and self._image_present(volume):
                    trashed = os.path.join(self.layout.trash, _trash_image(volume))
                    os.rename(self.images.path(volume), trashed)
                    image_moved = True
        except BaseException as exc:
            if image_moved:
                os.rename(
                    os.path.join(self.layout.trash, _trash_image(volume)), self.images.path(volume)
                )
            if moved:
                os.rename(volume.id, volume.key, src_dir_fd=self._trash_fd, dst_dir_fd=root_fd)
            if unmounted:
                self.images.mount(volume, self._directory(volume))
            if isinstance(exc, OSError):
                if exc.errno == errno.EBUSY:
                    # Mounted on since the check: say what, as the check would have.
                    self._check_removable(self.state(volume.id), force=True)
                raise StorageError(f"cannot remove volume {volume.key!r}: {exc}") from exc
            raise
        if moved:
            self._empty_trash_entry(volume.id)
        if image_moved:
            self._empty_trash_entry(_trash_image(volume))
        log.info("volume removed id=%s name=%s kind=%s", volume.id, volume.name, volume.kind)
        self.reserve.restore()  # back once there is room again (it checks; cheap otherwise)
        return volume

    def _image_present(self, volume: Volume) -> bool:
        return os.path.lexists(self.images.path(volume))

    # -- resize -------------------------------------------------------------------------

    def resize(self, ref: str, size_bytes: int) -> VolumeState:
        """Grow a sized volume's cap to ``size_bytes`` (its image and filesystem, online).

        Refused for a volume without a cap, for a smaller size, while the volume is exported
        and when the host cannot hold the growth; nothing changes then.
        """
        check_size(size_bytes)
        state = self.state(ref)
        volume = state.volume
        if volume.backing != "image" or volume.size_bytes is None:
            raise InvalidArgument(
                f"volume {volume.key!r} has no size cap (it was created without --size); a "
                "cap is given when a volume is created: create a sized one and copy the data "
                "over (boxvol archive, boxvol restore)"
            )
        if size_bytes < volume.size_bytes:
            raise InvalidArgument(
                f"cannot shrink volume {volume.key!r} from {format_size(volume.size_bytes)} "
                f"to {format_size(size_bytes)}: a mounted ext4 filesystem only grows, and a "
                "smaller cap could cut off data; create a smaller volume and copy the data over"
            )
        self.check_not_busy(volume)
        if state.in_use:
            raise InUse(
                f"volume {volume.key!r} is exported ({state.exports} export(s)); a volume "
                "grows only while it is not exported: remove its exports, resize, export again"
            )
        if size_bytes == volume.size_bytes:
            return state
        self._check_fits("grow a volume by", size_bytes - volume.size_bytes)
        directory = volume_directory(self.layout, volume, own_mounts=self.own_mounts)
        with self.registry.resizing(volume.id, size_bytes):
            self.images.grow(volume, directory, size_bytes)
        log.info("volume resized id=%s name=%s size=%d", volume.id, volume.name, size_bytes)
        return VolumeState(dataclasses.replace(volume, size_bytes=size_bytes), state.exports)

    def check_removable(self, ref: str, *, force: bool = False) -> None:
        """Raise what ``remove`` would refuse with, changing nothing: a caller that must undo
        other state first (exports) asks this before it starts."""
        self._check_removable(self.state(ref), force=force)

    def _check_removable(self, state: VolumeState, *, force: bool) -> tuple[Volume, bool]:
        """The volume and whether its directory is there; raises InUse, ForeignMount (on
        it or below it) or OutsideManagedRoots when a removal must not start."""
        volume = state.volume
        self.check_not_busy(volume)
        self.check_room(f"remove volume {volume.key!r}")
        if state.in_use and not force:
            raise InUse(
                f"volume {volume.key!r} is in use by {state.exports} export(s); stop what uses "
                f"it, or remove it anyway with 'boxvol rm -f {volume.key}'"
            )
        present = self._present(volume)
        if present:
            self._check_nothing_mounted_below(volume)
        return volume, present

    def check_room(self, what: str) -> None:
        """Raise DiskFull, before anything changes, if the home has less room than a registry
        write needs (MIN_WRITE_ROOM): a removal that failed half-way would tear exports down
        and keep the row."""
        free = self.host_space()["free_bytes"]
        if free < MIN_WRITE_ROOM:
            raise DiskFull(
                f"cannot {what}: the filesystem holding the boxvol home has "
                f"{free} bytes free, and the registry needs some room to record any change"
            )

    def _check_nothing_mounted_below(self, volume: Volume) -> None:
        # The rename into the trash carries a mount inside the directory along, and deleting
        # the trash entry would then delete the mounted data: refuse first.
        directory = os.path.join(self.layout.root(volume.kind), volume.key)
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as table:
            below = mounts_below(parse_mountinfo(table.read()), directory)
        if below:
            raise foreign_mount(f"volume {volume.key!r}", below[0].mount_point, below[0].mount_id)

    def _present(self, volume: Volume) -> bool:
        """True if the volume's directory is there; False if missing; raise if tampered or
        mounted on."""
        try:
            volume_directory(self.layout, volume, own_mounts=self.own_mounts)
        except ImageUnavailable:
            return True  # the bare directory under an image that is not mounted
        except OutsideManagedRoots:
            try:
                os.lstat(volume.key, dir_fd=self._root_fds[volume.kind])
            except FileNotFoundError:
                log.warning("volume directory missing id=%s key=%s", volume.id, volume.key)
                return False
            raise
        return True

    def _empty_trash_entry(self, entry: str) -> bool:
        """Delete a trash entry (a directory, or an image file); False (and logged) if the
        host refused."""
        try:
            if entry.endswith(IMAGE_SUFFIX):
                os.unlink(entry, dir_fd=self._trash_fd)
            else:
                shutil.rmtree(entry, dir_fd=self._trash_fd)
        except OSError as exc:
            log.error("trash cleanup failed entry=%s error=%s", entry, exc)
            return False
        return True

    def prune(self, *, all_volumes: bool = False) -> tuple[list[Volume], int]:
        """Remove unused anonymous volumes (every unused volume with ``all_volumes``).

        Returns the removed volumes and the bytes they took.
        """
        where = ListFilter(kind=None if all_volumes else "anonymous", in_use=False)
        removed: list[Volume] = []
        reclaimed = 0
        for state in self.list_volumes(where):
            try:
                usage = self.usage(state.volume)
                size = usage.image.allocated_bytes if usage.image is not None else usage.bytes
                removed.append(self.remove(state.volume.id))
            except (NotFound, InUse):
                continue  # removed or taken into use meanwhile
            except ForeignMount as exc:
                # Never removed through a mount; the rest of the prune goes on.
                log.warning("prune skipped id=%s reason=%s", state.volume.id, exc.message)
                continue
            reclaimed += size
        return removed, reclaimed

    # -- usage --------------------------------------------------------------------------

    def usage(self, volume: Volume) -> Usage:
        """Bytes (allocated blocks) and inodes under a volume directory; nothing (0, 0) for
        one the gate refuses, e.g. a mount over it: that is not the volume's usage."""
        try:
            directory = volume_directory(self.layout, volume, own_mounts=self.own_mounts)
        except OutsideManagedRoots:
            return Usage(0, 0)
        except (ForeignMount, ImageUnavailable) as exc:
            log.warning("usage not measured id=%s reason=%s", volume.id, exc.message)
            return Usage(0, 0)
        if volume.backing == "image":
            image = self.images.usage(volume, directory)
            return Usage(image.used_bytes, image.used_inodes, image)
        return tree_usage(directory, volume.id)

    def host_space(self) -> dict[str, int]:
        """Free and total bytes and inodes of the filesystem that holds the home."""
        st = os.statvfs(self.layout.home)
        return {
            "total_bytes": st.f_blocks * st.f_frsize,
            "free_bytes": st.f_bavail * st.f_frsize,
            "total_inodes": st.f_files,
            "free_inodes": st.f_favail,
        }

    # -- garbage collection -------------------------------------------------------------

    def collect_garbage(self, *, dry_run: bool) -> list[Finding]:
        """Find (and unless ``dry_run`` reclaim) what the home holds that no record owns:
        volume directories without a row and images no sized volume owns (quarantined, data
        kept), rows whose data is gone and that no export uses (forgotten), and trash
        (deleted). A foreign mount is never touched. Call with creates and removals held
        off (the writer limiter)."""
        findings: list[Finding] = []
        records = {(v.kind, v.key): v for v in self.registry.all()}
        exported = self.registry.export_counts()
        for entry in sorted(os.listdir(self._trash_fd)):
            trashed = os.path.join(self.layout.trash, entry)
            findings.append(Finding("trash", entry, tree_usage(trashed, entry).bytes, "delete"))
            if not dry_run:
                self._empty_trash_entry(entry)
        for kind in KINDS:
            root = self.layout.root(kind)
            for entry in sorted(os.listdir(self._root_fds[kind])):
                if (kind, entry) in records or self._foreign_mount_action(kind, entry):
                    continue
                path = os.path.join(root, entry)
                finding = Finding(
                    "orphan-directory", path, tree_usage(path, entry).bytes, "quarantine"
                )
                if not dry_run:
                    where = self._quarantine(kind, entry)
                    finding = dataclasses.replace(finding, detail=f"moved to {where}")
                findings.append(finding)
        for (kind, key), volume in records.items():
            if exported.get(volume.id) or self._data_present(volume):
                continue
            findings.append(
                Finding(
                    "row-without-data",
                    volume.id,
                    0,
                    "forget-row",
                    f"volume {key!r} ({kind}): its "
                    + ("image" if volume.backing == "image" else "directory")
                    + " is gone",
                )
            )
            if not dry_run:
                self._forget(volume)
        owned = {self.images.path(v) for v in records.values() if v.backing == "image"}
        for entry in sorted(os.listdir(self.layout.images)):
            path = os.path.join(self.layout.images, entry)
            if path in owned:
                continue
            finding = Finding("orphan-image", path, allocated_bytes(path), "quarantine")
            if not dry_run:
                target = os.path.join(self.layout.quarantine, f"image-{entry}-{utc_now()}")
                os.rename(path, target)
                finding = dataclasses.replace(finding, detail=f"moved to {target}")
            findings.append(finding)
        log_findings(findings, dry_run=dry_run)
        return findings

    def _data_present(self, volume: Volume) -> bool:
        if volume.backing == "image":
            return self._image_present(volume)
        return self._exists(volume.kind, volume.key)

    def _forget(self, volume: Volume) -> None:
        """Drop the row of a volume whose data is gone, and its empty mount point."""
        with self.registry.deleting(volume.id):
            pass
        with contextlib.suppress(OSError):
            os.rmdir(volume.key, dir_fd=self._root_fds[volume.kind])

    # -- reconciliation -----------------------------------------------------------------

    def reconcile(self) -> list[ReconcileAction]:
        """Bring registry and disk back in step after a crash or outside meddling.

        The rule (docs/registry.md): finish removals left in the trash; a record whose
        directory is missing gets an empty directory again (its data is already gone); a
        record whose directory was replaced by something else has that thing quarantined
        and an empty directory made; a directory without a record is adopted when its name
        is a valid volume name (named) or id (anonymous), and quarantined otherwise. Data is
        never deleted except what a removal had already taken.
        """
        actions: list[ReconcileAction] = []
        for entry in os.listdir(self._trash_fd):
            if entry.endswith(IMAGE_SUFFIX):
                actions.append(self._reconcile_trashed_image(entry))
                continue
            volume = self.registry.by_id(entry) if is_volume_id(entry) else None
            if volume is not None and not self._exists(volume.kind, volume.key):
                # The removal never committed: the volume is still registered, so its
                # directory goes back where it was.
                os.rename(
                    entry,
                    volume.key,
                    src_dir_fd=self._trash_fd,
                    dst_dir_fd=self._root_fds[volume.kind],
                )
                actions.append(
                    ReconcileAction(
                        "restored",
                        volume.kind,
                        volume.key,
                        "a removal was interrupted before it committed; the directory was put back",
                    )
                )
            elif self._empty_trash_entry(entry):
                actions.append(
                    ReconcileAction(
                        "finished-removal",
                        "trash",
                        entry,
                        "a removal was interrupted; its data was deleted",
                    )
                )
        records = {(v.kind, v.key): v for v in self.registry.all()}
        actions.extend(self._mount_images([v for v in records.values() if v.backing == "image"]))
        for (kind, key), volume in records.items():
            root_fd = self._root_fds[kind]
            mounted = self._foreign_mount_action(kind, key)
            if mounted is not None:
                actions.append(mounted)
                continue
            try:
                volume_directory(self.layout, volume, own_mounts=self.own_mounts)
                continue
            except ImageUnavailable:
                continue  # reported by _mount_images
            except OutsideManagedRoots:
                pass
            try:
                os.lstat(key, dir_fd=root_fd)
                self._quarantine(kind, key)
                detail = "its directory was replaced; the replacement was quarantined"
            except FileNotFoundError:
                detail = "its directory was missing"
            os.mkdir(key, DIR_MODE, dir_fd=root_fd)
            if volume.backing == "image":
                actions.append(
                    ReconcileAction("recreated-mount-point", kind, key, detail + "; made again")
                )
                actions.extend(self._mount_images([volume]))
                continue
            actions.append(
                ReconcileAction(
                    "recreated-empty", kind, key, detail + "; an empty directory was made"
                )
            )
        for kind in KINDS:
            root_fd = self._root_fds[kind]
            for entry in os.listdir(root_fd):
                if (kind, entry) in records:
                    continue
                mounted = self._foreign_mount_action(kind, entry)
                actions.append(mounted or self._adopt_or_quarantine(kind, entry, root_fd))
        actions.extend(self._quarantine_orphan_images(records.values()))
        for action in actions:
            log.warning(
                "reconcile action=%s kind=%s key=%s detail=%s",
                action.action,
                action.kind,
                action.key,
                action.detail,
            )
        return actions

    def _mount_images(self, volumes: list[Volume]) -> list[ReconcileAction]:
        """Adopt the image mounts a previous boxvold left, and check (``e2fsck -p``) and mount
        the others, before any export is re-armed. An image that is missing or cannot be
        repaired is reported and left as it is; the gate refuses its volume."""
        present = [v for v in volumes if os.path.isdir(self._directory(v))]
        actions = []
        for volume in self.images.adopt((v, self._directory(v)) for v in present):
            if self._foreign_mount_action(volume.kind, volume.key) is not None:
                continue  # reported by the records' pass; never mounted over
            try:
                verdict = self.images.mount(volume, self._directory(volume))
            except StorageError as exc:  # ImageUnavailable, or mount(8) refused
                actions.append(
                    ReconcileAction("image-unavailable", volume.kind, volume.key, exc.message)
                )
                continue
            if verdict.repaired:
                actions.append(
                    ReconcileAction(
                        "image-repaired",
                        volume.kind,
                        volume.key,
                        f"the image was not cleanly unmounted; e2fsck -p: {verdict.detail}",
                    )
                )
        return actions

    def _reconcile_trashed_image(self, entry: str) -> ReconcileAction:
        """An image a removal moved to the trash: put back if its volume's row stayed (the
        removal never committed), deleted otherwise."""
        volume_id = entry[: -len(IMAGE_SUFFIX)]
        volume = self.registry.by_id(volume_id) if is_volume_id(volume_id) else None
        if volume is not None and not self._image_present(volume):
            os.rename(os.path.join(self.layout.trash, entry), self.images.path(volume))
            return ReconcileAction(
                "restored", volume.kind, volume.key, "an interrupted removal's image was put back"
            )
        self._empty_trash_entry(entry)
        return ReconcileAction(
            "finished-removal", "trash", entry, "a removal was interrupted; its image was deleted"
        )

    def _quarantine_orphan_images(self, volumes: Iterable[Volume]) -> list[ReconcileAction]:
        """Images no sized volume owns are moved to the quarantine, never deleted."""
        owned = {self.images.path(v) for v in volumes if v.backing == "image"}
        actions = []
        for entry in sorted(os.listdir(self.layout.images)):
            path = os.path.join(self.layout.images, entry)
            if path in owned:
                continue
            target = os.path.join(self.layout.quarantine, f"image-{entry}-{utc_now()}")
            os.rename(path, target)
            actions.append(
                ReconcileAction(
                    "quarantined", "image", entry, f"an image no volume owns; moved to {target}"
                )
            )
        return actions

    def _foreign_mount_action(self, kind: VolumeKind, entry: str) -> ReconcileAction | None:
        """Report (and so leave alone) an entry that a foreign mount covers: quarantining it
        would fail (EBUSY, stopping the start), recreating or adopting it would act on the
        mounted data."""
        try:
            check_not_mounted_over(self.layout.root(kind), entry, own_mounts=self.own_mounts)
        except FileNotFoundError:
            return None
        except ForeignMount as exc:
            return ReconcileAction("foreign-mount", kind, entry, f"left as it is: {exc.message}")
        return None

    def _adopt_or_quarantine(self, kind: VolumeKind, entry: str, root_fd: int) -> ReconcileAction:
        st = os.lstat(entry, dir_fd=root_fd)
        valid = is_volume_id(entry) if kind == "anonymous" else is_valid_name(entry)
        # Anonymous directories are named by the upper-case id; another spelling of a
        # registered id is not adoptable (it would collide with that volume).
        if valid and kind == "anonymous" and entry != entry.upper():
            valid = self.registry.by_id(entry) is None and not self._exists(kind, entry.upper())
        if not (valid and stat.S_ISDIR(st.st_mode)):
            where = self._quarantine(kind, entry)
            return ReconcileAction(
                "quarantined", kind, entry, f"not a volume directory; moved to {where}"
            )
        volume = Volume(
            id=entry.upper() if kind == "anonymous" else str(ULID()),
            kind=kind,
            created_at=utc_now(),
            name=entry if kind == "named" else None,
            labels={"boxvol.adopted": utc_now()},
        )
        if entry != volume.key:
            os.rename(entry, volume.key, src_dir_fd=root_fd, dst_dir_fd=root_fd)
        fd = os.open(volume.key, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root_fd)
        try:
            os.fchmod(fd, DIR_MODE)
        finally:
            os.close(fd)
        with self.registry.inserting(volume):
            pass
        return ReconcileAction(
            "adopted", kind, entry, f"a directory without a record became volume {volume.id}"
        )

    def _exists(self, kind: str, key: str) -> bool:
        try:
            os.lstat(key, dir_fd=self._root_fds[kind])
        except FileNotFoundError:
            return False
        return True

    def _quarantine(self, kind: str, entry: str) -> str:
        target = f"{kind}-{entry}-{utc_now()}"
        os.rename(entry, target, src_dir_fd=self._root_fds[kind], dst_dir_fd=self._quarantine_fd)
        return os.path.join(self.layout.quarantine, target)


def tree_usage(path: str, what: str) -> Usage:
    """Allocated bytes and inodes at and under ``path`` (links not followed, hard links
    counted once); a failed walk is logged (naming ``what``) and what it counted returned."""
    try:
        st = os.lstat(path)
    except OSError:
        return Usage(0, 0)
    if not stat.S_ISDIR(st.st_mode):
        return Usage(st.st_blocks * 512, 1)
    seen: set[int] = set()
    total_bytes = 0
    inodes = 0
    try:
        for _dirpath, dirnames, filenames, dir_fd in os.fwalk(path):
            st = os.fstat(dir_fd)
            total_bytes += st.st_blocks * 512
            inodes += 1
            for entry in (*filenames, *(d for d in dirnames if _is_symlink(d, dir_fd))):
                try:
                    st = os.lstat(entry, dir_fd=dir_fd)
                except FileNotFoundError:
                    continue
                if st.st_nlink > 1:
                    if st.st_ino in seen:
                        continue
                    seen.add(st.st_ino)
                total_bytes += st.st_blocks * 512
                inodes += 1
    except OSError as exc:
        log.warning("usage walk failed what=%s error=%s", what, exc)
    return Usage(total_bytes, inodes)


def _trash_image(volume: Volume) -> str:
    """The trash entry of a removed volume's image."""
    return volume.id + IMAGE_SUFFIX


def _is_symlink(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False
