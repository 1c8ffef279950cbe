"""The reserve: preallocated space in the home that an operator releases on a full disk.

SQLite needs a little room for every write, deletes included, so on a full disk even
``boxvol rm`` would fail. boxvold keeps ``<home>/reserve`` (64 MiB by default, allocated with
fallocate, or written with zeros where the filesystem has no fallocate). ``release`` unlinks
it (``boxvol reserve-release``), and boxvold itself releases it at start-up when the home is
nearly full, so start-up never needs free space. ``restore`` brings it back only while the
host has at least twice its size free, so the top-up never starves a recovery in progress.
Blocking: every method touches the disk; boxvold calls them from worker threads.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os

log = logging.getLogger(__name__)

DEFAULT_RESERVE_BYTES = 64 << 20
#: Below this much free space boxvold releases the reserve as it starts.
LOW_WATER_BYTES = 8 << 20
_ZEROS = bytes(1 << 20)


@dataclasses.dataclass(frozen=True, slots=True)
class ReserveState:
    """The reserve as ``df`` reports it."""

    target_bytes: int
    present_bytes: int


def restore_allowed(present_bytes: int, target_bytes: int, free_bytes: int) -> bool:
    """True if the reserve is short and the host can spare it: free space at least twice
    the reserve (a recovery command must never be starved by the top-up itself)."""
    return present_bytes < target_bytes and free_bytes >= 2 * target_bytes


class Reserve:
    """The reserve file of one home."""

    path: str
    target_bytes: int

    def __init__(self, path: str, target_bytes: int = DEFAULT_RESERVE_BYTES) -> None:
        self.path = path
        self.target_bytes = target_bytes

    def state(self) -> ReserveState:
        """How big the reserve should be and how much of it is allocated now."""
        try:
            present = os.stat(self.path).st_blocks * 512
        except FileNotFoundError:
            present = 0
        return ReserveState(self.target_bytes, min(present, self.target_bytes))

    def release(self) -> int:
        """Unlink the reserve; returns the bytes it held (0 if it was gone already)."""
        held = self.state().present_bytes
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return 0
        log.warning("reserve released bytes=%d path=%s", held, self.path)
        return held

    def restore(self) -> bool:
        """Bring the reserve back to its size if the host can spare it (see
        ``restore_allowed``); True if it is whole afterwards. Never leaves a partial file:
        a failure (no room after all) leaves no reserve, logged."""
        present = self.state().present_bytes
        if present >= self.target_bytes:
            return True
        st = os.statvfs(os.path.dirname(self.path))
        if not restore_allowed(present, self.target_bytes, st.f_bavail * st.f_frsize):
            return False
        partial = self.path + ".new"
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                _allocate(fd, self.target_bytes)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(partial, self.path)
        except OSError as exc:
            _unlink_quietly(partial)
            log.warning("reserve not restored error=%s", exc)
            return False
        log.info("reserve restored bytes=%d path=%s", self.target_bytes, self.path)
        return True

    def release_if_low(self) -> int:
        """Release the reserve when the home has less than LOW_WATER_BYTES free (start-up:
        opening the registry may need a few pages); returns the bytes released."""
        st = os.statvfs(os.path.dirname(self.path))
        if st.f_bavail * st.f_frsize >= LOW_WATER_BYTES:
            return 0
        held = self.release()
        if held:
            log.warning("reserve released at start: the home's filesystem is nearly full")
        return held


def _allocate(fd: int, size: int) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
    else:
        return
    written = 0
    while written < size:
        written += os.write(fd, _ZEROS[: min(len(_ZEROS), size - written)])


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
