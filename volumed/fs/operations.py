"""The pyfuse3 edge of one export's server: FUSE requests in, view calls, errnos out.

The mount's root is the export's volume, seen through its policy view. Every syscall runs
inline on the server's trio loop: the server is one process per export (``server.py``), and
that process is the isolation a stuck syscall needs (docs/fuse.md). A few requests make no
syscall: flush (ENOSYS, see ``flush``), release (a close), getxattr of a name views never
expose (``security.capability``, asked before every write), and a directory's GETATTR right
after a change made in it (see ``_fresh_attrs``). This is the only place errors become
errnos: an OSError passes its errno; anything else is a bug, logged and answered with EIO,
never allowed to stop pyfuse3's loop.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from volumed.fs.nodes import ROOT_INODE, DirHandle, ExportState, FileHandle, InodeTable, Node
from volumed.fs.passthrough import AttrChange, Caller, View, is_exposed_xattr
from volumed.fs.views import presented_owner

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

#: Entries fetched (and stat'ed) per batch while answering readdir.
READDIR_BATCH = 64
#: Every listing starts with "." (offset 1) and ".." (offset 2), as on ext4; the entry at
#: index i of a directory's snapshot has offset DOTS + i + 1. An offset is where a listing
#: resumes (the kernel sends the last one it used back as ``start_id``), so each entry
#: keeps its offset for the life of the snapshot and nothing is repeated or skipped.
DOTS = 2
NAME_MAX = 255
#: Longest a directory's attributes, taken right after a change made in it, may answer the
#: kernel's next GETATTR of it (never longer than the export's attr timeout either).
FRESH_WINDOW = 1.0


def fuse_edge(method: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Map an OSError to its errno and any other exception to a logged EIO."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("fuse handler failed op=%s", method.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _caller(ctx: pyfuse3.RequestContext) -> Caller:
    return Caller(ctx.uid, ctx.gid, pid=ctx.pid)


class BoxvolFS(pyfuse3.Operations):
    """One export's filesystem: its volume at the mount's root, through its policy view.

    Attributes:
        table: inodes, and handles of open files and directories.
        root: the export, with its view and its root node (the mount's root inode).
    """

    table: InodeTable
    root: ExportState

    def __init__(self, state: ExportState, root_fd: int, st: os.stat_result) -> None:
        """Serve ``state`` rooted at ``root_fd`` (consumed: it lives as long as this)."""
        super().__init__()
        self.table = InodeTable()
        state.root = self.table.remember_root(state, root_fd, st)
        self.root = state
        #: Namespace changes (create, mkdir, unlink, rename, ...) started so far, mount-wide.
        self._changes = 0

    # -- helpers ---------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, inline: this process serves one export (see the module doc)."""
        return fn(*args)

    def _attrs(
        self, inode: int, st: os.stat_result, export: ExportState
    ) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        cache = export.cache
        attrs.st_ino = inode
        attrs.generation = 0
        attrs.entry_timeout = cache.entry_timeout
        attrs.attr_timeout = cache.attr_timeout
        attrs.st_mode = st.st_mode
        attrs.st_nlink = st.st_nlink
        owner = presented_owner(export.view)
        attrs.st_uid, attrs.st_gid = owner if owner else (st.st_uid, st.st_gid)
        attrs.st_rdev = st.st_rdev
        attrs.st_size = st.st_size
        attrs.st_blksize = st.st_blksize
        attrs.st_blocks = st.st_blocks
        attrs.st_atime_ns = st.st_atime_ns
        attrs.st_mtime_ns = st.st_mtime_ns
        attrs.st_ctime_ns = st.st_ctime_ns
        return attrs

    def _node(self, inode: int) -> Node:
        return self.table.node(inode)

    async def _on_node(self, node: Node, fn: Callable[..., T], *args: Any) -> T:
        fd = node.acquire()
        try:
            return await self._run(fn, fd, *args)
        finally:
            node.release()

    async def _on_two(self, first: Node, second: Node, fn: Callable[..., T], *args: Any) -> T:
        if first.export is not second.export:
            raise OSError(errno.EXDEV, "across exports")
        fd1 = first.acquire()
        try:
            fd2 = second.acquire()
            try:
                return await self._run(fn, fd1, fd2, *args)
            finally:
                second.release()
        finally:
            first.release()

    def _entry(self, node: Node, fd: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        new = self.table.remember(node.export, fd, st)
        return self._attrs(new.inode, st, node.export)

    # A change in a directory makes the kernel drop the directory's attributes, and with
    # default_permissions the next path walk through it sends a GETATTR: one more trip to
    # a worker thread for every create, unlink or mkdir. So the worker call that makes the
    # change also takes the directory's attributes after it (``_then_stat``), and that next
    # GETATTR is answered from them, once, if nothing else in the namespace has changed
    # since (any create, unlink, rename... anywhere counts) and they are younger than
    # FRESH_WINDOW; they are then trusted only for what is left of the export's attribute
    # timeout, so a change made elsewhere shows no later than with the kernel's own cache.
    # An export without attribute caching (``none``) never uses them.

    def _namespace_change(self) -> int:
        """Count a namespace change that is starting; returns its mark."""
        self._changes += 1
        return self._changes

    def _record_fresh(self, node: Node, st: os.stat_result | None, mark: int) -> None:
        """Keep ``st`` (taken after the change ``mark``) unless another change has started."""
        if st is not None and mark == self._changes:
            node.fresh = (st, time.monotonic(), mark)
        else:
            node.fresh = None

    def _fresh_attrs(self, node: Node) -> pyfuse3.EntryAttributes | None:
        fresh = node.fresh
        if fresh is None:
            return None
        node.fresh = None  # it answers one GETATTR at most
        st, taken, mark = fresh
        timeout = node.export.cache.attr_timeout
        age = time.monotonic() - taken
        if mark != self._changes or not 0 <= age < min(FRESH_WINDOW, timeout):
            return None
        attrs = self._attrs(node.inode, st, node.export)
        attrs.attr_timeout = timeout - age
        return attrs

    # -- lookups and attributes --------------------------------------------------------

    @fuse_edge
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.table.node(parent_inode)
        try:
            fd, st = await self._on_node(parent, parent.export.view.lookup, name)
        except FileNotFoundError:
            remember = parent.export.cache.negative_timeout
            if remember <= 0:
                raise
            absent = pyfuse3.EntryAttributes()
            absent.st_ino = 0  # "no such name", which the kernel keeps for entry_timeout
            absent.entry_timeout = remember
            return absent
        return self._entry(parent, fd, st)

    @fuse_edge
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self.table.forget(inode, count)

    @fuse_edge
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.table.node(inode)
        attrs = self._fresh_attrs(node)
        if attrs is None:
            st = await self._on_node(node, node.export.view.getattr)
            attrs = self._attrs(inode, st, node.export)
        return attrs

    @fuse_edge
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        node.fresh = None
        change = AttrChange(
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        handle = self.table.handle(fh, FileHandle) if fh is not None else None
        io_fd = handle.acquire() if handle is not None else None
        try:
            st = await self._on_node(node, node.export.view.setattr, change, _caller(ctx), io_fd)
        finally:
            if handle is not None:
                handle.release()
        if stat.S_ISDIR(st.st_mode):
            # Another export's node of this directory may hold attributes from before.
            self._changes += 1
        return self._attrs(inode, st, node.export)

    @fuse_edge
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        return await self._on_node(node, node.export.view.readlink)

    # -- creating, removing, renaming --------------------------------------------------

    @fuse_edge
    async def mknod(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        rdev: int,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        mark = self._namespace_change()
        (fd, st), parent_st = await self._on_node(
            parent, _then_stat, parent.export.view.mknod, name, mode, rdev, _caller(ctx)
        )
        self._record_fresh(parent, parent_st, mark)
        return self._entry(parent, fd, st)

    @fuse_edge
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        mark = self._namespace_change()
        (fd, st), parent_st = await self._on_node(
            parent, _then_stat, parent.export.view.mkdir, name, mode, _caller(ctx)
        )
        self._record_fresh(parent, parent_st, mark)
        return self._entry(parent, fd, st)

    @fuse_edge
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        mark = self._namespace_change()
        (fd, st), parent_st = await self._on_node(
            parent, _then_stat, parent.export.view.symlink, name, target, _caller(ctx)
        )
        self._record_fresh(parent, parent_st, mark)
        return self._entry(parent, fd, st)

    @fuse_edge
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._node(parent_inode)
        mark = self._namespace_change()
        _, parent_st = await self._on_node(parent, _then_stat, parent.export.view.unlink, name)
        self._record_fresh(parent, parent_st, mark)

    @fuse_edge
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._node(parent_inode)
        mark = self._namespace_change()
        _, parent_st = await self._on_node(parent, _then_stat, parent.export.view.rmdir, name)
        self._record_fresh(parent, parent_st, mark)

    @fuse_edge
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        old = self._node(parent_inode_old)
        new = self._node(parent_inode_new)
        mark = self._namespace_change()
        old_st, new_st = await self._on_two(
            old, new, _rename_then_stat, old.export.view, name_old, name_new, flags
        )
        self._record_fresh(old, old_st, mark)
        if new is not old:
            self._record_fresh(new, new_st, mark)

    @fuse_edge
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        parent = self._node(new_parent_inode)
        mark = self._namespace_change()
        st, parent_st = await self._on_two(
            node, parent, _link_then_stat, node.export.view, new_name
        )
        self._record_fresh(parent, parent_st, mark)
        node.lookups += 1  # the kernel now holds one more reference to this inode
        return self._attrs(node.inode, st, node.export)

    # -- files -----------------------------------------------------------------------

    def _file_info(
        self, node: Node, io_fd: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        writes = bool(flags & (os.O_WRONLY | os.O_RDWR))
        unprivileged = writes and not _caller(ctx).privileged
        handle_id = self.table.add_handle(FileHandle(io_fd, node, unprivileged_writer=unprivileged))
        return pyfuse3.FileInfo(
            fh=handle_id,
            keep_cache=node.export.cache.keep_cache,
        )

    @fuse_edge
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        io_fd = await self._on_node(node, node.export.view.open, flags, _caller(ctx))
        return self._file_info(node, io_fd, flags, ctx)

    @fuse_edge
    async def create(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self._node(parent_inode)
        mark = self._namespace_change()
        (io_fd, fd, st), parent_st = await self._on_node(
            parent, _then_stat, parent.export.view.create, name, mode, flags, _caller(ctx)
        )
        self._record_fresh(parent, parent_st, mark)
        node = self.table.remember(parent.export, fd, st)
        info = self._file_info(node, io_fd, flags, ctx)
        return info, self._attrs(node.inode, st, node.export)

    @fuse_edge
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.table.handle(fh, FileHandle)
        io_fd = handle.acquire()
        try:
            return await self._run(handle.export.view.read, io_fd, off, size)
        finally:
            handle.release()

    @fuse_edge
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.table.handle(fh, FileHandle)
        io_fd = handle.acquire()
        try:
            write = functools.partial(
                handle.export.view.write, unprivileged=handle.unprivileged_writer
            )
            return await self._run(write, io_fd, off, buf)
        finally:
            handle.release()

    async def flush(self, fh: int) -> None:
        # The kernel remembers an ENOSYS here and from then on completes every close(2)
        # itself, as if flush had succeeded: a round trip saved on every close. Nothing is
        # lost, because there is nothing for a flush to report: each write reached the
        # backing file with pwrite before it was answered, and pwrite on a local filesystem
        # reports its errors itself (closing a dup, what a flush did, never reports one on
        # ext4 or xfs); and locks are the kernel's own (no getlk/setlk), so no lock owner
        # needs releasing.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @fuse_edge
    async def release(self, fh: int) -> None:
        self.table.release_handle(fh, FileHandle)

    @fuse_edge
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self.table.handle(fh, FileHandle)
        io_fd = handle.acquire()
        try:
            await self._run(handle.export.view.fsync, io_fd, datasync)
        finally:
            handle.release()

    # -- directories -------------------------------------------------------------------

    @fuse_edge
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return self.table.add_handle(DirHandle(self.table.node(inode)))

    @fuse_edge
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self.table.handle(fh, DirHandle)
        node, export = handle.node, handle.export
        if start_id == 0 or handle.dots is None:
            # A snapshot per pass: offsets stay valid however the directory changes.
            is_root = node is export.root
            handle.names, st, parent_st = await self._on_node(node, _snapshot, export.view, is_root)
            handle.dots = (self._attrs(node.inode, st, export), self._dotdot(node, parent_st))
        if not _reply_dots(token, start_id, handle.dots):
            return
        index = max(start_id - DOTS, 0)
        while index < len(handle.names):
            batch = handle.names[index : index + READDIR_BATCH]
            found = await self._on_node(node, _lookup_many, export.view.lookup, batch)
            for k, (position, name, fd, st) in enumerate(found):
                entry = self.table.remember(export, fd, st)
                attrs = self._attrs(entry.inode, st, export)
                offset = DOTS + index + position + 1
                if not pyfuse3.readdir_reply(token, name, attrs, offset):
                    self.table.forget(entry.inode, 1)
                    for _position, _name, rest_fd, _st in found[k + 1 :]:
                        os.close(rest_fd)
                    return
            index += len(batch)

    def _dotdot(self, node: Node, parent_st: os.stat_result | None) -> pyfuse3.EntryAttributes:
        """What ".." of the directory ``node`` presents.

        An export's root: the mount's root, which is where ".." leads from it through the
        mount (the kernel walks its own dentries), and which shows nothing of the host;
        the volume's real parent is a managed root outside the export. Elsewhere: the
        parent directory, if the kernel holds it through this export, as it does for
        every directory it reached by name. A directory moved behind the export's back
        may have a parent the kernel never saw: then the export's root stands in (the
        kernel takes only the inode number and type of these two entries, never their
        other attributes).
        """
        export = node.export
        if node is export.root:  # the mount's root is its own "..", as every root is
            return self._attrs(node.inode, os.fstat(node.fd), export)
        parent = self.table.find(export, parent_st) if parent_st is not None else None
        if parent is not None and parent_st is not None:
            return self._attrs(parent.inode, parent_st, export)
        stand_in = pyfuse3.EntryAttributes()
        stand_in.st_ino = export.root.inode if export.root is not None else ROOT_INODE
        stand_in.st_mode = stat.S_IFDIR
        return stand_in

    @fuse_edge
    async def releasedir(self, fh: int) -> None:
        self.table.release_handle(fh, DirHandle)

    @fuse_edge
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        handle = self.table.handle(fh, DirHandle)
        await self._on_node(handle.node, handle.export.view.fsyncdir, datasync)

    @fuse_edge
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        root = self.root.root
        assert root is not None
        st = await self._on_node(root, self.root.view.statfs)
        data = pyfuse3.StatvfsData()
        data.f_bsize = st.f_bsize
        data.f_frsize = st.f_frsize
        data.f_blocks = st.f_blocks
        data.f_bfree = st.f_bfree
        data.f_bavail = st.f_bavail
        data.f_files = st.f_files
        data.f_ffree = st.f_ffree
        data.f_favail = st.f_favail
        data.f_namemax = NAME_MAX
        return data

    # -- extended attributes -----------------------------------------------------------

    @fuse_edge
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if not is_exposed_xattr(name):
            # Answered here, with no worker trip: the kernel asks for security.capability
            # before every write(2) to a file (to drop file capabilities), and views never
            # expose such a name.
            raise OSError(pyfuse3.ENOATTR, "")
        node = self.table.node(inode)
        return await self._on_node(node, node.export.view.getxattr, name)

    @fuse_edge
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        node = self.table.node(inode)
        return await self._on_node(node, node.export.view.listxattr)

    @fuse_edge
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        node = self._node(inode)
        node.fresh = None
        await self._on_node(node, node.export.view.setxattr, name, value)

    @fuse_edge
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self._node(inode)
        node.fresh = None
        await self._on_node(node, node.export.view.removexattr, name)

    @fuse_edge
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        # default_permissions: the kernel checks access against the attributes we report.
        return True


def _stat_or_none(fd: int) -> os.stat_result | None:
    """Blocking: the attributes of ``fd``, or None (an answer is never lost to this)."""
    try:
        return os.fstat(fd)
    except OSError:
        return None


def _then_stat(parent_fd: int, fn: Callable[..., T], *args: Any) -> tuple[T, os.stat_result | None]:
    """Blocking: ``fn(parent_fd, *args)``, then the directory's attributes as it left them."""
    return fn(parent_fd, *args), _stat_or_none(parent_fd)


def _rename_then_stat(
    old_parent_fd: int, new_parent_fd: int, view: View, old: bytes, new: bytes, flags: int
) -> tuple[os.stat_result | None, os.stat_result | None]:
    """Blocking: rename, then both directories' attributes as it left them."""
    view.rename(old_parent_fd, old, new_parent_fd, new, flags)
    return _stat_or_none(old_parent_fd), _stat_or_none(new_parent_fd)


def _link_then_stat(
    fd: int, parent_fd: int, view: View, name: bytes
) -> tuple[os.stat_result, os.stat_result | None]:
    """Blocking: hard-link, then the linked inode's and the directory's attributes."""
    return view.link(fd, parent_fd, name), _stat_or_none(parent_fd)


def _reply_dots(
    token: pyfuse3.ReaddirToken,
    start_id: int,
    dots: tuple[pyfuse3.EntryAttributes, pyfuse3.EntryAttributes],
) -> bool:
    """Reply "." and ".." where the listing has not passed them; False once it is full.

    Neither is counted as a lookup: the kernel links no inode for these two names of a
    READDIRPLUS answer, so it never forgets them either.
    """
    for offset, (name, attrs) in enumerate(zip((b".", b".."), dots, strict=True), start=1):
        if start_id < offset and not pyfuse3.readdir_reply(token, name, attrs, offset):
            return False
    return True


def _snapshot(
    fd: int, view: View, is_root: bool
) -> tuple[list[bytes], os.stat_result, os.stat_result | None]:
    """Blocking: a directory's names, its attributes, and its parent's unless it is an
    export's root (or its parent is gone)."""
    names = view.list_directory(fd)
    st = view.getattr(fd)
    if is_root:
        return names, st, None
    try:
        return names, st, view.parent_attrs(fd)
    except OSError:
        return names, st, None


def _lookup_many(
    parent_fd: int,
    lookup: Callable[[int, bytes], tuple[int, os.stat_result]],
    names: list[bytes],
) -> list[tuple[int, bytes, int, os.stat_result]]:
    """Blocking: look up a batch of directory entries as (position in batch, name, fd,
    attributes), skipping those removed since the snapshot."""
    found = []
    for position, name in enumerate(names):
        try:
            fd, st = lookup(parent_fd, name)
        except FileNotFoundError:
            continue
        found.append((position, name, fd, st))
    return found
