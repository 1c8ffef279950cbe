"""Export policies as views: each is the passthrough interface with one rule changed.

``ReadOnly`` answers EROFS to every mutation; ``OwnerMapped`` keeps the backing store's
ownership while the export presents one uid/gid, and so stores no setuid or setgid bit
(the backing owner is root's: such a bit would make a root setuid binary for every other
export and guest of the volume). They compose by inheritance over the stateless
``Passthrough``, so a policy lives in one class, not in checks across handlers.
``READ_OPERATIONS`` names what ``ReadOnly`` lets through; a test holds every other
operation of ``Passthrough`` to be refused, so a new mutating one cannot slip past it.
"""

from __future__ import annotations

import errno
import os

from volumed.fs import setid
from volumed.fs.passthrough import AttrChange, Caller, Passthrough

#: The operations of ``Passthrough`` that change nothing; ``ReadOnly`` refuses every other
#: (``open`` passes only without write flags).
READ_OPERATIONS = frozenset(
    {
        "lookup",
        "getattr",
        "readlink",
        "read",
        "fsync",
        "list_directory",
        "parent_attrs",
        "fsyncdir",
        "statfs",
        "getxattr",
        "listxattr",
        "permitted_mode",
    }
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


def _erofs() -> OSError:
    return OSError(errno.EROFS, "read-only export")


class ReadOnly(Passthrough):
    """Reads pass; every mutation fails with EROFS."""

    def setattr(
        self, fd: int, change: AttrChange, caller: Caller, io_fd: int | None = None
    ) -> os.stat_result:
        raise _erofs()

    def create(
        self, parent_fd: int, name: bytes, mode: int, flags: int, caller: Caller | None
    ) -> tuple[int, int, os.stat_result]:
        raise _erofs()

    def mknod(
        self, parent_fd: int, name: bytes, mode: int, rdev: int, caller: Caller | None
    ) -> tuple[int, os.stat_result]:
        raise _erofs()

    def mkdir(
        self, parent_fd: int, name: bytes, mode: int, caller: Caller | None
    ) -> tuple[int, os.stat_result]:
        raise _erofs()

    def symlink(
        self, parent_fd: int, name: bytes, target: bytes, caller: Caller | None
    ) -> tuple[int, os.stat_result]:
        raise _erofs()

    def link(self, fd: int, new_parent_fd: int, name: bytes) -> os.stat_result:
        raise _erofs()

    def unlink(self, parent_fd: int, name: bytes) -> None:
        raise _erofs()

    def rmdir(self, parent_fd: int, name: bytes) -> None:
        raise _erofs()

    def rename(
        self, old_parent_fd: int, old: bytes, new_parent_fd: int, new: bytes, flags: int
    ) -> None:
        raise _erofs()

    def open(self, fd: int, flags: int, caller: Caller | None = None) -> int:
        if flags & _WRITE_FLAGS:
            raise _erofs()
        return super().open(fd, flags, caller)

    def write(self, io_fd: int, offset: int, data: bytes, *, unprivileged: bool = False) -> int:
        raise _erofs()

    def setxattr(self, fd: int, name: bytes, value: bytes) -> None:
        raise _erofs()

    def removexattr(self, fd: int, name: bytes) -> None:
        raise _erofs()


class OwnerMapped(Passthrough):
    """Presents every file as ``uid``/``gid``; the backing files keep their own owners.

    New entries are not chowned to the caller (the backing owner stays the daemon's), and
    a chown is accepted only to the presented owner, where it changes no owner but clears
    set-id bits, as every chown does. No setuid or setgid bit is ever stored: whoever asks
    for one (chmod, create, mknod, mkdir, a new directory in a setgid one) gets the rest of
    the mode without it, silently, as the kernel drops S_ISGID.
    """

    def __init__(self, uid: int, gid: int) -> None:
        self.uid = uid
        self.gid = gid

    def permitted_mode(self, mode: int) -> int:
        """Never a set-id bit: it would be a root-owned one in the backing store."""
        return setid.without_set_id(mode)

    def setattr(
        self, fd: int, change: AttrChange, caller: Caller, io_fd: int | None = None
    ) -> os.stat_result:
        if change.uid not in (None, self.uid) or change.gid not in (None, self.gid):
            raise OSError(errno.EPERM, "ownership is fixed by the export's mapping")
        kept = AttrChange(
            mode=change.mode,
            size=change.size,
            atime_ns=change.atime_ns,
            mtime_ns=change.mtime_ns,
        )
        st = super().setattr(fd, kept, caller, io_fd)
        if change.uid is not None or change.gid is not None:
            # No chown reaches the backing file, so its kernel clears nothing: do it here.
            self._kill_set_id(fd, st)
            st = os.fstat(fd)
        return st

    def create(
        self, parent_fd: int, name: bytes, mode: int, flags: int, caller: Caller | None
    ) -> tuple[int, int, os.stat_result]:
        return super().create(parent_fd, name, mode, flags, None)

    def mknod(
        self, parent_fd: int, name: bytes, mode: int, rdev: int, caller: Caller | None
    ) -> tuple[int, os.stat_result]:
        return super().mknod(parent_fd, name, mode, rdev, None)

    def mkdir(
        self, parent_fd: int, name: bytes, mode: int, caller: Caller | None
    ) -> tuple[int, os.stat_result]:
        return super().mkdir(parent_fd, name, mode, None)

    def symlink(
        self, parent_fd: int, name: bytes, target: bytes, caller: Caller | None
    ) -> tuple[int, os.stat_result]:
        return super().symlink(parent_fd, name, target, None)


class ReadOnlyOwnerMapped(ReadOnly, OwnerMapped):
    """Both policies: read-only wins for mutations, the mapping for presentation."""


def make_view(*, read_only: bool, owner: tuple[int, int] | None) -> Passthrough:
    """The view enforcing an export's policy."""
    if owner is not None:
        cls = ReadOnlyOwnerMapped if read_only else OwnerMapped
        return cls(*owner)
    return ReadOnly() if read_only else Passthrough()


def presented_owner(view: Passthrough) -> tuple[int, int] | None:
    """The uid/gid every file is presented as, if the view maps ownership."""
    return (view.uid, view.gid) if isinstance(view, OwnerMapped) else None
