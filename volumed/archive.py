"""Volume archives: a directory tree as a PAX tar stream, and a tar stream back into a tree.

``pack(root_fd, out)`` writes the tree below ``root_fd``; ``restore(stream, root_fd, force=)``
replaces the tree below ``root_fd`` with an archive's, all or nothing (``unpack`` is the
extraction into a fresh directory it stages in). docs/archives.md states the format, what is
refused or neutralised, and what a crash leaves.

Every operation is relative to a directory fd, never a path resolved from '/': each
component is opened with ``O_NOFOLLOW | O_DIRECTORY``, so neither pack nor unpack ever
follows a symbolic link. In boxvold the root fd is the volume's root inside the archive
worker's sandbox (``volumed.archive_worker``), so even a bug here cannot reach beyond the
volume; the unit tests run it on a temporary directory.

Pure of boxvold: no trio, no pyfuse3, no registry. Blocking throughout.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import decimal
import errno
import logging
import os
import shutil
import signal
import stat
import tarfile
from collections.abc import Iterator
from typing import IO, Any, cast

from volumed.errors import BadArchive, Conflict
from volumed.text import printable_repr

log = logging.getLogger(__name__)

#: Top-level entries of a volume that is a filesystem of its own (an image, volumed.images)
#: that belong to the filesystem: neither archived nor replaced by a restore.
IMAGE_ENTRIES = frozenset({"lost+found"})
#: Top-level names the restore machinery uses inside a volume (and archives never hold).
RESERVED_PREFIX = ".boxvol-restore."
#: The archive is extracted here first; a failed restore deletes it.
STAGED = RESERVED_PREFIX + "staged"
#: The staging directory is renamed to this once every old entry is out of the way: the
#: commit point. A restore that finds it finishes the swap (roll forward).
SWAPPING = RESERVED_PREFIX + "swapping"
#: The volume's previous entries while the staged ones move in; deleted at the end.
OLD = RESERVED_PREFIX + "old"

_XATTR_PREFIX = "SCHILY.xattr."
#: Only user xattrs travel: trusted.* needs CAP_SYS_ADMIN, security.* holds host labels and
#: file capabilities (a privilege, like a set-id bit), system.* ACLs are not modelled yet.
_XATTR_NAMESPACE = "user."
#: Skipped entries logged by name, per kind.
LOGGED_PER_KIND = 10
#: The most a restore reads after the end of the archive (a writer's padding) before it
#: stops reading: a writer that sends more then sees a broken pipe, harmlessly.
DRAIN_LIMIT = 1 << 20
_CHUNK = 1 << 20
_BLOCK = 4096
_ZEROS = bytes(_CHUNK)
_SETID = stat.S_ISUID | stat.S_ISGID
_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Names and xattr values are bytes; they travel as str with their undecodable bytes escaped.
_ERRORS = "surrogateescape"


@dataclasses.dataclass
class Report:
    """What a pack or unpack did: entries written, content bytes, and by kind the entries
    skipped (not archived / not restored) and neutralised (restored, made harmless)."""

    entries: int = 0
    bytes: int = 0
    skipped: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    neutralised: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)

    def skip(self, kind: str, name: str) -> None:
        """Count an entry left out, logging the first few of each kind (a hostile archive
        of a million device nodes must not write a million log lines)."""
        self.skipped[kind] += 1
        if self.skipped[kind] <= LOGGED_PER_KIND:
            more = " (no more of this kind logged)" if self.skipped[kind] == LOGGED_PER_KIND else ""
            log.warning("archive entry skipped kind=%s name=%s%s", kind, printable_repr(name), more)

    def to_json(self) -> dict[str, Any]:
        """The report as the API answers it."""
        return {
            "entries": self.entries,
            "bytes": self.bytes,
            "skipped": dict(sorted(self.skipped.items())),
            "neutralised": dict(sorted(self.neutralised.items())),
        }


class _Refused(Exception):
    """One member is refused (counted under ``kind``); the restore goes on without it."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


# -- pack -------------------------------------------------------------------------------


def pack(root_fd: int, out: IO[bytes], *, keep: frozenset[str] = frozenset()) -> Report:
    """Write the tree below ``root_fd`` to ``out`` as a PAX tar stream.

    Symbolic links are stored as links (never followed), hard links as links to the first
    name archived, ``user.*`` xattrs as ``SCHILY.xattr.*`` records, mtimes to the
    nanosecond; directories on another filesystem (mount points), sockets, fifos and
    device nodes are skipped and counted, as are top-level names starting with
    ``RESERVED_PREFIX``. Top-level names in ``keep`` belong to the filesystem, not to the
    volume's content (``IMAGE_ENTRIES``), and are left out silently. Content is stored in
    full (holes as zeros)."""
    report = Report()
    links: dict[tuple[int, int], str] = {}
    root_dev = os.fstat(root_fd).st_dev
    with tarfile.open(
        fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8", errors=_ERRORS
    ) as tar:
        _pack_dir(tar, root_fd, "", root_dev, links, report, keep)
    return report


def _pack_dir(
    tar: tarfile.TarFile,
    dir_fd: int,
    prefix: str,
    root_dev: int,
    links: dict[tuple[int, int], str],
    report: Report,
    keep: frozenset[str] = frozenset(),
) -> None:
    for name in sorted(os.listdir(dir_fd)):
        path = prefix + name
        if not prefix and name in keep:
            continue
        if not prefix and name.startswith(RESERVED_PREFIX):
            report.skip("reserved", path)
            continue
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue  # removed while the volume was walked
        if stat.S_ISDIR(st.st_mode):
            if st.st_dev != root_dev:
                report.skip("other_filesystem", path)
                continue
            fd = os.open(name, _DIR_OPEN, dir_fd=dir_fd)
            try:
                opened = os.fstat(fd)
                if opened.st_dev != root_dev:
                    report.skip("other_filesystem", path)
                    continue
                tar.addfile(_info(path, tarfile.DIRTYPE, opened, _xattrs(fd, path, report)))
                report.entries += 1
                _pack_dir(tar, fd, path + "/", root_dev, links, report)
            finally:
                os.close(fd)
        elif stat.S_ISREG(st.st_mode):
            _pack_file(tar, dir_fd, name, path, st, links, report)
        elif stat.S_ISLNK(st.st_mode):
            info = _info(path, tarfile.SYMTYPE, st, {})
            info.linkname = os.readlink(name, dir_fd=dir_fd)
            tar.addfile(info)
            report.entries += 1
        else:
            report.skip(_special_kind(st.st_mode), path)


def _pack_file(
    tar: tarfile.TarFile,
    dir_fd: int,
    name: str,
    path: str,
    st: os.stat_result,
    links: dict[tuple[int, int], str],
    report: Report,
) -> None:
    key = (st.st_dev, st.st_ino)
    if st.st_nlink > 1 and key in links:
        info = _info(path, tarfile.LNKTYPE, st, {})
        info.linkname = links[key]
        tar.addfile(info)
        report.entries += 1
        return
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        return  # replaced by a link since the stat: it is no longer this file
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            return
        if opened.st_nlink > 1:
            links.setdefault((opened.st_dev, opened.st_ino), path)
        info = _info(path, tarfile.REGTYPE, opened, _xattrs(fd, path, report))
        info.size = opened.st_size
        with _Exactly(fd, opened.st_size, path) as content:
            tar.addfile(info, content)
        report.entries += 1
        report.bytes += opened.st_size
    finally:
        os.close(fd)


def _special_kind(mode: int) -> str:
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "unsupported"


def _info(path: str, kind: bytes, st: os.stat_result, xattrs: dict[str, str]) -> tarfile.TarInfo:
    info = tarfile.TarInfo(path)
    info.type = kind
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""
    info.mtime = st.st_mtime_ns // 1_000_000_000
    info.pax_headers = {"mtime": _ns_text(st.st_mtime_ns), **xattrs}
    return info


def _ns_text(ns: int) -> str:
    """A PAX time (decimal seconds) exact to the nanosecond."""
    sign = "-" if ns < 0 else ""
    seconds, fraction = divmod(abs(ns), 1_000_000_000)
    return f"{sign}{seconds}.{fraction:09d}".rstrip("0").rstrip(".")


def _xattrs(fd: int, path: str, report: Report) -> dict[str, str]:
    """The ``user.*`` xattrs of ``fd`` as PAX records."""
    records = {}
    try:
        names = os.listxattr(fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    for name in sorted(names):
        if not name.startswith(_XATTR_NAMESPACE):
            continue
        if not _portable_xattr_name(name):
            report.skip("xattr_name", f"{path} {name}")
            continue
        with contextlib.suppress(FileNotFoundError, OSError):
            records[_XATTR_PREFIX + name] = os.getxattr(fd, name).decode("utf-8", _ERRORS)
    return records


def _portable_xattr_name(name: str) -> bool:
    """PAX keywords are UTF-8 and end at '='."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "=" not in name and "\n" not in name


class _Exactly:
    """Exactly ``size`` bytes of ``fd`` from its start, whatever the file does meanwhile: a
    file that shrinks while it is archived is padded with zeros (logged), one that grows is
    cut at the size its header states, so the stream stays a valid archive."""

    def __init__(self, fd: int, size: int, path: str) -> None:
        self._fd, self._left, self._path = fd, size, path
        self._offset = 0

    def __enter__(self) -> _Exactly:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def read(self, size: int = -1) -> bytes:
        want = self._left if size < 0 else min(size, self._left)
        if want <= 0:
            return b""
        data = os.pread(self._fd, want, self._offset)
        if not data:
            log.warning("archive file shrank while read name=%s", printable_repr(self._path))
            data = bytes(want)
        self._offset += len(data)
        self._left -= len(data)
        return data


# -- unpack -----------------------------------------------------------------------------


def unpack(stream: IO[bytes], root_fd: int, *, keep: frozenset[str] = frozenset()) -> Report:
    """Extract the tar archive read from ``stream`` below ``root_fd`` (an empty directory).

    Refused (skipped and counted): members with a '..' component, members whose parent
    path is a symbolic link or not a directory, hard links to anything but an earlier
    regular member, device nodes, fifos, other types, top-level reserved names, a non-dir
    member where a directory was restored. Neutralised (counted): absolute names are made
    relative, set-id bits of files are cleared. Kept: modes, uid/gid numbers, mtimes,
    ``user.*`` xattrs, symbolic links verbatim (never followed; those pointing outside are
    counted). Members below a top-level name in ``keep`` are refused as reserved. Runs of
    zero blocks become holes. Raises BadArchive if the stream is not a
    complete tar archive; what was extracted so far is left for the caller to delete."""
    report = Report()
    extractor = _Extractor(root_fd, report, keep)
    reader = _CountingReader(stream)
    try:
        with tarfile.open(
            fileobj=cast(IO[bytes], reader), mode="r|", encoding="utf-8", errors=_ERRORS
        ) as tar:
            while (info := tar.next()) is not None:
                extractor.member(tar, info)
                # Stream mode: nothing refers back to a member, and a list of millions of
                # them would only cost memory (``members`` is not in the type stubs).
                tar.members.clear()  # type: ignore[attr-defined]
            if reader.eof and reader.delivered < tar.offset + tarfile.BLOCKSIZE:
                raise BadArchive(
                    f"the archive is cut short: it ends after {reader.delivered} bytes "
                    "without the end-of-archive blocks; nothing was restored"
                )
    except (tarfile.TarError, EOFError) as exc:
        raise BadArchive(
            f"not a complete tar archive ({exc}, after {reader.delivered} bytes); "
            "nothing was restored"
        ) from None
    extractor.finish_directories()
    return report


class _CountingReader:
    """``stream`` counting what it delivered and whether it ended (a tar cut at a member
    boundary otherwise reads as a complete archive)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self.delivered = 0
        self.eof = False

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        if not data and size != 0:
            self.eof = True
        self.delivered += len(data)
        return data


@dataclasses.dataclass(slots=True)
class _Attrs:
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    xattrs: dict[str, bytes]


class _Extractor:
    """Creates members below a root fd, remembering what hard links may point at and the
    directories whose attributes are set last (children would change their mtime)."""

    def __init__(self, root_fd: int, report: Report, keep: frozenset[str]) -> None:
        self.root_fd = root_fd
        self.report = report
        self.keep = keep
        #: Paths (as component tuples) of regular files this extraction created: the only
        #: targets a hard link may have.
        self.regular: set[tuple[str, ...]] = set()
        self.directories: dict[tuple[str, ...], _Attrs] = {}

    def member(self, tar: tarfile.TarFile, info: tarfile.TarInfo) -> None:
        """Create one member, or count why not."""
        try:
            created = self._create(tar, info)
        except _Refused as refused:
            self.report.skip(refused.kind, info.name)
            return
        if created:
            self.report.entries += 1

    def _create(self, tar: tarfile.TarFile, info: tarfile.TarInfo) -> bool:
        parts = self._parts(info.name)
        if not parts:
            return False  # the archive's root ('.'): the volume's root keeps its attributes
        if parts[0].startswith(RESERVED_PREFIX) or parts[0] in self.keep:
            raise _Refused("reserved")
        if info.isdir():
            self._directory(parts, info)
        elif info.isreg():
            self._regular(tar, parts, info)
        elif info.issym():
            self._symlink(parts, info)
        elif info.islnk():
            self._hardlink(parts, info)
        elif info.ischr() or info.isblk():
            raise _Refused("device")
        elif info.isfifo():
            raise _Refused("fifo")
        else:
            raise _Refused("unsupported")
        return True

    def _parts(self, name: str, *, count: bool = True) -> tuple[str, ...]:
        if "\0" in name:
            raise _Refused("bad_name")
        if name.startswith("/") and count:
            self.report.neutralised["absolute_paths"] += 1
        parts = tuple(part for part in name.split("/") if part not in ("", "."))
        if ".." in parts:
            raise _Refused("parent_refs")
        return parts

    @contextlib.contextmanager
    def _parent(self, parts: tuple[str, ...], *, create: bool = True) -> Iterator[int]:
        """An fd of the directory that holds ``parts[-1]``, opened component by component
        without following links; missing directories are created (0755)."""
        fd = os.dup(self.root_fd)
        try:
            for part in parts[:-1]:
                try:
                    child = os.open(part, _DIR_OPEN, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(part, 0o755, dir_fd=fd)
                    child = os.open(part, _DIR_OPEN, dir_fd=fd)
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                    if stat.S_ISLNK(st.st_mode):
                        raise _Refused("through_symlink") from None
                    raise _Refused("parent_not_directory") from None
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    def _clear(self, dir_fd: int, name: str, parts: tuple[str, ...]) -> None:
        """Make room for a non-directory member (a later member of one name wins, as in
        tar); a directory is never replaced."""
        self.regular.discard(parts)
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise _Refused("replaces_directory")
        os.unlink(name, dir_fd=dir_fd)

    def _attrs(self, info: tarfile.TarInfo, *, directory: bool) -> _Attrs:
        mode = info.mode & 0o7777
        if not directory and mode & _SETID:
            mode &= ~_SETID
            self.report.neutralised["setid_bits"] += 1
        xattrs = {}
        for key, value in info.pax_headers.items():
            if not key.startswith(_XATTR_PREFIX):
                continue
            name = key[len(_XATTR_PREFIX) :]
            if not name.startswith(_XATTR_NAMESPACE):
                self.report.skip("xattr", f"{info.name} {name}")
                continue
            xattrs[name] = value.encode("utf-8", _ERRORS)
        return _Attrs(mode, info.uid, info.gid, _mtime_ns(info), xattrs)

    def _directory(self, parts: tuple[str, ...], info: tarfile.TarInfo) -> None:
        with self._parent(parts) as parent:
            name = parts[-1]
            try:
                os.mkdir(name, 0o700, dir_fd=parent)
            except FileExistsError:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    self._clear(parent, name, parts)
                    os.mkdir(name, 0o700, dir_fd=parent)
        self.directories[parts] = self._attrs(info, directory=True)

    def _regular(self, tar: tarfile.TarFile, parts: tuple[str, ...], info: tarfile.TarInfo) -> None:
        attrs = self._attrs(info, directory=False)
        with self._parent(parts) as parent:
            name = parts[-1]
            self._clear(parent, name, parts)
            fd = os.open(
                name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=parent,
            )
            try:
                content = tar.extractfile(info)
                assert content is not None
                self.report.bytes += _write_with_holes(content, fd)
                _apply(fd, attrs)
            finally:
                os.close(fd)
        self.regular.add(parts)

    def _symlink(self, parts: tuple[str, ...], info: tarfile.TarInfo) -> None:
        target = info.linkname
        if "\0" in target or not target:
            raise _Refused("bad_name")
        if _points_out(parts, target):
            # Kept: a link is data (a guest's rootfs is full of absolute links). Restore
            # never follows one, and neither does anything else in boxvol.
            self.report.neutralised["symlinks_out"] += 1
        with self._parent(parts) as parent:
            name = parts[-1]
            self._clear(parent, name, parts)
            os.symlink(target, name, dir_fd=parent)
            os.chown(name, info.uid, info.gid, dir_fd=parent, follow_symlinks=False)
            mtime = _mtime_ns(info)
            os.utime(name, ns=(mtime, mtime), dir_fd=parent, follow_symlinks=False)

    def _hardlink(self, parts: tuple[str, ...], info: tarfile.TarInfo) -> None:
        target = self._parts(info.linkname, count=False)
        if target not in self.regular:
            raise _Refused("bad_hardlink")
        with self._parent(target, create=False) as source, self._parent(parts) as parent:
            name = parts[-1]
            if target == parts:
                return
            self._clear(parent, name, parts)
            os.link(target[-1], name, src_dir_fd=source, dst_dir_fd=parent, follow_symlinks=False)
        self.regular.add(parts)

    def finish_directories(self) -> None:
        """Set the directories' attributes, deepest first."""
        for parts, attrs in sorted(self.directories.items(), key=lambda item: -len(item[0])):
            with self._parent(parts, create=False) as parent:
                fd = os.open(parts[-1], _DIR_OPEN, dir_fd=parent)
                try:
                    _apply(fd, attrs)
                finally:
                    os.close(fd)


def _points_out(parts: tuple[str, ...], target: str) -> bool:
    """True if a link at ``parts`` to ``target`` would leave the tree if it were followed."""
    if target.startswith("/"):
        return True
    depth = len(parts) - 1
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def _mtime_ns(info: tarfile.TarInfo) -> int:
    text = info.pax_headers.get("mtime")
    if text is not None:
        try:
            return int(decimal.Decimal(text).scaleb(9).to_integral_value(decimal.ROUND_FLOOR))
        except (decimal.InvalidOperation, ValueError):
            pass
    return int(info.mtime) * 1_000_000_000


def _apply(fd: int, attrs: _Attrs) -> None:
    """Ownership first (it clears set-id bits), then xattrs, mode and mtime."""
    os.fchown(fd, attrs.uid, attrs.gid)
    for name, value in attrs.xattrs.items():
        os.setxattr(fd, name, value)
    os.fchmod(fd, attrs.mode)
    os.utime(fd, ns=(attrs.mtime_ns, attrs.mtime_ns))


def _write_with_holes(content: IO[bytes], fd: int) -> int:
    """Copy ``content`` into the empty file ``fd``, leaving runs of zero blocks as holes;
    the number of bytes."""
    offset = 0
    while chunk := content.read(_CHUNK):
        view = memoryview(chunk)
        if view != _ZEROS[: len(view)]:
            start: int | None = None
            for at in range(0, len(view), _BLOCK):
                zero = view[at : at + _BLOCK] == _ZEROS[: min(_BLOCK, len(view) - at)]
                if zero and start is not None:
                    _pwrite_all(fd, view[start:at], offset + start)
                    start = None
                elif not zero and start is None:
                    start = at
            if start is not None:
                _pwrite_all(fd, view[start:], offset + start)
        offset += len(view)
    os.ftruncate(fd, offset)
    return offset


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


# -- restore: stage, then swap ----------------------------------------------------------


def restore(
    stream: IO[bytes], root_fd: int, *, force: bool, keep: frozenset[str] = frozenset()
) -> Report:
    """Replace the entries below ``root_fd`` with the archive read from ``stream``, all or
    nothing.

    First finishes or undoes a restore a crash interrupted (``recover``). Refuses a
    non-empty root unless ``force`` (Conflict). Extracts into ``STAGED``; any failure
    deletes it, leaving the root as it was. Then moves the old entries into ``OLD``
    (undone on failure), renames ``STAGED`` to ``SWAPPING`` (the commit point), moves its
    entries into the root and deletes ``OLD``. SIGTERM and SIGINT wait while entries move.
    Top-level names in ``keep`` stay where they are throughout."""
    recover(root_fd)
    existing = _entries(root_fd, keep)
    if existing and not force:
        raise Conflict(
            f"the volume is not empty ({len(existing)} top-level entries): a restore "
            "replaces all of its content; give --force (force: true) to replace it"
        )
    os.mkdir(STAGED, 0o700, dir_fd=root_fd)
    try:
        staged = os.open(STAGED, _DIR_OPEN, dir_fd=root_fd)
        try:
            report = unpack(stream, staged, keep=keep)
        finally:
            os.close(staged)
        _drain(stream)
    except BaseException:
        _remove_tree(root_fd, STAGED)
        raise
    with _signals_held():
        _swap(root_fd, keep)
    return report


def _entries(dir_fd: int, keep: frozenset[str]) -> list[str]:
    return [
        name
        for name in os.listdir(dir_fd)
        if not name.startswith(RESERVED_PREFIX) and name not in keep
    ]


def _drain(stream: IO[bytes]) -> None:
    """Read what follows the archive (a writer's padding, up to DRAIN_LIMIT), so the writer
    does not see a broken pipe."""
    left = DRAIN_LIMIT
    while left > 0 and (data := stream.read(min(left, _CHUNK))):
        left -= len(data)


def _swap(root_fd: int, keep: frozenset[str]) -> None:
    os.mkdir(OLD, 0o700, dir_fd=root_fd)
    old = os.open(OLD, _DIR_OPEN, dir_fd=root_fd)
    try:
        moved: list[str] = []
        try:
            for name in _entries(root_fd, keep):
                os.rename(name, name, src_dir_fd=root_fd, dst_dir_fd=old)
                moved.append(name)
        except BaseException:
            for name in moved:
                os.rename(name, name, src_dir_fd=old, dst_dir_fd=root_fd)
            os.rmdir(OLD, dir_fd=root_fd)
            _remove_tree(root_fd, STAGED)
            raise
    finally:
        os.close(old)
    os.rename(STAGED, SWAPPING, src_dir_fd=root_fd, dst_dir_fd=root_fd)
    _finish_swap(root_fd)


def _finish_swap(root_fd: int) -> None:
    _empty_into_root(root_fd, SWAPPING)
    _remove_tree(root_fd, OLD)


def _empty_into_root(root_fd: int, directory: str) -> None:
    """Move every entry of ``directory`` (a reserved directory in the root) into the root,
    then remove the emptied directory."""
    fd = os.open(directory, _DIR_OPEN, dir_fd=root_fd)
    try:
        for name in os.listdir(fd):
            os.rename(name, name, src_dir_fd=fd, dst_dir_fd=root_fd)
    finally:
        os.close(fd)
    os.rmdir(directory, dir_fd=root_fd)


def recover(root_fd: int) -> str | None:
    """Finish or undo a restore that a crash interrupted; what was done, if anything.

    ``SWAPPING`` exists: the archive was fully extracted and every old entry moved out, so
    the swap is finished. Else ``STAGED`` exists: the old entries in ``OLD`` (if any) move
    back and the staged tree is deleted. Else a lone ``OLD`` is what a finished swap had not
    yet deleted."""
    present = set(os.listdir(root_fd))
    if SWAPPING in present:
        if OLD not in present:
            os.mkdir(OLD, 0o700, dir_fd=root_fd)
        _finish_swap(root_fd)
        action = "finished"
    elif STAGED in present:
        if OLD in present:
            _empty_into_root(root_fd, OLD)
        _remove_tree(root_fd, STAGED)
        action = "undone"
    elif OLD in present:
        _remove_tree(root_fd, OLD)
        action = "cleaned"
    else:
        return None
    log.warning("an interrupted restore was %s", action)
    return action


def _remove_tree(dir_fd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(name, dir_fd=dir_fd)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGTERM and SIGINT wait until the block is done (delivered after it)."""
    held = {signal.SIGTERM, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
