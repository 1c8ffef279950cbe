"""The sandbox a child process that works on one volume's data enters before it touches it.

Used by the FUSE export servers (``volumed.fs.server``) and the archive worker
(``volumed.archive_worker``). ``enter_sandbox(root_fd)``:

1. takes a detached copy of the volume's directory mount (``open_tree``; submounts are not
   copied) and an ``O_PATH`` fd of /proc (returned: a caller that needs magic links or
   callers' groups reaches them through it, never through a path);
2. enters a mount namespace of its own, attaches that copy and makes it its root
   (``pivot_root``), detaching the host's tree: ``/proc/PID/root`` shows the volume and
   nothing else, so no path the process resolves can name anything outside the volume;
3. keeps only the capabilities file operations on behalf of callers need (CAP_CHOWN,
   CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_FSETID), drops the rest from its
   bounding set too, and sets no_new_privs;
4. loads the syscall filter (``volumed.syscall_filter``): no more mounts, namespaces,
   ptrace, kernel modules, BPF, io_uring... (EPERM), nothing of another ABI.

Must not import pyfuse3 or trio: the archive worker loads neither.
"""

from __future__ import annotations

import ctypes
import os

from volumed import syscall_filter

_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNS = 0x20000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_MNT_DETACH = 2
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_OPEN_TREE_CLONE = 1
_MOVE_MOUNT_F_EMPTY_PATH = 4
_SYS_PIVOT_ROOT = 155
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_LAST_CAP = 63
#: CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_FSETID.
KEPT_CAPABILITIES = (0, 1, 2, 3, 4)
#: Where, inside the new mount namespace, the volume is attached before it becomes the root
#: (any directory every host has; the attachment is visible to no other process).
_STAGING = b"/tmp"


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"sandbox: {what}: {os.strerror(err)}")
    return result


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def enter_sandbox(root_fd: int) -> int:
    """Make the volume behind ``root_fd`` this process's root in a mount namespace of its
    own, keep only ``KEPT_CAPABILITIES`` and set no_new_privs. Returns an ``O_PATH`` fd of
    the host's /proc, opened before the root changed (the caller keeps or closes it). Must
    run before any thread is started."""
    proc_fd = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    tree = _check(
        _libc.syscall(
            _SYS_OPEN_TREE, root_fd, b"", _OPEN_TREE_CLONE | _AT_EMPTY_PATH | os.O_CLOEXEC
        ),
        "open_tree",
    )
    _check(_libc.unshare(_CLONE_NEWNS), "unshare")
    _check(_libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "private mounts")
    _check(
        _libc.syscall(_SYS_MOVE_MOUNT, tree, b"", _AT_FDCWD, _STAGING, _MOVE_MOUNT_F_EMPTY_PATH),
        "move_mount",
    )
    os.close(tree)
    # The clone is a peer of the volume's mount wherever that is shared (under systemd every
    # mount is): pivot_root refuses a shared new root, and nothing here may propagate out.
    _check(_libc.mount(None, _STAGING, None, _MS_REC | _MS_PRIVATE, None), "private volume")
    os.chdir(_STAGING)
    _check(_libc.syscall(_SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", _MNT_DETACH), "detach the host's tree")
    os.chdir("/")
    _drop_capabilities()
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    syscall_filter.install()
    return proc_fd


def _drop_capabilities() -> None:
    for cap in range(_LAST_CAP + 1):
        if cap not in KEPT_CAPABILITIES and _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            if err != 22:  # EINVAL: a capability this kernel does not know
                raise OSError(err, f"sandbox: drop capability {cap}: {os.strerror(err)}")
    mask = sum(1 << cap for cap in KEPT_CAPABILITIES)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)(_CapData(mask, mask, 0), _CapData(0, 0, 0))
    _check(_libc.capset(ctypes.byref(header), data), "capset")
