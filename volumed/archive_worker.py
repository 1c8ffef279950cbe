"""The process that archives or restores one volume: ``python -m volumed.archive_worker``.

boxvold opens the volume's directory through the gate and starts this process with that fd,
the data fd a client passed with its request (a pipe end; boxvold never reads or writes it)
and the write end of a report pipe:

    python -m volumed.archive_worker pack|unpack --root-fd N --data-fd M --report-fd R
        [--force] [--image]

It enters the sandbox of ``volumed.sandbox`` (the volume becomes its root, most capabilities
go, no_new_privs), then runs ``volumed.archive.pack`` (the tree to M) or
``volumed.archive.restore`` (M into the tree, all or nothing), and writes one JSON object to
R: ``{"report": {...}}`` or the API's error shape ``{"error": {"code", "message"}}``. Exit
status 0 with a report, 1 with an error. SIGTERM (boxvold stopping, or the request's end)
ends it cleanly: a restore deletes what it staged. Logs go to stderr (boxvold's).

Must not import trio or pyfuse3: it is a small child process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

from volumed import archive, errors
from volumed.sandbox import enter_sandbox
from volumed.text import printable_repr

log = logging.getLogger("volumed.archive_worker")


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived: stop, cleaning up as for any failure."""


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(f"signal {signum}")


def run(mode: str, root_fd: int, data_fd: int, *, force: bool, image: bool) -> dict[str, Any]:
    """Enter the sandbox and pack or restore; the report as JSON. ``image``: the volume is
    a filesystem of its own, whose ``lost+found`` is not content."""
    keep = archive.IMAGE_ENTRIES if image else frozenset()
    os.close(enter_sandbox(root_fd))  # the archive needs no /proc
    os.close(root_fd)
    os.umask(0o022)
    root = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if mode == "pack":
            with os.fdopen(data_fd, "wb", buffering=1 << 16) as out:
                report = archive.pack(root, out, keep=keep)
        else:
            with os.fdopen(data_fd, "rb", buffering=1 << 16) as stream:
                report = archive.restore(stream, root, force=force, keep=keep)
    finally:
        os.close(root)
    return report.to_json()


def _failure(mode: str, exc: BaseException) -> errors.BoxvolError:
    """The error a failed run reports (one line, for the person who asked)."""
    what = "archive" if mode == "pack" else "restore"
    after = "" if mode == "pack" else "; the volume is as it was"
    if isinstance(exc, errors.BoxvolError):
        return exc
    if isinstance(exc, BrokenPipeError):
        return errors.StorageError(f"the {what} stopped: whoever read the archive went away")
    if isinstance(exc, Interrupted):
        return errors.StorageError(f"the {what} was interrupted ({exc}){after}")
    if isinstance(exc, OSError):
        where = f" at {printable_repr(exc.filename)}" if exc.filename else ""
        return errors.StorageError(f"the {what} failed{where}: {exc.strerror or exc}{after}")
    return errors.BoxvolError(f"the {what} failed: {exc!r}{after}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the archive worker."""
    parser = argparse.ArgumentParser(prog="python -m volumed.archive_worker")
    parser.add_argument("mode", choices=("pack", "unpack"))
    parser.add_argument("--root-fd", type=int, required=True)
    parser.add_argument("--data-fd", type=int, required=True)
    parser.add_argument("--report-fd", type=int, required=True)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--image", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s archive worker pid={os.getpid()}: %(message)s",
    )
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        answer: dict[str, Any] = {
            "report": run(args.mode, args.root_fd, args.data_fd, force=args.force, image=args.image)
        }
        status = 0
    except BaseException as exc:
        error = _failure(args.mode, exc)
        log.info(
            "archive worker failed mode=%s code=%s message=%s",
            args.mode,
            error.code,
            printable_repr(error.message),
        )
        if not isinstance(exc, (errors.BoxvolError, OSError, Interrupted)):
            log.exception("archive worker bug")
        answer = errors.error_body(error)
        status = 1
    with os.fdopen(args.report_fd, "w") as report:
        json.dump(answer, report)
    return status


if __name__ == "__main__":
    sys.exit(main())
