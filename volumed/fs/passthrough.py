"""Blocking, confined filesystem operations on one volume.

Every call works relative to an ``O_PATH | O_NOFOLLOW`` fd and a single name component
(or on the fd itself); nothing is ever resolved from a path string built from a request,
and a symlink is never followed: it is data. Regular files and directories are reopened
for I/O through ``/proc/self/fd``, as virtiofsd does. Errors are ``OSError`` with the errno
the caller should see. Blocking: every method does syscalls; call from a worker thread.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import stat
from typing import Protocol

from volumed.fs import setid

_libc = ctypes.CDLL(None, use_errno=True)
_AT_EMPTY_PATH = 0x1000
_AT_SYMLINK_NOFOLLOW = 0x100
_UTIME_OMIT = (1 << 30) - 2
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_RENAME_FLAGS = RENAME_NOREPLACE | RENAME_EXCHANGE
#: Flags of a FUSE open that must not reach the reopen of an existing inode: the kernel
#: has resolved the name already, and the /proc/self/fd reopen is itself a (magic) link.
_OPEN_DROP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW
PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


def _check(result: int) -> None:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


#: An ``O_PATH`` fd of the host's /proc, set in a sandboxed export server (its root is the
#: volume, so a path "/proc/..." would resolve inside the volume): magic links and process
#: status are reached through it. None in a process that sees the host's /proc.
_proc_dir: int | None = None


def use_proc_dir(fd: int) -> None:
    """Reach /proc through ``fd`` from now on (an export server, before its root changes)."""
    global _proc_dir
    _proc_dir = fd


def _in_proc(relative: str) -> tuple[str, int | None]:
    """``relative`` (under /proc) as a name and the directory fd to resolve it in."""
    if _proc_dir is None:
        return f"/proc/{relative}", None
    return relative, _proc_dir


def reopen(fd: int, flags: int) -> int:
    """A new fd of ``fd``'s inode through its magic link (never a path from a request)."""
    name, dir_fd = _in_proc(f"self/fd/{fd}")
    return os.open(name, flags | os.O_CLOEXEC, dir_fd=dir_fd)


def check_name(name: bytes) -> bytes:
    """Refuse the names that would leave the directory they are looked up in."""
    if name in (b".", b"..") or b"/" in name or not name:
        raise OSError(errno.EINVAL, "invalid name")
    return name


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    """Who asked: new entries belong to them, as on a local filesystem.

    FUSE tells the uid, gid and pid of a request, not its supplementary groups; the set-id
    rules need them only to keep S_ISGID for a group other than the caller's own, and
    ``in_group`` then reads them from ``/proc/<pid>/status``. Deciding on the primary group
    alone would strip S_ISGID from a team directory a member chmods g+s. When they cannot
    be read, or the process there no longer acts as ``uid``/``gid`` (it died and its pid
    was reused), the answer is no: the bit is dropped, never kept by mistake.
    """

    uid: int
    gid: int
    #: Supplementary groups known without asking /proc (tests and callers that know them).
    groups: frozenset[int] = frozenset()
    #: The requesting thread in boxvold's pid namespace; 0 when unknown.
    pid: int = 0

    @property
    def privileged(self) -> bool:
        """Root keeps setuid bits on write and may chown freely (CAP_FSETID, CAP_CHOWN)."""
        return self.uid == 0

    def in_group(self, gid: int) -> bool:
        """Whether ``gid`` is the caller's group or a supplementary one. Blocking: may read
        /proc, so it is asked only when a set-id bit depends on it."""
        if gid == self.gid or gid in self.groups:
            return True
        return self.pid > 0 and gid in _supplementary_groups(self.pid, self.uid, self.gid)


def _supplementary_groups(pid: int, uid: int, gid: int) -> frozenset[int]:
    """Blocking: the groups of thread ``pid`` if its filesystem ids are still uid/gid."""
    name, dir_fd = _in_proc(f"{pid}/status")
    try:
        status = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            text = os.read(status, 65536)
        finally:
            os.close(status)
    except OSError:
        return frozenset()
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(b":")
        fields[key] = value.split()
    try:
        # Uid: and Gid: list real, effective, saved and filesystem ids; FUSE sends the last.
        if int(fields[b"Uid"][3]) != uid or int(fields[b"Gid"][3]) != gid:
            return frozenset()
        return frozenset(int(group) for group in fields[b"Groups"])
    except (KeyError, IndexError, ValueError):
        return frozenset()


@dataclasses.dataclass(frozen=True, slots=True)
class AttrChange:
    """What a setattr asks for; None means leave as is."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


class View(Protocol):
    """The filesystem interface of one volume, as the FUSE edge calls it.

    ``Passthrough`` implements it; a policy is another implementation of it (``views.py``):
    a subclass changing one rule, or ``ReadOnly``, a wrapper that decides every operation.
    Each method is documented on ``Passthrough``.
    """

    def permitted_mode(self, mode: int) -> int: ...
    def lookup(self, parent_fd: int, name: bytes) -> tuple[int, os.stat_result]: ...
    def getattr(self, fd: int) -> os.stat_result: ...
    def setattr(
        self, fd: int, change: AttrChange, caller: Caller, io_fd: int | None = None
    ) -> os.stat_result: ...
    def readlink(self, fd: int) -> bytes: ...
    def create(
        self, parent_fd: int, name: bytes, mode: int, flags: int, caller: Caller | None
    ) -> tuple[int, int, os.stat_result]: ...
    def mknod(
        self, parent_fd: int, name: bytes, mode: int, rdev: int, caller: Caller | None
    ) -> tuple[int, os.stat_result]: ...
    def mkdir(
        self, parent_fd: int, name: bytes, mode: int, caller: Caller | None
    ) -> tuple[int, os.stat_result]: ...
    def symlink(
        self, parent_fd: int, name: bytes, target: bytes, caller: Caller | None
    ) -> tuple[int, os.stat_result]: ...
    def link(self, fd: int, new_parent_fd: int, name: bytes) -> os.stat_result: ...
    def unlink(self, parent_fd: int, name: bytes) -> None: ...
    def rmdir(self, parent_fd: int, name: bytes) -> None: ...
    def rename(
        self, old_parent_fd: int, old: bytes, new_parent_fd: int, new: bytes, flags: int
    ) -> None: ...
    def open(self, fd: int, flags: int, caller: Caller | None = None) -> int: ...
    def read(self, io_fd: int, offset: int, size: int) -> bytes: ...
    def write(self, io_fd: int, offset: int, data: bytes, *, unprivileged: bool = False) -> int: ...
    def fsync(self, io_fd: int, datasync: bool) -> None: ...
    def list_directory(self, fd: int) -> list[bytes]: ...
    def parent_attrs(self, fd: int) -> os.stat_result: ...
    def fsyncdir(self, fd: int, datasync: bool) -> None: ...
    def statfs(self, fd: int) -> os.statvfs_result: ...
    def getxattr(self, fd: int, name: bytes) -> bytes: ...
    def listxattr(self, fd: int) -> list[bytes]: ...
    def setxattr(self, fd: int, name: bytes, value: bytes) -> None: ...
    def removexattr(self, fd: int, name: bytes) -> None: ...


class Passthrough:
    """``View`` implemented: operations on the backing files of one volume, confined to it.

    Device nodes are never created here, whatever the export: a device node in a volume
    is a door to the host's devices for the next consumer. Every mode this class stores
    goes through ``_chmod``, so a view decides in ``permitted_mode`` which bits may ever
    reach the backing store; set-id bits follow the caller's credentials (``setid``).
    """

    def permitted_mode(self, mode: int) -> int:
        """The part of ``mode`` this view may store (all of it: the backing owners are the
        ones it presents)."""
        return mode

    def _chmod(self, fd: int, mode: int) -> None:
        name, dir_fd = _in_proc(f"self/fd/{fd}")
        os.chmod(name, self.permitted_mode(stat.S_IMODE(mode)), dir_fd=dir_fd)

    def _kill_set_id(self, fd: int, st: os.stat_result) -> None:
        """Clear set-id bits as an unprivileged write, truncate or chown does on ext4."""
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISREG(st.st_mode) and setid.killed_mode(mode) != mode:
            self._chmod(fd, setid.killed_mode(mode))

    # -- lookup and attributes -------------------------------------------------------

    def lookup(self, parent_fd: int, name: bytes) -> tuple[int, os.stat_result]:
        """An O_PATH fd for ``name`` in the parent, and its attributes."""
        fd = os.open(check_name(name), PATH_FLAGS, dir_fd=parent_fd)
        try:
            return fd, os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise

    def getattr(self, fd: int) -> os.stat_result:
        """Attributes of the inode behind ``fd``."""
        return os.fstat(fd)

    def setattr(
        self, fd: int, change: AttrChange, caller: Caller, io_fd: int | None = None
    ) -> os.stat_result:
        """Apply a setattr (chmod, chown, truncate, utimens) and return the new attributes."""
        st = os.fstat(fd)
        is_link = stat.S_ISLNK(st.st_mode)
        if change.size is not None:
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL, "")
            if io_fd is not None:
                os.ftruncate(io_fd, change.size)
            else:
                writable = reopen(fd, os.O_WRONLY | os.O_NONBLOCK)
                try:
                    os.ftruncate(writable, change.size)
                finally:
                    os.close(writable)
            if not caller.privileged:
                self._kill_set_id(fd, st)
        if change.uid is not None or change.gid is not None:
            # The backing kernel clears the set-id bits of a chowned file itself.
            uid = -1 if change.uid is None else change.uid
            gid = -1 if change.gid is None else change.gid
            _check(_libc.fchownat(fd, b"", uid, gid, _AT_EMPTY_PATH | _AT_SYMLINK_NOFOLLOW))
        if change.mode is not None:
            if is_link:
                raise OSError(errno.EOPNOTSUPP, "symlinks have no mode of their own")
            gid = st.st_gid if change.gid is None else change.gid
            self._chmod(fd, setid.chmod_mode(change.mode, gid, caller))
        if change.atime_ns is not None or change.mtime_ns is not None:
            times = (_Timespec * 2)()
            for slot, value in enumerate((change.atime_ns, change.mtime_ns)):
                if value is None:
                    times[slot].tv_sec, times[slot].tv_nsec = 0, _UTIME_OMIT
                else:
                    times[slot].tv_sec, times[slot].tv_nsec = divmod(value, 1_000_000_000)
            _check(_libc.utimensat(fd, b"", times, _AT_EMPTY_PATH | _AT_SYMLINK_NOFOLLOW))
        return os.fstat(fd)

    def readlink(self, fd: int) -> bytes:
        """The target of a symlink, as data."""
        return os.readlink(b"", dir_fd=fd)

    # -- creating entries ------------------------------------------------------------

    def _owner_for_new(self, parent_fd: int, caller: Caller | None) -> tuple[int, int, bool]:
        """(uid, gid, parent is setgid) for a new entry; uid -1 keeps the daemon's own."""
        parent = os.fstat(parent_fd)
        setgid_parent = bool(parent.st_mode & stat.S_ISGID)
        if caller is None:
            return -1, -1, setgid_parent
        gid = parent.st_gid if setgid_parent else caller.gid
        return caller.uid, gid, setgid_parent

    def _finish_new(
        self,
        fd: int,
        mode: int,
        owner: tuple[int, int, bool],
        caller: Caller | None,
        *,
        is_dir: bool = False,
        is_link: bool = False,
    ) -> os.stat_result:
        uid, gid, setgid_parent = owner
        if uid != -1:
            # chown before chmod: a chown clears setuid/setgid bits.
            _check(_libc.fchownat(fd, b"", uid, gid, _AT_EMPTY_PATH | _AT_SYMLINK_NOFOLLOW))
        if not is_link:
            wanted = stat.S_IMODE(mode)
            if is_dir and setgid_parent:
                wanted |= stat.S_ISGID
            elif not is_dir and caller is not None:
                wanted = setid.new_file_mode(wanted, gid, caller)
            self._chmod(fd, wanted)
        return os.fstat(fd)

    def _remove_new(self, parent_fd: int, name: bytes, is_dir: bool) -> None:
        try:
            if is_dir:
                os.rmdir(name, dir_fd=parent_fd)
            else:
                os.unlink(name, dir_fd=parent_fd)
        except OSError:
            pass

    def create(
        self, parent_fd: int, name: bytes, mode: int, flags: int, caller: Caller | None
    ) -> tuple[int, int, os.stat_result]:
        """Create and open a regular file: (io fd, O_PATH fd, attributes)."""
        owner = self._owner_for_new(parent_fd, caller)
        open_flags = (flags & ~os.O_NOCTTY) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        io_fd = os.open(check_name(name), open_flags, 0o600, dir_fd=parent_fd)
        try:
            # Follows the magic link on purpose: it names the file just created.
            fd = reopen(io_fd, os.O_PATH)
            try:
                st = self._finish_new(fd, mode, owner, caller)
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            os.close(io_fd)
            self._remove_new(parent_fd, name, is_dir=False)
            raise
        return io_fd, fd, st

    def mknod(
        self, parent_fd: int, name: bytes, mode: int, rdev: int, caller: Caller | None
    ) -> tuple[int, os.stat_result]:
        """Create a regular file, FIFO or socket; device nodes are refused (EPERM)."""
        kind = stat.S_IFMT(mode)
        if kind in (stat.S_IFBLK, stat.S_IFCHR):
            raise OSError(errno.EPERM, "device nodes are not allowed in a volume")
        if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, 0):
            raise OSError(errno.EINVAL, "")
        owner = self._owner_for_new(parent_fd, caller)
        os.mknod(check_name(name), (kind or stat.S_IFREG) | 0o600, 0, dir_fd=parent_fd)
        return self._finish_entry(parent_fd, name, mode, owner, caller)

    def mkdir(
        self, parent_fd: int, name: bytes, mode: int, caller: Caller | None
    ) -> tuple[int, os.stat_result]:
        """Create a directory."""
        owner = self._owner_for_new(parent_fd, caller)
        os.mkdir(check_name(name), 0o700, dir_fd=parent_fd)
        return self._finish_entry(parent_fd, name, mode, owner, caller, is_dir=True)

    def symlink(
        self, parent_fd: int, name: bytes, target: bytes, caller: Caller | None
    ) -> tuple[int, os.stat_result]:
        """Create a symlink (its target is stored, never resolved by us)."""
        owner = self._owner_for_new(parent_fd, caller)
        os.symlink(target, check_name(name), dir_fd=parent_fd)
        return self._finish_entry(parent_fd, name, 0o777, owner, caller, is_link=True)

    def _finish_entry(
        self,
        parent_fd: int,
        name: bytes,
        mode: int,
        owner: tuple[int, int, bool],
        caller: Caller | None,
        *,
        is_dir: bool = False,
        is_link: bool = False,
    ) -> tuple[int, os.stat_result]:
        try:
            fd = os.open(name, PATH_FLAGS, dir_fd=parent_fd)
        except BaseException:
            self._remove_new(parent_fd, name, is_dir)
            raise
        try:
            st = self._finish_new(fd, mode, owner, caller, is_dir=is_dir, is_link=is_link)
        except BaseException:
            os.close(fd)
            self._remove_new(parent_fd, name, is_dir)
            raise
        return fd, st

    def link(self, fd: int, new_parent_fd: int, name: bytes) -> os.stat_result:
        """Hard-link the inode behind ``fd`` (already inside this volume) as ``name``."""
        source, dir_fd = _in_proc(f"self/fd/{fd}")
        os.link(
            source,
            check_name(name),
            src_dir_fd=dir_fd,
            dst_dir_fd=new_parent_fd,
            follow_symlinks=True,
        )
        return os.fstat(fd)

    # -- removing and renaming -------------------------------------------------------

    def unlink(self, parent_fd: int, name: bytes) -> None:
        """Remove a non-directory entry."""
        os.unlink(check_name(name), dir_fd=parent_fd)

    def rmdir(self, parent_fd: int, name: bytes) -> None:
        """Remove an empty directory."""
        os.rmdir(check_name(name), dir_fd=parent_fd)

    def rename(
        self, old_parent_fd: int, old: bytes, new_parent_fd: int, new: bytes, flags: int
    ) -> None:
        """rename/renameat2 with RENAME_NOREPLACE and RENAME_EXCHANGE."""
        if flags & ~_RENAME_FLAGS:
            raise OSError(errno.EINVAL, "unsupported rename flags")
        check_name(old)
        check_name(new)
        if flags:
            _check(_libc.renameat2(old_parent_fd, old, new_parent_fd, new, flags))
        else:
            os.rename(old, new, src_dir_fd=old_parent_fd, dst_dir_fd=new_parent_fd)

    # -- files -------------------------------------------------------------------------

    def open(self, fd: int, flags: int, caller: Caller | None = None) -> int:
        """Open the regular file behind ``fd`` for I/O with the caller's flags (an
        unprivileged caller's O_TRUNC clears set-id bits, as its truncate does)."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.ELOOP, "")
        io_fd = reopen(fd, flags & ~_OPEN_DROP)
        if flags & os.O_TRUNC and caller is not None and not caller.privileged:
            try:
                self._kill_set_id(fd, st)
            except BaseException:
                os.close(io_fd)
                raise
        return io_fd

    def read(self, io_fd: int, offset: int, size: int) -> bytes:
        """Read up to ``size`` bytes at ``offset``."""
        return os.pread(io_fd, size, offset)

    def write(self, io_fd: int, offset: int, data: bytes, *, unprivileged: bool = False) -> int:
        """Write at ``offset`` (at the end for an O_APPEND open, as pwrite does).

        ``unprivileged``: the file was opened for writing by a caller without CAP_FSETID,
        so set-id bits go first, on every write as on ext4 (a bit set while the file was
        open would otherwise survive a later write). The fstat costs about a microsecond
        against a write's 100 or more in the thread trip it shares.
        """
        if unprivileged:
            self._kill_set_id(io_fd, os.fstat(io_fd))
        return os.pwrite(io_fd, data, offset)

    def fsync(self, io_fd: int, datasync: bool) -> None:
        """fsync or fdatasync the backing file."""
        (os.fdatasync if datasync else os.fsync)(io_fd)

    # -- directories -------------------------------------------------------------------

    def list_directory(self, fd: int) -> list[bytes]:
        """The names in a directory (without '.' and '..'), in the backing order."""
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.ENOTDIR, "")
        dir_fd = reopen(fd, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return [name.encode("utf-8", "surrogateescape") for name in os.listdir(dir_fd)]
        finally:
            os.close(dir_fd)

    def parent_attrs(self, fd: int) -> os.stat_result:
        """Attributes of the directory holding the directory ``fd``, for its ".." entry.

        Only stat-ed, never opened or returned as an fd. For an export's root that is a
        directory outside the volume: callers never ask for a root, and use the answer only
        to recognise a directory they already hold (a directory moved out behind the
        export's back leaves its ".." outside too).
        """
        return os.stat("..", dir_fd=fd, follow_symlinks=False)

    def fsyncdir(self, fd: int, datasync: bool) -> None:
        """fsync a directory."""
        dir_fd = reopen(fd, os.O_RDONLY | os.O_DIRECTORY)
        try:
            (os.fdatasync if datasync else os.fsync)(dir_fd)
        finally:
            os.close(dir_fd)

    def statfs(self, fd: int) -> os.statvfs_result:
        """statvfs of the filesystem holding the volume."""
        return os.statvfs(fd)

    # -- extended attributes -----------------------------------------------------------
    # Only the user.* namespace passes: trusted.* and security.* would let a consumer set
    # what the host's kernel and LSMs trust (file capabilities, SELinux labels), and
    # system.* (POSIX ACLs) is not supported by the views.

    def _xattr_target(self, fd: int) -> int:
        """A readable fd of ``fd``'s inode, for the caller to close (xattr calls refuse
        O_PATH fds)."""
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            # user.* attributes exist only on regular files and directories on Linux.
            raise OSError(errno.EPERM, "")
        return reopen(
            fd, os.O_RDONLY | os.O_NONBLOCK | (os.O_DIRECTORY if stat.S_ISDIR(mode) else 0)
        )

    def getxattr(self, fd: int, name: bytes) -> bytes:
        """The value of an extended attribute."""
        if not is_exposed_xattr(name):
            raise OSError(errno.ENODATA, "")
        try:
            target = self._xattr_target(fd)
        except OSError:
            raise OSError(errno.ENODATA, "") from None
        try:
            return os.getxattr(target, name)
        finally:
            os.close(target)

    def listxattr(self, fd: int) -> list[bytes]:
        """Extended attribute names."""
        try:
            target = self._xattr_target(fd)
        except OSError:
            return []
        try:
            names = os.listxattr(target)
        finally:
            os.close(target)
        return [
            encoded
            for encoded in (n.encode("utf-8", "surrogateescape") for n in names)
            if encoded.startswith(b"user.")
        ]

    def setxattr(self, fd: int, name: bytes, value: bytes) -> None:
        """Set an extended attribute."""
        _check_xattr_write(name)
        target = self._xattr_target(fd)
        try:
            os.setxattr(target, name, value)
        finally:
            os.close(target)

    def removexattr(self, fd: int, name: bytes) -> None:
        """Remove an extended attribute."""
        _check_xattr_write(name)
        target = self._xattr_target(fd)
        try:
            os.removexattr(target, name)
        finally:
            os.close(target)


def is_exposed_xattr(name: bytes) -> bool:
    """True for the extended attributes views pass through (user.*); others never exist."""
    return name.startswith(b"user.")


def _check_xattr_write(name: bytes) -> None:
    if name.startswith((b"trusted.", b"security.")):
        raise OSError(errno.EPERM, "trusted.* and security.* attributes are refused")
    if not name.startswith(b"user."):
        raise OSError(errno.EOPNOTSUPP, "")
