"""One change at a time per domain, across every process that runs the VM driver.

Attaching and detaching read a domain's definition (devices, recorded attachments, kernel
command line), change it and write it back; libvirt has no compare-and-set for that. Two
``boxvol vm`` commands on one domain at once would each write back what it read and lose
the other's change. So each change holds an exclusive ``flock`` on a file named after the
domain's UUID, under the runtime dir, from before it reads the definition until it has
written it. Locks held by a process that dies are released by the kernel.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator

from vmdriver.driver import DomainBusy
from volumed import locations

#: How long a change waits for another one on the same domain (a detach may wait for the
#: guest to release a device, so this is longer than that wait).
DEFAULT_WAIT = 120.0
_POLL = 0.05


def default_lock_dir() -> str:
    """``<runtime dir>/vm-locks`` (/run/boxvol/vm-locks for root)."""
    return os.path.join(locations.default_runtime_dir(os.environ, os.geteuid()), "vm-locks")


@contextlib.contextmanager
def domain_lock(
    directory: str, uuid: str, name: str, *, wait: float = DEFAULT_WAIT
) -> Iterator[None]:
    """Hold the change lock of the domain ``uuid`` (called ``name`` in errors).

    Raises DomainBusy if another holder keeps it longer than ``wait`` seconds.
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd = os.open(
        os.path.join(directory, f"{uuid}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
    )
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
            if time.monotonic() >= deadline:
                raise DomainBusy(
                    f"another boxvol vm command has been changing domain {name} for over "
                    f"{wait:g} s; try again once it has finished"
                )
            time.sleep(_POLL)
        yield
    finally:
        os.close(fd)
