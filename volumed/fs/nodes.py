"""Inode and handle bookkeeping of the FUSE view.

Each backing object reached through an export gets one FUSE inode, keyed by
(export, st_dev, st_ino), holding an ``O_PATH`` fd and the kernel's lookup count, which
``forget`` releases. An fd is closed only when nothing uses it any more, so a request in
flight never sees its fd number closed and reused under it. The export's root is the
mount's root inode. Open files and open directories share one table of handles, one id
space: a handle asked for as the other kind is EBADF. Runs on the export server's trio
loop; imports neither pyfuse3 nor trio (``tests/unit/test_boundaries.py``).
"""

from __future__ import annotations

import errno
import logging
import os
from typing import TYPE_CHECKING, Protocol, TypeVar

from volumed.fs.passthrough import View

if TYPE_CHECKING:  # the FUSE edge's entry type, for annotations only: never loaded here
    import pyfuse3

log = logging.getLogger(__name__)

ROOT_INODE = 1


class CacheTimes(Protocol):
    """How long the kernel may trust answers (``volumed.exports.CachePolicy``)."""

    @property
    def entry_timeout(self) -> float: ...
    @property
    def negative_timeout(self) -> float: ...
    @property
    def attr_timeout(self) -> float: ...
    @property
    def keep_cache(self) -> bool: ...


class ExportState:
    """A live export as the filesystem sees it: its id, its kernel caching, its policy view
    and its root node (what the server needs of the export, not its record)."""

    __slots__ = ("alive", "cache", "id", "name", "root", "view")

    def __init__(self, export_id: str, cache: CacheTimes, view: View) -> None:
        self.id = export_id
        self.cache = cache
        self.view = view
        self.name = export_id.encode()
        self.alive = True
        self.root: Node | None = None


class _Pinned:
    """Reference-counted use of an fd by in-flight work; the fd closes after the last."""

    __slots__ = ("closing", "fd", "users")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        self.closing = False

    def retire(self) -> None:
        """Close now, or as soon as the last user is done."""
        self.closing = True
        if self.users == 0 and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def acquire(self) -> int:
        if self.closing:
            raise OSError(errno.ESTALE, "")
        self.users += 1
        return self.fd

    def release(self) -> None:
        self.users -= 1
        if self.closing and self.users == 0 and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Node(_Pinned):
    """One FUSE inode: a backing inode seen through one export."""

    __slots__ = ("export", "fresh", "inode", "key", "lookups", "pinned")

    def __init__(self, inode: int, export: ExportState, fd: int, key: tuple[int, int]) -> None:
        super().__init__(fd)
        self.inode = inode
        self.export = export
        self.key = key
        self.lookups = 0
        #: Export roots live as long as their export, whatever the kernel forgets.
        self.pinned = False
        #: A directory's attributes taken right after a change made in it, for the GETATTR
        #: the kernel sends next (see ``BoxvolFS._fresh_attrs``): (attributes, when taken
        #: in monotonic seconds, the mount's count of namespace changes then).
        self.fresh: tuple[os.stat_result, float, int] | None = None


class FileHandle(_Pinned):
    """An open file: its own backing fd, so O_APPEND and friends are per open."""

    __slots__ = ("export", "node", "unprivileged_writer")

    def __init__(self, fd: int, node: Node, *, unprivileged_writer: bool) -> None:
        super().__init__(fd)
        self.node = node
        self.export = node.export
        #: Opened for writing by a caller without CAP_FSETID: each write clears set-id
        #: bits first (FUSE's WRITE carries no caller; the opener's stands for it).
        self.unprivileged_writer = unprivileged_writer


class DirHandle:
    """An open directory: no fd of its own (its node's serves), and the snapshot its
    listing is answered from, so offsets stay valid however the directory changes."""

    __slots__ = ("dots", "export", "names", "node")

    def __init__(self, node: Node) -> None:
        self.node = node
        self.export = node.export
        self.names: list[bytes] = []
        #: What "." and ".." present, taken with ``names``; None until the first snapshot.
        self.dots: tuple[pyfuse3.EntryAttributes, pyfuse3.EntryAttributes] | None = None

    def retire(self) -> None:
        """The kernel closed the directory: drop the snapshot."""
        self.names = []
        self.dots = None


H = TypeVar("H", FileHandle, DirHandle)


class InodeTable:
    """Inodes and handles (open files and directories) of the whole mount."""

    def __init__(self) -> None:
        self._nodes: dict[int, Node] = {}
        self._by_key: dict[tuple[str, int, int], Node] = {}
        self._next_inode = ROOT_INODE + 1
        #: Open files and directories, in one id space: the one place handles are added,
        #: found (by kind) and released.
        self._handles: dict[int, FileHandle | DirHandle] = {}
        self._next_handle = 1

    def __len__(self) -> int:
        return len(self._nodes)

    def node(self, inode: int) -> Node:
        """The live node of ``inode``; ESTALE once its export is gone."""
        node = self._nodes.get(inode)
        if node is None or not node.export.alive:
            raise OSError(errno.ESTALE, "")
        return node

    def remember(self, export: ExportState, fd: int, st: os.stat_result) -> Node:
        """Count one kernel lookup of the object behind ``fd`` (consuming ``fd``)."""
        key = (export.id, st.st_dev, st.st_ino)
        node = self._by_key.get(key)
        if node is not None and not node.closing:
            os.close(fd)
        else:
            node = Node(self._next_inode, export, fd, (st.st_dev, st.st_ino))
            self._next_inode += 1
            self._nodes[node.inode] = node
            self._by_key[key] = node
        node.lookups += 1
        return node

    def remember_root(self, export: ExportState, fd: int, st: os.stat_result) -> Node:
        """The export's root as the mount's root inode (a single-export mount): pinned, and
        never counted, since the kernel never looks the root up (consumes ``fd``)."""
        if ROOT_INODE in self._nodes:
            raise ValueError("the root inode is taken")
        node = Node(ROOT_INODE, export, fd, (st.st_dev, st.st_ino))
        node.pinned = True
        self._nodes[ROOT_INODE] = node
        self._by_key[(export.id, st.st_dev, st.st_ino)] = node
        return node

    def find(self, export: ExportState, st: os.stat_result) -> Node | None:
        """The live node of the object ``st`` describes, if the kernel knows it through
        ``export`` (nothing is counted: for answers the kernel does not count either)."""
        node = self._by_key.get((export.id, st.st_dev, st.st_ino))
        return None if node is None or node.closing else node

    def forget(self, inode: int, count: int) -> None:
        """The kernel dropped ``count`` lookups of ``inode``."""
        node = self._nodes.get(inode)
        if node is None:
            return
        node.lookups -= count
        if node.lookups <= 0 and not node.pinned:
            self._drop(node)

    def _drop(self, node: Node) -> None:
        del self._nodes[node.inode]
        key = (node.export.id, *node.key)
        if self._by_key.get(key) is node:
            del self._by_key[key]
        node.retire()

    def add_handle(self, handle: FileHandle | DirHandle) -> int:
        """Register an open file or directory; returns its FUSE handle."""
        handle_id = self._next_handle
        self._next_handle += 1
        self._handles[handle_id] = handle
        return handle_id

    def handle(self, handle_id: int, kind: type[H]) -> H:
        """An open handle of ``kind``; EBADF if unknown or of the other kind (a file's
        handle sent for a directory's), ESTALE once its export is gone."""
        handle = self._handles.get(handle_id)
        if not isinstance(handle, kind):
            raise OSError(errno.EBADF, "")
        if not handle.export.alive:
            raise OSError(errno.ESTALE, "")
        return handle

    def release_handle(self, handle_id: int, kind: type[H]) -> None:
        """The kernel closed the file or directory; EBADF (and nothing released) if the
        handle is of the other kind."""
        handle = self._handles.get(handle_id)
        if handle is None:
            return
        if not isinstance(handle, kind):
            raise OSError(errno.EBADF, "")
        del self._handles[handle_id]
        handle.retire()
