"""Export policies as views: each implements the passthrough interface (``View``).

``OwnerMapped`` is the passthrough with one rule changed: it keeps the backing store's
ownership while the export presents one uid/gid, and so stores no setuid or setgid bit (the
backing owner is root's: such a bit would make a root setuid binary for every other export
and guest of the volume). ``ReadOnly`` is a wrapper around any view, as virtiofsd's
read-only filesystem wraps its passthrough: every public operation of the interface is
sorted into ``READ_OPERATIONS`` (delegated to the wrapped view) or ``WRITE_OPERATIONS``
(EROFS), but ``open``, which it decides by the open's flags. An operation in neither fails
importing this module, and wrapping a view that has one fails too, so a new mutating
operation cannot slip through; the rule lives in these two sets, nowhere else.
"""

from __future__ import annotations

import errno
import os
from typing import Any, NoReturn

from volumed.fs import setid
from volumed.fs.passthrough import AttrChange, Caller, Passthrough, View

#: Operations that change nothing: ``ReadOnly`` hands them to the view it wraps.
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
#: Operations that change the volume: ``ReadOnly`` answers EROFS without calling anything.
WRITE_OPERATIONS = frozenset(
    {
        "setattr",
        "create",
        "mknod",
        "mkdir",
        "symlink",
        "link",
        "unlink",
        "rmdir",
        "rename",
        "write",
        "setxattr",
        "removexattr",
    }
)
#: Flags that make an open one for writing (or truncating, or creating).
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


def _refuse(*args: object, **kwargs: object) -> NoReturn:
    raise OSError(errno.EROFS, "read-only export")


def public_operations(cls: type) -> frozenset[str]:
    """Every public member of a view class: each is an operation some policy must decide."""
    return frozenset(name for name in dir(cls) if not name.startswith("_"))


def _check_sorted(cls: type) -> None:
    """TypeError unless ``ReadOnly`` decides every operation of ``cls``."""
    unsorted = public_operations(cls) - READ_OPERATIONS - WRITE_OPERATIONS - _BY_ARGUMENTS
    if unsorted:
        raise TypeError(
            f"read-only view of {cls.__name__}: {', '.join(sorted(unsorted))} in neither "
            "views.READ_OPERATIONS nor views.WRITE_OPERATIONS; sort each there"
        )


class ReadOnly:
    """Wraps a view: reads pass to it, every mutation fails with EROFS.

    Every operation but ``open`` is found through ``__getattr__``, from the two sets above;
    a name in neither is no attribute at all, so nothing unsorted is ever called.
    """

    def __init__(self, inner: View) -> None:
        _check_sorted(type(inner))  # a view with an operation of its own cannot be wrapped
        #: The view reads are delegated to (its presentation, e.g. an owner mapping, holds).
        self.inner = inner

    def open(self, fd: int, flags: int, caller: Caller | None = None) -> int:
        """Open for reading only; any write flag (also O_TRUNC, O_APPEND) is EROFS."""
        if flags & _WRITE_FLAGS:
            _refuse()
        return self.inner.open(fd, flags, caller)

    def __getattr__(self, name: str) -> Any:
        # Only called for names not found on the instance or its class: the operations.
        if name in READ_OPERATIONS:
            return getattr(self.inner, name)
        if name in WRITE_OPERATIONS:
            return _refuse
        raise AttributeError(name)


#: What ``ReadOnly`` decides itself, by the arguments: ``open``.
_BY_ARGUMENTS = public_operations(ReadOnly)

# The import fails unless every operation of the interface, and of its implementation, is
# decided exactly once, and each set names only operations that exist.
_check_sorted(View)
_check_sorted(Passthrough)
if (
    READ_OPERATIONS & WRITE_OPERATIONS
    or _BY_ARGUMENTS & (READ_OPERATIONS | WRITE_OPERATIONS)
    or public_operations(View) != READ_OPERATIONS | WRITE_OPERATIONS | _BY_ARGUMENTS
):
    raise TypeError("read-only view: an operation sorted twice, or one that does not exist")


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


def make_view(*, read_only: bool, owner: tuple[int, int] | None) -> View:
    """The view enforcing an export's policy."""
    view: View = Passthrough() if owner is None else OwnerMapped(*owner)
    return ReadOnly(view) if read_only else view


def presented_owner(view: View) -> tuple[int, int] | None:
    """The uid/gid every file is presented as, if the view (or one it wraps) maps ownership."""
    while isinstance(view, ReadOnly):
        view = view.inner
    return (view.uid, view.gid) if isinstance(view, OwnerMapped) else None
