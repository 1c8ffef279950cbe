"""One change at a time per domain, across every process that runs the VM driver.

Attaching and detaching read a domain's definition (devices, recorded attachments, kernel
command line), change it and write it back; libvirt has no compare-and-set for that. Two
``boxvol vm`` commands on one domain at once would each write back what it read and lose
the other's change. So each change holds an exclusive ``flock`` on a file named after the
domain's UUID, under the runtime dir, from before it reads the definition until it has
written it. The holder writes its pid and command line into the file, so one that waits can
say what it waits for. Locks held by a process that dies are released by the kernel.

The lock directory is the runtime dir of whoever runs the command (``/run/boxvol`` for
root): commands run by different users with different runtime dirs do not exclude each
other.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import sys
import time
from collections.abc import Iterator

from vmdriver.driver import DomainBusy, VMDriverError
from volumed import locations

log = logging.getLogger(__name__)

#: How long a change waits for another one on the same domain. A detach holds the lock while
#: the guest releases its devices (up to a minute each by default), so this is generous.
DEFAULT_WAIT = 300.0
#: After this long, a waiting command says what it is waiting for.
ANNOUNCE_AFTER = 1.0
_POLL = 0.05


def default_lock_dir() -> str:
    """``<runtime dir>/vm-locks`` (/run/boxvol/vm-locks for root)."""
    return os.path.join(locations.default_runtime_dir(os.environ, os.geteuid()), "vm-locks")


def _open_lock(directory: str, uuid: str, name: str) -> int:
    path = os.path.join(directory, f"{uuid}.lock")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise VMDriverError(
            f"cannot open the change lock of domain {name} at {path}: {exc.strerror}; run "
            f"boxvol vm as the user that owns {directory} (root for /run/boxvol), or set "
            "BOXVOL_RUNTIME_DIR to a directory of your own"
        ) from None


def _holder(fd: int) -> str:
    """What the current holder wrote into the lock file ("pid N: command"), if anything."""
    with contextlib.suppress(OSError):
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if text:
            return text
    return "another boxvol vm command"


@contextlib.contextmanager
def domain_lock(
    directory: str, uuid: str, name: str, *, wait: float = DEFAULT_WAIT
) -> Iterator[None]:
    """Hold the change lock of the domain ``uuid`` (called ``name`` in messages).

    Raises DomainBusy if another holder keeps it longer than ``wait`` seconds.
    """
    fd = _open_lock(directory, uuid, name)
    try:
        started = time.monotonic()
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
            waited = time.monotonic() - started
            if waited >= wait:
                raise DomainBusy(
                    f"domain {name} is being changed by {_holder(fd)} (for over {wait:g} s); "
                    "try again once it has finished"
                )
            if not announced and waited >= ANNOUNCE_AFTER:
                log.warning("waiting for %s to finish changing domain %s", _holder(fd), name)
                announced = True
            time.sleep(_POLL)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv)}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
