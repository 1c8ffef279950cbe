"""One FUSE export's server process: ``python -m volumed.fs.server`` (spawned by boxvold).

boxvold mounts ``/dev/fuse`` at ``<runtime>/fs/<export-id>`` in the host's mount namespace
(``volumed.fs.fuse_mount``), opens the volume's directory through the gate, and starts this
process with both fds and the export's record. Before it serves a request the server
enters the sandbox of ``volumed.sandbox`` and reaches /proc through the fd it returns:

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
stuck on this volume stalls only this export. Its syscall filter: volumed.syscall_filter.

Arguments: ``--fuse-fd N --root-fd M --ready-fd R --export JSON`` (the export's registry row,
as ``encode_export`` writes it). "ready" is written to R once the mount is served. Logs go to
stderr, which boxvold points at a file.
"""

from __future__ import annotations

import argparse
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
from volumed.sandbox import enter_sandbox

log = logging.getLogger("volumed.fs.server")


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
    use_proc_dir(enter_sandbox(args.root_fd))
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
