"""Randomized differential test: one seeded sequence of file-system operations, two trees.

This module owns the operation generator (a pure function of the seed), the executor that applies
an operation to one tree, the comparison of every outcome and of the final trees, and the failure
report. It drives any pair of directories, so the FUSE integration test can point it at an export
(`<runtime>/fs/<export-id>/`) and at a plain ext4 directory. It must not import boxvol code, trio or
pyfuse3.

Every operation reaches its tree only through file descriptors: the root is opened once, each
parent directory is walked one component at a time with `O_PATH | O_NOFOLLOW | O_DIRECTORY`, and
the final name is used with a `*at` call that does not follow symlinks (or an `open` with
`O_NOFOLLOW`). A symlink planted anywhere in the namespace therefore never takes the harness out of
its roots: the walk fails with ENOTDIR and the final open with ELOOP, in both trees alike.

Public entry points: `run_differential` (what a test calls), `run_trees` (the same over two `Tree`
objects, so a test can substitute a broken tree), `generate_ops`, `seed_from_env`,
`steps_from_env`. `python -m tests.fsdiff.engine --help` runs or lists a sequence by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import hashlib
import os
import random
import stat
import sys
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Literal, TypeAlias

DEFAULT_STEPS = 10_000
DEFAULT_REPLAY = "pytest tests/fsdiff"
SEED_ENV = "BOXVOL_FSDIFF_SEED"
STEPS_ENV = "BOXVOL_FSDIFF_STEPS"
HISTORY = 20  # operations quoted before the one that failed

# --- the namespace --------------------------------------------------------------------------
# Small on purpose: four names per directory and four levels, so that operations keep meeting
# existing entries (or a missing parent, or an entry of the wrong type) instead of always creating.
# Any name can become any type, but names lean: "a" and "b" mostly become directories, "c" and
# "d" mostly files, so that an operation meant for one type finds it often and the other type
# (EISDIR, ENOTDIR, ...) often enough. A renamed subtree stays inside the namespace.
DIR_NAMES = ("a", "b")
FILE_NAMES = ("c", "d")
COMPONENTS = DIR_NAMES + FILE_NAMES
DEPTH_WEIGHTS = (30, 35, 25, 10)  # paths of 1, 2, 3 and 4 components
LEAN = 0.85  # how often a name follows its lean
LONG_NAME = "n" * 255  # the longest legal name (the export promises NAME_MAX 255)
TOO_LONG_NAME = "m" * 256  # ENAMETOOLONG everywhere

SYMLINK_TARGETS = (
    "a",
    "b/c",
    "../a",
    "../../../../../etc",  # an escape attempt: stored as data, never followed by the harness
    "/etc/passwd",
    "/",
    ".",
    "",  # ENOENT from symlinkat
    "x" * 1000,
    "t" * 4095,  # the longest target Linux accepts
    "u" * 4096,  # ENAMETOOLONG
)
XATTR_NAMES = ("user.a", "user.b", "user.c", "user." + "x" * 250)  # last: 255 bytes, the maximum
BAD_XATTR_NAME = "user." + "y" * 251  # 256 bytes: ERANGE
FILE_MODES = (0o644, 0o600, 0o666, 0o755, 0o777, 0o000, 0o640, 0o444, 0o4755, 0o2755, 0o1777)
DIR_MODES = (0o755, 0o700, 0o777, 0o000, 0o555, 0o1777, 0o2775, 0o750)
UMASKS = (0o022, 0o000, 0o077, 0o002, 0o027, 0o777)
HELD_SLOTS = 3  # files a run keeps open across steps (open-unlinked, renamed-while-open, ...)

# --- syscalls the os module does not offer --------------------------------------------------

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_SYMLINK_NOFOLLOW = 0x100
SYS_FCHMODAT2 = 452  # x86_64 (and every architecture using the generic table), Linux >= 6.6
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


def _check(result: int) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


_libc.renameat2.argtypes = (
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
)
_libc.renameat2.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long
_libc.utimensat.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int)
_libc.utimensat.restype = ctypes.c_int


def renameat2(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str, flags: int) -> None:
    """renameat2(2) from libc; raises OSError with the kernel's errno."""
    _check(int(_libc.renameat2(src_dir_fd, os.fsencode(src), dst_dir_fd, os.fsencode(dst), flags)))


def chmod_nofollow(dir_fd: int, name: str, mode: int) -> None:
    """fchmodat2(dir_fd, name, mode, AT_SYMLINK_NOFOLLOW): the kernel itself answers EOPNOTSUPP
    for a symlink, where os.chmod(follow_symlinks=False) would raise NotImplementedError."""
    result = int(
        _libc.syscall(
            ctypes.c_long(SYS_FCHMODAT2),
            ctypes.c_int(dir_fd),
            ctypes.c_char_p(os.fsencode(name)),
            ctypes.c_uint(mode),
            ctypes.c_int(AT_SYMLINK_NOFOLLOW),
        )
    )
    if result != 0 and ctypes.get_errno() == errno.ENOSYS:  # kernel older than 6.6
        try:
            os.chmod(name, mode, dir_fd=dir_fd, follow_symlinks=False)
        except NotImplementedError:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP)) from None
        return
    _check(result)


TimeArg: TypeAlias = "int | Literal['now', 'omit']"


def _timespec(value: TimeArg) -> _Timespec:
    if value == "now":
        return _Timespec(0, UTIME_NOW)
    if value == "omit":
        return _Timespec(0, UTIME_OMIT)
    return _Timespec(value // 1_000_000_000, value % 1_000_000_000)


def utimensat_nofollow(dir_fd: int, name: str, atime: TimeArg, mtime: TimeArg) -> None:
    """utimensat(2) with AT_SYMLINK_NOFOLLOW, including UTIME_NOW and UTIME_OMIT."""
    times = (_Timespec * 2)(_timespec(atime), _timespec(mtime))
    _check(int(_libc.utimensat(dir_fd, os.fsencode(name), times, AT_SYMLINK_NOFOLLOW)))


# --- operations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One generated operation. Only the fields listed in `ARGS[kind]` mean anything."""

    kind: str
    path: str = ""
    other: str = ""  # rename/link destination, symlink target
    mode: int = 0
    flags: int = 0
    offset: int = 0
    size: int = 0
    data: bytes = b""
    data2: bytes = b""
    xname: str = ""
    atime: TimeArg = "omit"
    mtime: TimeArg = "omit"
    slot: int = 0

    def describe(self) -> str:
        """`kind(arg=value, ...)` with long names and data abbreviated."""
        parts = [
            f"{_LABELS.get((self.kind, name), name)}={_render_arg(self, name)}"
            for name in ARGS[self.kind]
        ]
        return f"{self.kind}({', '.join(parts)})"


ARGS: dict[str, tuple[str, ...]] = {
    "create": ("path", "flags", "mode"),
    "mkfifo": ("path", "mode"),
    "write": ("path", "offset", "data"),
    "append": ("path", "flags", "data"),
    "append_pwrite": ("path", "offset", "data"),
    "append_mixed": ("path", "data", "offset", "data2"),
    "open_trunc": ("path", "flags", "mode"),
    "truncate": ("path", "size"),
    "read": ("path", "offset", "size"),
    "rename": ("path", "other"),
    "rename_noreplace": ("path", "other"),
    "rename_exchange": ("path", "other"),
    "link": ("path", "other"),
    "unlink": ("path",),
    "mkdir": ("path", "mode"),
    "rmdir": ("path",),
    "symlink": ("other", "path"),
    "readlink": ("path",),
    "chmod": ("path", "mode"),
    "utime": ("path", "atime", "mtime"),
    "setxattr": ("path", "xname", "data", "flags"),
    "getxattr": ("path", "xname"),
    "listxattr": ("path",),
    "removexattr": ("path", "xname"),
    "stat": ("path",),
    "lstat": ("path",),
    "listdir": ("path",),
    "umask": ("mode",),
    "hold": ("slot", "path", "flags"),
    "held_write": ("slot", "offset", "data"),
    "held_read": ("slot", "offset", "size"),
    "held_stat": ("slot",),
    "held_truncate": ("slot", "size"),
    "release": ("slot",),
}

# How `describe` names a field where the generic name would mislead.
_LABELS = {
    ("symlink", "other"): "target",
    **{(kind, "path"): "src" for kind in ("rename", "rename_noreplace", "rename_exchange", "link")},
    **{
        (kind, "other"): "dst" for kind in ("rename", "rename_noreplace", "rename_exchange", "link")
    },
}

# Which explicitly set mtimes an operation can change (see `_track_mtimes`). Operations in
# neither set (reads, stat, listdir, xattrs, chmod, hold and release, umask) change no mtime.
# Data changes reach a file's mtime through any of its hard links, hence "every non-directory".
DATA_KINDS = frozenset(
    {
        "write",
        "append",
        "append_pwrite",
        "append_mixed",
        "truncate",
        "open_trunc",
        "held_write",
        "held_truncate",
    }
)
# Changes to names: the parent directories' mtimes, and the paths themselves move or vanish.
NAMESPACE_KINDS = frozenset(
    {
        "create",
        "mkfifo",
        "mkdir",
        "symlink",
        "link",
        "unlink",
        "rmdir",
        "rename",
        "rename_noreplace",
        "rename_exchange",
    }
)

_OPEN_FLAG_NAMES = (
    (os.O_CREAT, "O_CREAT"),
    (os.O_EXCL, "O_EXCL"),
    (os.O_TRUNC, "O_TRUNC"),
    (os.O_APPEND, "O_APPEND"),
)


def _open_flags_name(flags: int) -> str:
    names = [{os.O_RDONLY: "O_RDONLY", os.O_WRONLY: "O_WRONLY", os.O_RDWR: "O_RDWR"}[flags & 3]]
    names += [name for bit, name in _OPEN_FLAG_NAMES if flags & bit]
    return "|".join(names)


def _short_path(path: str) -> str:
    return repr("/".join(c if len(c) <= 16 else f"{c[0]}*{len(c)}" for c in path.split("/")))


def _short_bytes(data: bytes) -> str:
    if len(data) <= 16:
        return repr(data)
    return f"<{len(data)} bytes sha256:{hashlib.sha256(data).hexdigest()[:12]}>"


def _render_arg(op: Op, name: str) -> str:
    value = getattr(op, name)
    if name in ("path", "other", "xname"):
        return _short_path(value)
    if name in ("data", "data2"):
        return _short_bytes(value)
    if name == "mode":
        return oct(value)
    if name == "flags":
        if op.kind == "setxattr":
            return {0: "0", os.XATTR_CREATE: "XATTR_CREATE", os.XATTR_REPLACE: "XATTR_REPLACE"}[
                value
            ]
        return _open_flags_name(value)
    return repr(value)


class _Generator:
    """Draws operations from one `random.Random`; never looks at either tree, so the sequence is
    a function of the seed alone and a prefix of it does not depend on how many steps follow."""

    def __init__(self, seed: int, without: frozenset[str] = frozenset()) -> None:
        self.rng = random.Random(seed)
        table: tuple[tuple[str, Callable[[], Op], int], ...] = (
            ("create", self._create, 9),
            ("mkfifo", self._mkfifo, 1),
            ("write", self._write, 10),
            ("append", self._append, 3),
            ("append_pwrite", self._append_pwrite, 1),
            ("append_mixed", self._append_mixed, 2),
            ("open_trunc", self._open_trunc, 3),
            ("truncate", self._truncate, 5),
            ("read", self._read, 8),
            ("rename", self._rename("rename"), 6),
            ("rename_noreplace", self._rename("rename_noreplace"), 3),
            ("rename_exchange", self._rename("rename_exchange"), 3),
            ("link", self._link, 7),
            ("unlink", self._unlink, 9),
            ("mkdir", self._mkdir, 5),
            ("rmdir", self._rmdir, 5),
            ("symlink", self._symlink, 3),
            ("readlink", self._readlink, 2),
            ("chmod", self._chmod, 4),
            ("utime", self._utime, 3),
            ("setxattr", self._setxattr, 4),
            ("getxattr", self._getxattr, 3),
            ("listxattr", self._listxattr, 2),
            ("removexattr", self._removexattr, 2),
            ("stat", self._stat("stat"), 4),
            ("lstat", self._stat("lstat"), 4),
            ("listdir", self._listdir, 4),
            ("umask", self._umask, 1),
            ("hold", self._hold, 4),
            ("held_write", self._held_write, 3),
            ("held_read", self._held_read, 2),
            ("held_stat", self._held_stat, 1),
            ("held_truncate", self._held_truncate, 1),
            ("release", self._release, 1),
        )
        # Excluding kinds (by hand, to look past a known difference) changes the sequence.
        chosen = [(builder, weight) for kind, builder, weight in table if kind not in without]
        self.builders = [builder for builder, _ in chosen]
        self.weights = [weight for _, weight in chosen]

    def next(self) -> Op:
        (builder,) = self.rng.choices(self.builders, weights=self.weights)
        return builder()

    # -- argument draws

    def path(self, lean: tuple[str, ...] = COMPONENTS) -> str:
        """A path in the namespace; `lean` is preferred for its last component."""
        r = self.rng.random()
        if r < 0.015:
            return self.rng.choice((LONG_NAME, f"a/{LONG_NAME}"))
        if r < 0.02:
            return self.rng.choice((TOO_LONG_NAME, f"b/{TOO_LONG_NAME}"))
        (depth,) = self.rng.choices(range(1, len(DEPTH_WEIGHTS) + 1), weights=DEPTH_WEIGHTS)
        parts = [self.name(DIR_NAMES) for _ in range(depth - 1)]
        return "/".join([*parts, self.name(lean)])

    def name(self, lean: tuple[str, ...]) -> str:
        return self.rng.choice(lean if self.rng.random() < LEAN else COMPONENTS)

    def file(self) -> str:
        return self.path(FILE_NAMES)

    def directory(self) -> str:
        return self.path(DIR_NAMES)

    def sibling(self, path: str) -> str:
        """Half the time a name in the same directory as `path` (renames and links within one
        directory are the common case), otherwise any path; leaning like `path`'s name."""
        head, _, name = path.rpartition("/")
        lean = DIR_NAMES if name in DIR_NAMES else FILE_NAMES
        if self.rng.random() < 0.5:
            name = self.name(lean)
            return f"{head}/{name}" if head else name
        return self.path(lean)

    def file_mode(self) -> int:
        if self.rng.random() < 0.2:
            return self.rng.randrange(0o10000)
        return self.rng.choice(FILE_MODES)

    def data(self) -> bytes:
        r = self.rng.random()
        if r < 0.05:
            n = 0
        elif r < 0.75:
            n = self.rng.randint(1, 512)
        elif r < 0.98:
            n = self.rng.randint(513, 9000)
        else:
            n = self.rng.randint(65_536, 140_000)  # several FUSE write requests
        return self.rng.randbytes(n)

    def offset(self) -> int:
        r = self.rng.random()
        if r < 0.3:
            return 0
        if r < 0.85:
            return self.rng.randint(0, 16_384)
        if r < 0.97:
            return self.rng.randint(16_385, 300_000)  # usually past EOF: a hole
        return self.rng.choice((4095, 4096, 65_535, 65_536, 131_072)) + self.rng.randint(0, 1)

    def length(self) -> int:
        return self.rng.choice((0, 1, 100, 4096, 5000, 20_000, 70_000, 300_000))

    def new_size(self) -> int:
        r = self.rng.random()
        if r < 0.2:
            return 0
        if r < 0.9:
            return self.rng.randint(0, 16_384)
        return self.rng.randint(16_385, 1_100_000)

    def timestamp(self) -> TimeArg:
        r = self.rng.random()
        if r < 0.1:
            return "now"
        if r < 0.2:
            return "omit"
        if r < 0.3:
            return self.rng.choice((0, 1, 999_999_999, (1 << 31) * 1_000_000_000))
        return self.rng.randint(0, 4_000_000_000) * 1_000_000_000 + self.rng.randint(0, 10**9 - 1)

    # -- builders

    def _create(self) -> Op:
        flags = self.rng.choice(
            (
                os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                os.O_RDWR | os.O_CREAT | os.O_EXCL,
                os.O_WRONLY | os.O_CREAT,
                os.O_RDWR | os.O_CREAT,
                os.O_RDONLY | os.O_CREAT,
            )
        )
        return Op("create", path=self.file(), flags=flags, mode=self.file_mode())

    def _mkfifo(self) -> Op:
        return Op("mkfifo", path=self.file(), mode=self.file_mode())

    def _write(self) -> Op:
        return Op("write", path=self.file(), offset=self.offset(), data=self.data())

    def _append(self) -> Op:
        flags = os.O_WRONLY | os.O_APPEND | self.rng.choice((0, os.O_CREAT))
        return Op("append", path=self.file(), flags=flags, data=self.data())

    def _append_pwrite(self) -> Op:
        return Op("append_pwrite", path=self.file(), offset=self.offset(), data=self.data())

    def _append_mixed(self) -> Op:
        return Op(
            "append_mixed",
            path=self.file(),
            data=self.data(),
            offset=self.offset(),
            data2=self.data(),
        )

    def _open_trunc(self) -> Op:
        flags = self.rng.choice(
            (
                os.O_WRONLY | os.O_TRUNC,
                os.O_RDWR | os.O_TRUNC,
                os.O_WRONLY | os.O_TRUNC | os.O_CREAT,
            )
        )
        return Op("open_trunc", path=self.file(), flags=flags, mode=self.file_mode())

    def _truncate(self) -> Op:
        return Op("truncate", path=self.file(), size=self.new_size())

    def _read(self) -> Op:
        return Op("read", path=self.file(), offset=self.offset(), size=self.length())

    def _rename(self, kind: str) -> Callable[[], Op]:
        def build() -> Op:
            src = self.path()
            return Op(kind, path=src, other=self.sibling(src))

        return build

    def _link(self) -> Op:
        src = self.file()
        return Op("link", path=src, other=self.sibling(src))

    def _unlink(self) -> Op:
        return Op("unlink", path=self.file())

    def _mkdir(self) -> Op:
        path = self.directory()
        mode = self.rng.choice(DIR_MODES) if self.rng.random() < 0.8 else self.file_mode()
        return Op("mkdir", path=path, mode=mode)

    def _rmdir(self) -> Op:
        path = self.directory()
        return Op("rmdir", path=path)

    def _symlink(self) -> Op:
        return Op("symlink", path=self.file(), other=self.rng.choice(SYMLINK_TARGETS))

    def _readlink(self) -> Op:
        return Op("readlink", path=self.file())

    def _chmod(self) -> Op:
        return Op("chmod", path=self.path(), mode=self.file_mode())

    def _utime(self) -> Op:
        return Op("utime", path=self.path(), atime=self.timestamp(), mtime=self.timestamp())

    def xname(self) -> str:
        return BAD_XATTR_NAME if self.rng.random() < 0.02 else self.rng.choice(XATTR_NAMES)

    def _setxattr(self) -> Op:
        flags = self.rng.choice((0, 0, os.XATTR_CREATE, os.XATTR_REPLACE))
        # Small values: with several names the total stays inside ext4's one xattr block, so no
        # ENOSPC that would depend on the backing file system's layout.
        value = self.rng.randbytes(self.rng.choice((0, 1, 7, 64, 200, 700)))
        return Op("setxattr", path=self.path(), xname=self.xname(), data=value, flags=flags)

    def _getxattr(self) -> Op:
        return Op("getxattr", path=self.path(), xname=self.xname())

    def _listxattr(self) -> Op:
        return Op("listxattr", path=self.path())

    def _removexattr(self) -> Op:
        return Op("removexattr", path=self.path(), xname=self.xname())

    def _stat(self, kind: str) -> Callable[[], Op]:
        return lambda: Op(kind, path=self.path())

    def _listdir(self) -> Op:
        path = "" if self.rng.random() < 0.2 else self.directory()
        return Op("listdir", path=path)

    def _umask(self) -> Op:
        return Op("umask", mode=self.rng.choice(UMASKS))

    def _hold(self) -> Op:
        flags = self.rng.choice((os.O_RDWR, os.O_RDWR | os.O_APPEND, os.O_RDONLY, os.O_WRONLY))
        return Op("hold", slot=self.rng.randrange(HELD_SLOTS), path=self.file(), flags=flags)

    def _held_write(self) -> Op:
        return Op(
            "held_write",
            slot=self.rng.randrange(HELD_SLOTS),
            offset=self.offset(),
            data=self.data(),
        )

    def _held_read(self) -> Op:
        return Op(
            "held_read",
            slot=self.rng.randrange(HELD_SLOTS),
            offset=self.offset(),
            size=self.length(),
        )

    def _held_stat(self) -> Op:
        return Op("held_stat", slot=self.rng.randrange(HELD_SLOTS))

    def _held_truncate(self) -> Op:
        return Op("held_truncate", slot=self.rng.randrange(HELD_SLOTS), size=self.new_size())

    def _release(self) -> Op:
        return Op("release", slot=self.rng.randrange(HELD_SLOTS))


def generate_ops(seed: int, steps: int, *, without: frozenset[str] = frozenset()) -> Iterator[Op]:
    """The first `steps` operations of the sequence for `seed` (without the kinds in `without`:
    a different sequence, for exploring by hand)."""
    gen = _Generator(seed, without)
    for _ in range(steps):
        yield gen.next()


# --- outcomes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatView:
    """The stat fields two file systems must agree on. Not compared: st_ino and st_dev (differ by
    construction), atime (reads update it, depending on mount options), ctime (set by the kernel
    at the time of the change), st_blocks and st_blksize (allocation policy), and st_size of
    directories (ext4 counts blocks, tmpfs counts entries). mtime only when explicitly set."""

    mode: int
    size: int | None
    nlink: int
    uid: int
    gid: int
    mtime_ns: int | None

    @classmethod
    def of(cls, st: os.stat_result) -> StatView:
        size = None if stat.S_ISDIR(st.st_mode) else st.st_size
        return cls(st.st_mode, size, st.st_nlink, st.st_uid, st.st_gid, st.st_mtime_ns)

    def render(self) -> str:
        text = f"mode={self.mode:#o} size={self.size} nlink={self.nlink} uid={self.uid}"
        text += f" gid={self.gid}"
        if self.mtime_ns is not None:
            text += f" mtime_ns={self.mtime_ns}"
        return f"stat({text})"


Value: TypeAlias = "bool | int | str | bytes | StatView | Fields | tuple[Value, ...] | None"


@dataclass(frozen=True)
class Fields:
    """Several named results of one operation, e.g. bytes written and the size afterwards."""

    items: tuple[tuple[str, Value], ...]

    @classmethod
    def of(cls, **values: Value) -> Fields:
        return cls(tuple(values.items()))

    def get(self, name: str) -> Value:
        return dict(self.items).get(name)

    def render(self) -> str:
        return "{" + ", ".join(f"{k}={_render_value(v)}" for k, v in self.items) + "}"


@dataclass(frozen=True)
class Outcome:
    """What one operation did to one tree: a value, or the errno of the OSError it raised."""

    value: Value = None
    error: int | None = None

    def render(self) -> str:
        if self.error is not None:
            name = errno.errorcode.get(self.error, str(self.error))
            return f"error {name} ({os.strerror(self.error)})"
        return f"ok {_render_value(self.value)}"

    @property
    def label(self) -> str:
        return "ok" if self.error is None else errno.errorcode.get(self.error, str(self.error))


def _render_value(value: Value) -> str:
    if isinstance(value, bytes):
        return _short_bytes(value)
    if isinstance(value, StatView | Fields):
        return value.render()
    if isinstance(value, tuple):
        return "(" + ", ".join(_render_value(v) for v in value) + ")"
    if isinstance(value, str) and len(value) > 40:
        return f"{value[:20]!r}... ({len(value)} chars)"
    return repr(value)


def _first_difference(a: bytes, b: bytes) -> str:
    index = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    if index is None:
        index = min(len(a), len(b))
    return f"{len(a)} vs {len(b)} bytes, first difference at offset {index}"


def _differences(a: Value, b: Value, where: str = "") -> list[str]:
    """Human-readable field-by-field differences between two values (subject first)."""
    if a == b:
        return []
    if isinstance(a, StatView) and isinstance(b, StatView):
        out = []
        for name in ("mode", "size", "nlink", "uid", "gid", "mtime_ns"):
            x, y = getattr(a, name), getattr(b, name)
            if x != y:
                shown = (f"{x:#o}", f"{y:#o}") if name == "mode" else (str(x), str(y))
                out.append(f"{where}{name} {shown[0]} (subject) != {shown[1]} (reference)")
        return out
    if isinstance(a, bytes) and isinstance(b, bytes):
        return [f"{where}data differs: {_first_difference(a, b)}"]
    if (
        isinstance(a, Fields)
        and isinstance(b, Fields)
        and [k for k, _ in a.items] == [k for k, _ in b.items]
    ):
        out = []
        for (name, x), (_, y) in zip(a.items, b.items, strict=True):
            out += _differences(x, y, f"{where}{name}: ")
        return out
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            out += _differences(x, y, f"{where}[{i}] ")
        return out
    return [f"{where}{_render_value(a)} (subject) != {_render_value(b)} (reference)"]


def _mask_mtime(value: Value) -> Value:
    if isinstance(value, StatView):
        return replace(value, mtime_ns=None)
    if isinstance(value, tuple):
        return tuple(_mask_mtime(v) for v in value)
    return value


# --- one tree -------------------------------------------------------------------------------

# Every open adds these: never follow a final symlink; never block on a FIFO that has no peer
# (O_NONBLOCK changes nothing for regular files and directories); no fd leaks into children.
OPEN_BASE = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# Walking a parent: only a lookup, no open sent to the file system; ENOTDIR for a symlink.
WALK_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _ebadf() -> OSError:
    return OSError(errno.EBADF, os.strerror(errno.EBADF))


def _user_xattrs(fd: int) -> list[str]:
    # Other namespaces are not the harness's business: security.* depends on the LSM of each
    # file system, system.* on ACL support, and the export refuses trusted.* by policy.
    return sorted(name for name in os.listxattr(fd) if name.startswith("user."))


def _file_type(mode: int) -> str:
    return {
        stat.S_IFREG: "file",
        stat.S_IFDIR: "dir",
        stat.S_IFLNK: "symlink",
        stat.S_IFIFO: "fifo",
    }.get(stat.S_IFMT(mode), f"other({stat.S_IFMT(mode):#o})")


Xattrs: TypeAlias = "tuple[tuple[str, bytes], ...]"
# path -> (lstat, content of a regular file, target of a symlink, user xattrs)
_Found: TypeAlias = "dict[str, tuple[os.stat_result, bytes | None, str | None, Xattrs]]"


@dataclass(frozen=True)
class Entry:
    """One name in a final tree, with everything compared about it."""

    kind: str
    view: StatView
    content: bytes | None
    target: str | None
    xattrs: Xattrs
    links: tuple[str, ...]  # the other names of the same inode, within the tree

    def differences(self, other: Entry) -> list[str]:
        out = _differences(self.view, other.view)
        if self.kind != other.kind:
            out.insert(0, f"type {self.kind} (subject) != {other.kind} (reference)")
        if self.content != other.content:
            diff = _first_difference(self.content or b"", other.content or b"")
            out.append(f"content differs: {diff}")
        if self.target != other.target:
            mine, theirs = _render_value(self.target), _render_value(other.target)
            out.append(f"symlink target {mine} (subject) != {theirs} (reference)")
        if self.xattrs != other.xattrs:
            mine, theirs = _xattr_summary(self.xattrs), _xattr_summary(other.xattrs)
            out.append(f"xattrs {mine} (subject) != {theirs} (reference)")
        if self.links != other.links:
            out.append(
                f"hard links {list(self.links)} (subject) != {list(other.links)} (reference)"
            )
        return out


def _xattr_summary(xattrs: Xattrs) -> str:
    return "{" + ", ".join(f"{_short_path(k)}: {_short_bytes(v)}" for k, v in xattrs) + "}"


class Tree:
    """One root and the operations the engine applies to it.

    Each `op_<kind>` method performs one operation and returns its value; `apply` turns an
    OSError into an `Outcome` carrying its errno. A test can subclass this to break one operation
    on purpose and prove that the harness notices.

    Attributes:
        root: the directory given.
        root_fd: an O_RDONLY directory fd on it, opened once; every path is resolved from it.
        held: the fds kept open across steps by `hold`, by slot.
    """

    root: Path
    root_fd: int
    held: dict[int, int]

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root_fd = os.open(root, DIR_FLAGS)
        self.held = {}

    def __enter__(self) -> Tree:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.release_all()
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    def release_all(self) -> None:
        """Close every held fd (errors included: a failing release is not this step's result)."""
        for slot in sorted(self.held):
            with contextlib.suppress(OSError):
                os.close(self.held.pop(slot))

    def apply(self, op: Op) -> Outcome:
        handler: Callable[[Op], Value] = getattr(self, f"op_{op.kind}")
        try:
            return Outcome(value=handler(op))
        except OSError as exc:
            return Outcome(error=exc.errno)

    # -- resolution

    @contextlib.contextmanager
    def parent(self, path: str) -> Iterator[tuple[int, str]]:
        """An fd on the directory holding `path`'s last component, and that component.

        Walks one component at a time with O_NOFOLLOW, so a symlink in the middle fails with
        ENOTDIR instead of being followed out of the root."""
        *dirs, name = path.split("/")
        fd = self.root_fd
        opened: list[int] = []
        try:
            for component in dirs:
                fd = os.open(component, WALK_FLAGS, dir_fd=fd)
                opened.append(fd)
            yield fd, name
        finally:
            for each in opened:
                os.close(each)

    @contextlib.contextmanager
    def opened(self, path: str, flags: int, mode: int = 0o644) -> Iterator[int]:
        """An fd on `path`, opened with `flags | OPEN_BASE` and closed afterwards (a failing close,
        e.g. a flush error from a FUSE server, is the operation's error)."""
        with self.parent(path) as (parent, name):
            fd = os.open(name, flags | OPEN_BASE, mode, dir_fd=parent)
        try:
            yield fd
        finally:
            os.close(fd)

    def lstat(self, path: str) -> StatView:
        with self.parent(path) as (parent, name):
            return StatView.of(os.stat(name, dir_fd=parent, follow_symlinks=False))

    # -- operations

    def op_create(self, op: Op) -> Value:
        with self.opened(op.path, op.flags, op.mode) as fd:
            return StatView.of(os.fstat(fd))

    def op_mkfifo(self, op: Op) -> Value:
        with self.parent(op.path) as (parent, name):
            os.mkfifo(name, op.mode, dir_fd=parent)
        return self.lstat(op.path)

    def op_write(self, op: Op) -> Value:
        with self.opened(op.path, os.O_WRONLY) as fd:
            written = os.pwrite(fd, op.data, op.offset)
            return Fields.of(written=written, size=os.fstat(fd).st_size)

    def op_append(self, op: Op) -> Value:
        with self.opened(op.path, op.flags) as fd:
            written = os.write(fd, op.data)
            position = os.lseek(fd, 0, os.SEEK_CUR)
            return Fields.of(written=written, position=position, size=os.fstat(fd).st_size)

    def op_append_pwrite(self, op: Op) -> Value:
        # Linux appends on an O_APPEND fd whatever offset pwrite is given.
        with self.opened(op.path, os.O_WRONLY | os.O_APPEND) as fd:
            written = os.pwrite(fd, op.data, op.offset)
            return Fields.of(written=written, size=os.fstat(fd).st_size)

    def op_append_mixed(self, op: Op) -> Value:
        # Two opens of one file, one with O_APPEND and one without: the flag belongs to the open,
        # not to the inode.
        with (
            self.opened(op.path, os.O_WRONLY | os.O_APPEND) as appending,
            self.opened(op.path, os.O_WRONLY) as positional,
        ):
            second = os.pwrite(positional, op.data2, op.offset)
            first = os.write(appending, op.data)
            size = os.fstat(positional).st_size
            return Fields.of(appended=first, written_at_offset=second, size=size)

    def op_open_trunc(self, op: Op) -> Value:
        with self.opened(op.path, op.flags, op.mode) as fd:
            return StatView.of(os.fstat(fd))

    def op_truncate(self, op: Op) -> Value:
        with self.opened(op.path, os.O_WRONLY) as fd:
            os.ftruncate(fd, op.size)
            return Fields.of(size=os.fstat(fd).st_size)

    def op_read(self, op: Op) -> Value:
        with self.opened(op.path, os.O_RDONLY) as fd:
            return os.pread(fd, op.size, op.offset)

    def op_rename(self, op: Op) -> Value:
        with self.parent(op.path) as (src_dir, src), self.parent(op.other) as (dst_dir, dst):
            os.rename(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir)
        return None

    def op_rename_noreplace(self, op: Op) -> Value:
        with self.parent(op.path) as (src_dir, src), self.parent(op.other) as (dst_dir, dst):
            renameat2(src_dir, src, dst_dir, dst, RENAME_NOREPLACE)
        return None

    def op_rename_exchange(self, op: Op) -> Value:
        with self.parent(op.path) as (src_dir, src), self.parent(op.other) as (dst_dir, dst):
            renameat2(src_dir, src, dst_dir, dst, RENAME_EXCHANGE)
        return None

    def op_link(self, op: Op) -> Value:
        with self.parent(op.path) as (src_dir, src), self.parent(op.other) as (dst_dir, dst):
            # follow_symlinks=False: linkat without AT_SYMLINK_FOLLOW links a symlink itself.
            os.link(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir, follow_symlinks=False)
        return self.lstat(op.other)

    def op_unlink(self, op: Op) -> Value:
        with self.parent(op.path) as (parent, name):
            os.unlink(name, dir_fd=parent)
        return None

    def op_mkdir(self, op: Op) -> Value:
        with self.parent(op.path) as (parent, name):
            os.mkdir(name, op.mode, dir_fd=parent)
        return self.lstat(op.path)

    def op_rmdir(self, op: Op) -> Value:
        with self.parent(op.path) as (parent, name):
            os.rmdir(name, dir_fd=parent)
        return None

    def op_symlink(self, op: Op) -> Value:
        with self.parent(op.path) as (parent, name):
            os.symlink(op.other, name, dir_fd=parent)
        return self.lstat(op.path)

    def op_readlink(self, op: Op) -> Value:
        with self.parent(op.path) as (parent, name):
            return os.readlink(name, dir_fd=parent)

    def op_chmod(self, op: Op) -> Value:
        with self.parent(op.path) as (parent, name):
            chmod_nofollow(parent, name, op.mode)
        return self.lstat(op.path)

    def op_utime(self, op: Op) -> Value:
        with self.parent(op.path) as (parent, name):
            utimensat_nofollow(parent, name, op.atime, op.mtime)
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        # Right after an explicit set, both times must read back exactly (to the nanosecond).
        atime = st.st_atime_ns if isinstance(op.atime, int) else None
        mtime = st.st_mtime_ns if isinstance(op.mtime, int) else None
        return Fields.of(type=_file_type(st.st_mode), atime_ns=atime, mtime_ns=mtime)

    # xattrs go through an fd opened with O_NOFOLLOW: Python has no *xattrat, and user.* xattrs
    # exist only on regular files and directories anyway.

    def op_setxattr(self, op: Op) -> Value:
        with self.opened(op.path, os.O_RDONLY) as fd:
            os.setxattr(fd, op.xname, op.data, op.flags)
        return None

    def op_getxattr(self, op: Op) -> Value:
        with self.opened(op.path, os.O_RDONLY) as fd:
            return os.getxattr(fd, op.xname)

    def op_listxattr(self, op: Op) -> Value:
        with self.opened(op.path, os.O_RDONLY) as fd:
            return tuple(_user_xattrs(fd))

    def op_removexattr(self, op: Op) -> Value:
        with self.opened(op.path, os.O_RDONLY) as fd:
            os.removexattr(fd, op.xname)
        return None

    def op_stat(self, op: Op) -> Value:
        # "stat" through an open fd (never through a symlink: O_NOFOLLOW gives ELOOP).
        with self.opened(op.path, os.O_RDONLY) as fd:
            return StatView.of(os.fstat(fd))

    def op_lstat(self, op: Op) -> Value:
        return self.lstat(op.path)

    def op_listdir(self, op: Op) -> Value:
        with self.parent(op.path) as (parent, name):
            fd = os.open(name or ".", DIR_FLAGS, dir_fd=parent)
        try:
            return tuple(sorted(self._entries(fd)))
        finally:
            os.close(fd)

    def _entries(self, dir_fd: int) -> Iterator[tuple[str, str]]:
        with os.scandir(dir_fd) as it:
            for entry in it:
                if entry.is_symlink():
                    kind = "symlink"
                elif entry.is_dir(follow_symlinks=False):
                    kind = "dir"
                elif entry.is_file(follow_symlinks=False):
                    kind = "file"
                else:
                    kind = _file_type(entry.stat(follow_symlinks=False).st_mode)
                yield (entry.name, kind)

    def op_umask(self, op: Op) -> Value:
        # The umask belongs to the process, which both trees share; the engine sets it once.
        return None

    def op_hold(self, op: Op) -> Value:
        if op.slot in self.held:
            os.close(self.held.pop(op.slot))
        with self.parent(op.path) as (parent, name):
            fd = os.open(name, op.flags | OPEN_BASE, dir_fd=parent)
        self.held[op.slot] = fd
        return StatView.of(os.fstat(fd))

    def _held(self, slot: int) -> int:
        if slot not in self.held:
            raise _ebadf()
        return self.held[slot]

    def op_held_write(self, op: Op) -> Value:
        fd = self._held(op.slot)
        written = os.pwrite(fd, op.data, op.offset)
        return Fields.of(written=written, size=os.fstat(fd).st_size)

    def op_held_read(self, op: Op) -> Value:
        return os.pread(self._held(op.slot), op.size, op.offset)

    def op_held_stat(self, op: Op) -> Value:
        return StatView.of(os.fstat(self._held(op.slot)))

    def op_held_truncate(self, op: Op) -> Value:
        fd = self._held(op.slot)
        os.ftruncate(fd, op.size)
        return Fields.of(size=os.fstat(fd).st_size)

    def op_release(self, op: Op) -> Value:
        os.close(self._held(op.slot))
        del self.held[op.slot]
        return None

    # -- the whole tree

    def snapshot(self) -> dict[str, Entry]:
        """Every name below the root (not the root itself, whose mode and owner belong to whoever
        made it), walked through fds without following symlinks."""
        found: _Found = {}
        self._walk(self.root_fd, "", found)
        by_inode: dict[tuple[int, int], list[str]] = {}
        for path, (st, _, _, _) in found.items():
            by_inode.setdefault((st.st_dev, st.st_ino), []).append(path)
        entries = {}
        for path, (st, content, target, xattrs) in found.items():
            others = tuple(sorted(p for p in by_inode[(st.st_dev, st.st_ino)] if p != path))
            entries[path] = Entry(
                _file_type(st.st_mode), StatView.of(st), content, target, xattrs, others
            )
        return entries

    def _walk(
        self,
        dir_fd: int,
        prefix: str,
        found: _Found,
    ) -> None:
        for name in sorted(os.listdir(dir_fd)):
            path = prefix + name
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            content: bytes | None = None
            target: str | None = None
            xattrs: Xattrs = ()
            if stat.S_ISDIR(st.st_mode):
                fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
                try:
                    xattrs = tuple((k, os.getxattr(fd, k)) for k in _user_xattrs(fd))
                    self._walk(fd, path + "/", found)
                finally:
                    os.close(fd)
            elif stat.S_ISREG(st.st_mode):
                fd = os.open(name, os.O_RDONLY | OPEN_BASE, dir_fd=dir_fd)
                try:
                    xattrs = tuple((k, os.getxattr(fd, k)) for k in _user_xattrs(fd))
                    content = _read_all(fd)
                finally:
                    os.close(fd)
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(name, dir_fd=dir_fd)
            found[path] = (st, content, target, xattrs)


def _read_all(fd: int) -> bytes:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


# --- the comparison -------------------------------------------------------------------------


class FsdiffMismatch(AssertionError):
    """The subject disagreed with the reference; the message says where and how to replay."""


@dataclass
class Report:
    """What a run did. `counts` holds (kind, "ok" or errno name) as seen on the reference: proof
    that the namespace is dense enough for operations to both succeed and fail in many ways.
    `mismatches` is filled only in keep-going mode (by hand, never in a test)."""

    seed: int
    steps: int
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    mismatches: list[tuple[str, str]] = field(default_factory=list)  # (category, full text)


def replay_hint(seed: int, steps: int, replay: str = DEFAULT_REPLAY) -> str:
    return f"{SEED_ENV}={seed} {STEPS_ENV}={steps} {replay}"


def seed_from_env(default: int) -> int:
    """The seed to run: `BOXVOL_FSDIFF_SEED` when set (decimal or 0x...), else `default`."""
    text = os.environ.get(SEED_ENV, "").strip()
    return int(text, 0) if text else default


def steps_from_env(default: int = DEFAULT_STEPS) -> int:
    """The number of steps to run: `BOXVOL_FSDIFF_STEPS` when set, else `default`."""
    text = os.environ.get(STEPS_ENV, "").strip()
    return int(text, 0) if text else default


def _outcome_differences(got: Outcome, want: Outcome) -> list[str]:
    if got.error is None and want.error is None:
        return _differences(got.value, want.value)
    return [f"{got.label} (subject) != {want.label} (reference)"]


_FIELDS = ("mode", "size", "nlink", "uid", "gid", "mtime_ns", "data", "content", "type", "xattrs")


def _category(kind: str, lines: list[str]) -> str:
    """A short class for a mismatch, e.g. `create: mode` or `rename: EINVAL vs ok`."""
    keys = set()
    for line in lines:
        words = [w for w in line.split() if not w.startswith("[")]
        if words and words[0].endswith(":"):  # a named field of the result
            keys.add(words[0][:-1])
        elif words and words[0] in _FIELDS:
            keys.add(words[0])
        elif (
            len(words) == 5
            and words[1] == "(subject)"
            and all(w == "ok" or w.isupper() for w in (words[0], words[3]))
        ):
            keys.add(f"{words[0]} vs {words[3]}")
        else:
            keys.add(
                " ".join(words[:2])
                if words and words[0] in ("only", "hard", "symlink")
                else "value"
            )
    return f"{kind}: {', '.join(sorted(keys))}"


def _track_mtimes(op: Op, outcome: Outcome, explicit: dict[str, bool]) -> None:
    """Keep `explicit` = the paths whose mtime was set by utime and cannot have changed since,
    each mapped to whether it is a directory. Conservative: whatever an operation might have
    touched is forgotten."""
    if outcome.error is not None:  # a failed operation changed nothing
        return
    if op.kind == "utime":
        value = outcome.value
        if isinstance(op.mtime, int):
            explicit[op.path] = isinstance(value, Fields) and value.get("type") == "dir"
        elif op.mtime == "now":
            explicit.pop(op.path, None)
        return
    data = op.kind in DATA_KINDS
    creates = op.kind in NAMESPACE_KINDS or bool(
        op.kind in ("append", "open_trunc") and op.flags & os.O_CREAT
    )
    names = [p for p in (op.path, op.other) if p] if creates else []
    parents = [p.rpartition("/")[0] for p in names]
    for path, is_dir in list(explicit.items()):
        if (
            (data and not is_dir)
            or path in parents
            or any(path == n or path.startswith(n + "/") for n in names)
        ):
            del explicit[path]


def compare_snapshots(
    subject: dict[str, Entry], reference: dict[str, Entry], explicit_mtimes: Collection[str]
) -> list[str]:
    """Every difference between two final trees, one line each, in path order."""
    out = []
    for path in sorted(subject.keys() | reference.keys()):
        shown = _short_path(path)
        if path not in reference:
            out.append(f"{shown}: only in subject ({subject[path].kind})")
            continue
        if path not in subject:
            out.append(f"{shown}: only in reference ({reference[path].kind})")
            continue
        a, b = subject[path], reference[path]
        if path not in explicit_mtimes:
            a = replace(a, view=replace(a.view, mtime_ns=None))
            b = replace(b, view=replace(b.view, mtime_ns=None))
        out += [f"{shown}: {line}" for line in a.differences(b)]
    return out


def _compare_final(subject: Tree, reference: Tree, explicit: Collection[str]) -> list[str]:
    snapshots = []
    for tree, role in ((subject, "subject"), (reference, "reference")):
        try:
            snapshots.append(tree.snapshot())
        except OSError as exc:  # e.g. ENOTCONN: the FUSE server died
            return [f"reading the {role}'s final tree failed: {exc!r}"]
    return compare_snapshots(snapshots[0], snapshots[1], explicit)


def run_trees(
    subject: Tree,
    reference: Tree,
    seed: int,
    steps: int = DEFAULT_STEPS,
    *,
    replay: str = DEFAULT_REPLAY,
    keep_going: bool = False,
    without: frozenset[str] = frozenset(),
) -> Report:
    """Apply the first `steps` operations of `seed` to both trees, comparing each outcome, then
    compare the final trees. Raises FsdiffMismatch on the first difference (unless `keep_going`,
    which records every difference instead; after the first one the trees may have diverged, so
    later ones can be consequences; `without` drops operation kinds, by hand only). Sets the
    process umask to 022 for the run and restores it."""
    for tree in (subject, reference):
        if os.listdir(tree.root_fd):
            raise ValueError(f"fsdiff: {tree.root} is not empty; both roots must start empty")
    report = Report(seed, steps)
    history: deque[str] = deque(maxlen=HISTORY)
    explicit: dict[str, bool] = {}
    saved_umask = os.umask(0o022)
    try:
        for index, op in enumerate(generate_ops(seed, steps, without=without)):
            if op.kind == "umask":
                os.umask(op.mode)
            got = subject.apply(op)
            want = reference.apply(op)
            if not (op.kind in ("stat", "lstat") and op.path in explicit):
                got = replace(got, value=_mask_mtime(got.value))
                want = replace(want, value=_mask_mtime(want.value))
            report.counts[(op.kind, want.label)] += 1
            line = f"  {index}: {op.describe()} -> {want.render()}"
            if got != want:
                lines = _outcome_differences(got, want)
                text = "\n".join(
                    [
                        f"fsdiff: mismatch at step {index} of {steps} (seed {seed})",
                        f"  operation: {op.describe()}",
                        f"  subject:   {got.render()}",
                        f"  reference: {want.render()}",
                        *(f"  difference: {each}" for each in lines),
                        f"  subject root: {subject.root}   reference root: {reference.root}",
                        f"replay: {replay_hint(seed, index + 1, replay)}",
                        f"the {len(history)} operations before it (outcome in both trees):",
                        *history,
                    ]
                )
                if not keep_going:
                    raise FsdiffMismatch(text)
                report.mismatches.append((_category(op.kind, lines), text))
                if got.error == errno.ENOTCONN:  # the FUSE server is gone: nothing more to learn
                    break
                line += f"   [subject: {got.render()}]"
            history.append(line)
            _track_mtimes(op, want, explicit)
        subject.release_all()
        reference.release_all()
        differences = _compare_final(subject, reference, explicit)
    finally:
        os.umask(saved_umask)
    if differences:
        text = "\n".join(
            [
                f"fsdiff: final trees differ after {steps} steps (seed {seed})",
                *(f"  {each}" for each in differences[:40]),
                *([f"  ... and {len(differences) - 40} more"] if len(differences) > 40 else []),
                f"  subject root: {subject.root}   reference root: {reference.root}",
                f"replay: {replay_hint(seed, steps, replay)}",
                f"the last {len(history)} operations (outcome in both trees):",
                *history,
            ]
        )
        if not keep_going:
            raise FsdiffMismatch(text)
        for each in differences:
            report.mismatches.append((_category("final tree", [each.split(": ", 1)[1]]), each))
    return report


def run_differential(
    subject: Path,
    reference: Path,
    seed: int,
    steps: int = DEFAULT_STEPS,
    *,
    replay: str = DEFAULT_REPLAY,
) -> None:
    """Run the sequence for `seed` on two empty directories; raise FsdiffMismatch (an
    AssertionError naming the seed, the step and the replay command) on the first difference.

    `replay` is the pytest invocation that reruns the calling test; the message prefixes it with
    BOXVOL_FSDIFF_SEED and BOXVOL_FSDIFF_STEPS, which that test should read through
    `seed_from_env` and `steps_from_env`."""
    with Tree(subject) as s, Tree(reference) as r:
        run_trees(s, r, seed, steps, replay=replay)


# --- by hand --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fsdiff.engine", description="Run or list an fsdiff sequence."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="print the operations of a seed")
    running = sub.add_parser("run", help="run a seed on two empty directories")
    running.add_argument("subject", type=Path)
    running.add_argument("reference", type=Path)
    running.add_argument(
        "--keep-going",
        action="store_true",
        help="record every mismatch instead of stopping at the first; print a summary",
    )
    for each in (listing, running):
        each.add_argument("--seed", type=lambda s: int(s, 0), default=seed_from_env(1))
        each.add_argument("--steps", type=int, default=steps_from_env())
        each.add_argument(
            "--without",
            type=lambda s: frozenset(s.split(",")),
            default=frozenset(),
            help="comma-separated operation kinds to leave out (gives a different sequence)",
        )
    args = parser.parse_args(argv)
    unknown = args.without - ARGS.keys()
    if unknown:
        parser.error(f"unknown kinds: {', '.join(sorted(unknown))}; known: {', '.join(ARGS)}")
    if args.command == "list":
        for index, op in enumerate(generate_ops(args.seed, args.steps, without=args.without)):
            print(f"{index}: {op.describe()}")
        return 0
    with Tree(args.subject) as s, Tree(args.reference) as r:
        try:
            report = run_trees(
                s, r, args.seed, args.steps, keep_going=args.keep_going, without=args.without
            )
        except FsdiffMismatch as exc:
            print(exc)
            return 1
    if report.mismatches:
        categories = Counter(category for category, _ in report.mismatches)
        print(f"{len(report.mismatches)} mismatches (seed {args.seed}, {args.steps} steps)")
        for category, count in categories.most_common():
            print(f"{count:6d}  {category}")
        print("\nfirst mismatch:\n" + report.mismatches[0][1])
        return 1
    print(f"no mismatch (seed {args.seed}, {args.steps} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
