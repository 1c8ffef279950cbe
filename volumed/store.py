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

import dataclasses
import datetime
import errno
import logging
import os
import shutil
import stat
from collections.abc import Container

from ulid import ULID

from volumed.errors import (
    AmbiguousReference,
    Conflict,
    ForeignMount,
    InUse,
    NotFound,
    OutsideManagedRoots,
    StorageError,
)
from volumed.gate import NO_OWN_MOUNTS, check_not_mounted_over, foreign_mount, volume_directory
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
from volumed.sizes import check_inodes, check_size

log = logging.getLogger(__name__)

DIR_MODE = 0o700


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
    """Space and inodes a volume directory takes (hard links counted once)."""

    bytes: int
    inodes: int


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
    #: Mount ids of mounts boxvold made at volume directories; the gate accepts those (see
    #: ``gate.NO_OWN_MOUNTS``). Exports reach volumes through the same set.
    own_mounts: Container[int]
    _root_fds: dict[str, int]
    _trash_fd: int
    _quarantine_fd: int

    def __init__(
        self, layout: Layout, registry: Registry, *, own_mounts: Container[int] = NO_OWN_MOUNTS
    ) -> None:
        self.layout = layout
        self.registry = registry
        self.own_mounts = own_mounts
        self._root_fds = {kind: _open_dir(layout.root(kind)) for kind in KINDS}
        self._trash_fd = _open_dir(layout.trash)
        self._quarantine_fd = _open_dir(layout.quarantine)

    @classmethod
    def open(cls, home: str) -> VolumeStore:
        """Create (0700) or open the home's layout and registry."""
        layout = Layout(os.path.realpath(home))
        try:
            for path in (
                layout.home,
                layout.volumes,
                layout.named,
                layout.anonymous,
                layout.trash,
                layout.quarantine,
            ):
                _ensure_private_dir(path)
        except OSError as exc:
            raise StorageError(
                f"cannot prepare the boxvol home {home}: {exc}; give boxvold a home it can "
                "write (--home or BOXVOL_HOME)"
            ) from exc
        return cls(layout, Registry(layout.registry))

    def close(self) -> None:
        """Release the root fds and the registry."""
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
        """Create a named volume (``name`` given) or an anonymous one, all or nothing."""
        if name is not None:
            check_name(name)
        check_labels(labels or {})
        if size_bytes is not None:
            check_size(size_bytes)
        if inode_limit is not None:
            check_inodes(inode_limit)
        if consumer is not None:
            CONSUMER.check(consumer)
        volume = Volume(
            id=str(ULID()),
            kind="named" if name is not None else "anonymous",
            created_at=utc_now(),
            name=name,
            labels=dict(labels or {}),
            size_bytes=size_bytes,
            inode_limit=inode_limit,
            consumer=consumer,
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
        except OSError as exc:
            if made:
                self._rmdir_quietly(volume.key, root_fd)
            raise StorageError(f"cannot create volume {volume.key!r}: {exc}") from exc
        except BaseException:
            if made:
                self._rmdir_quietly(volume.key, root_fd)
            raise
        log.info("volume created id=%s name=%s kind=%s", volume.id, volume.name, volume.kind)
        return volume

    def _rmdir_quietly(self, key: str, root_fd: int) -> None:
        try:
            os.rmdir(key, dir_fd=root_fd)
        except OSError as exc:  # pragma: no cover - reported, reconciliation finishes it
            log.error("cleanup failed key=%s error=%s", key, exc)

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

        The directory is first renamed into the trash (atomic), then the row goes, then the
        trash entry is deleted; a crash in between leaves trash that reconciliation clears.
        """
        volume, present = self._check_removable(self.state(ref), force=force)
        root_fd = self._root_fds[volume.kind]
        moved = False
        try:
            with self.registry.deleting(volume.id):
                if present:
                    os.rename(volume.key, volume.id, src_dir_fd=root_fd, dst_dir_fd=self._trash_fd)
                    moved = True
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                # Mounted on since the check: say what, as the check would have.
                self._check_removable(self.state(volume.id), force=True)
            raise StorageError(f"cannot remove volume {volume.key!r}: {exc}") from exc
        except BaseException:
            if moved:
                os.rename(volume.id, volume.key, src_dir_fd=self._trash_fd, dst_dir_fd=root_fd)
            raise
        if moved:
            self._empty_trash_entry(volume.id)
        log.info("volume removed id=%s name=%s kind=%s", volume.id, volume.name, volume.kind)
        return volume

    def check_removable(self, ref: str, *, force: bool = False) -> None:
        """Raise what ``remove`` would refuse with, changing nothing: a caller that must undo
        other state first (exports) asks this before it starts."""
        self._check_removable(self.state(ref), force=force)

    def _check_removable(self, state: VolumeState, *, force: bool) -> tuple[Volume, bool]:
        """The volume and whether its directory is there; raises InUse, ForeignMount (on
        it or below it) or OutsideManagedRoots when a removal must not start."""
        volume = state.volume
        if state.in_use and not force:
            raise InUse(
                f"volume {volume.key!r} is in use by {state.exports} export(s); stop what uses "
                f"it, or remove it anyway with 'boxvol rm -f {volume.key}'"
            )
        present = self._present(volume)
        if present:
            self._check_nothing_mounted_below(volume)
        return volume, present

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
        except OutsideManagedRoots:
            try:
                os.lstat(volume.key, dir_fd=self._root_fds[volume.kind])
            except FileNotFoundError:
                log.warning("volume directory missing id=%s key=%s", volume.id, volume.key)
                return False
            raise
        return True

    def _empty_trash_entry(self, entry: str) -> bool:
        """Delete a trash entry; False (and logged) if the host refused."""
        try:
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
                size = self.usage(state.volume).bytes
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
        except ForeignMount as exc:
            log.warning("usage not measured id=%s reason=%s", volume.id, exc.message)
            return Usage(0, 0)
        seen: set[int] = set()
        total_bytes = 0
        inodes = 0
        try:
            for _dirpath, dirnames, filenames, dir_fd in os.fwalk(directory):
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
            log.warning("usage walk failed id=%s error=%s", volume.id, exc)
        return Usage(total_bytes, inodes)

    def host_space(self) -> dict[str, int]:
        """Free and total bytes and inodes of the filesystem that holds the home."""
        st = os.statvfs(self.layout.home)
        return {
            "total_bytes": st.f_blocks * st.f_frsize,
            "free_bytes": st.f_bavail * st.f_frsize,
            "total_inodes": st.f_files,
            "free_inodes": st.f_favail,
        }

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
        for (kind, key), volume in records.items():
            root_fd = self._root_fds[kind]
            mounted = self._foreign_mount_action(kind, key)
            if mounted is not None:
                actions.append(mounted)
                continue
            try:
                volume_directory(self.layout, volume, own_mounts=self.own_mounts)
                continue
            except OutsideManagedRoots:
                pass
            try:
                os.lstat(key, dir_fd=root_fd)
                self._quarantine(kind, key)
                detail = "its directory was replaced; the replacement was quarantined"
            except FileNotFoundError:
                detail = "its directory was missing"
            os.mkdir(key, DIR_MODE, dir_fd=root_fd)
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
        for action in actions:
            log.warning(
                "reconcile action=%s kind=%s key=%s detail=%s",
                action.action,
                action.kind,
                action.key,
                action.detail,
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


def _is_symlink(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False
