"""One FUSE export's server process: ``python -m volumed.fs.server`` (spawned by boxvold).

boxvold mounts ``/dev/fuse`` at ``<runtime>/fs/<export-id>`` in the host's mount namespace
(``volumed.fs.fuse_mount``), opens the volume's directory through the gate, and starts this
process with both fds and the export's record. Before it serves a request the server:

1. takes a detached copy of the volume's directory mount (``open_tree``; submounts are not
   copied) and an ``O_PATH`` fd of /proc (magic links and callers' groups are reached through
   it, never through a path);
2. enters a mount namespace of its own, attaches that copy and makes it its root
   (``pivot_root``), detaching the host's tree: ``/proc/PID/root`` shows the volume and
   nothing else;
3. keeps only the capabilities file operations on behalf of callers need (CAP_CHOWN,
   CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_FSETID), drops the rest from its
   bounding set too, and sets no_new_privs.

Then it serves the one export at the mount's root with every syscall inline on its trio loop
(``volumed.fs.operations``): one process per export is the isolation; a syscall
stuck on this volume stalls only this export. No syscall filter yet (docs/fuse.md).

Arguments: ``--fuse-fd N --root-fd M --ready-fd R --export JSON`` (the export's registry row,
as ``encode_export`` writes it). "ready" is written to R once the mount is served. Logs go to
stderr, which boxvold points at a file.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Sequence

import pyfuse3
import trio

from volumed.exports import decode_export
from volumed.fs.nodes import ExportState
from volumed.fs.operations import BoxvolFS
from volumed.fs.passthrough import use_proc_dir
from volumed.fs.views import make_view

log = logging.getLogger("volumed.fs.server")

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
    own, keep only ``KEPT_CAPABILITIES`` and set no_new_privs. Returns the /proc fd the
    passthrough now uses. Must run before any thread is started."""
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
    os.chdir(_STAGING)
    _check(_libc.syscall(_SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", _MNT_DETACH), "detach the host's tree")
    os.chdir("/")
    use_proc_dir(proc_fd)
    _drop_capabilities()
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
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


async def serve(fs: BoxvolFS) -> None:
    """Serve until SIGTERM or SIGINT (boxvold's stop), or until the mount goes away."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def main() -> None:
                await pyfuse3.main()
                nursery.cancel_scope.cancel()

            nursery.start_soon(main)
            async for signum in signals:
                log.info("export server stopping signal=%d", signum)
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of an export server."""
    parser = argparse.ArgumentParser(prog="python -m volumed.fs.server")
    parser.add_argument("--fuse-fd", type=int, required=True)
    parser.add_argument("--root-fd", type=int, required=True)
    parser.add_argument("--ready-fd", type=int, default=None)
    parser.add_argument("--export", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    export = decode_export(args.export)
    st = os.fstat(args.root_fd)
    enter_sandbox(args.root_fd)
    view = make_view(read_only=export.policy.read_only, owner=export.policy.owner)
    state = ExportState(export.id, export.policy.cache_policy, view)
    fs = BoxvolFS(state, args.root_fd, st)
    options = {"fsname=boxvol", "subtype=boxvol", "allow_other", "default_permissions"}
    pyfuse3.init(fs, f"/dev/fd/{args.fuse_fd}", options)
    log.info("export server serving export=%s pid=%d", export.id, os.getpid())
    if args.ready_fd is not None:
        os.write(args.ready_fd, b"ready\n")
        os.close(args.ready_fd)
    try:
        trio.run(serve, fs)
    finally:
        pyfuse3.close(unmount=False)
    log.info("export server stopped export=%s", export.id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
