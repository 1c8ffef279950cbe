"""The setuid and setgid rules of a local Linux filesystem, as pure functions of modes.

A caller without CAP_FSETID (for the views: any uid but 0) cannot set S_ISGID with chmod
on a file whose group it is not in, and a write, truncate or chown by such a caller clears
S_ISUID, and S_ISGID where it means "run as the group" (the file is group-executable).
Views apply these with the caller's credentials; a view whose stored owner is not the one
it presents stores no set-id bit at all (``without_set_id``). No I/O here: whether the
caller is in a group is asked of ``Credentials``, and only when the answer matters.
"""

from __future__ import annotations

import stat
from typing import Protocol

SET_ID = stat.S_ISUID | stat.S_ISGID


class Credentials(Protocol):
    """Who asks, as far as the set-id rules care."""

    @property
    def privileged(self) -> bool:
        """Holds CAP_FSETID: keeps set-id bits whatever it does."""
        ...

    def in_group(self, gid: int) -> bool:
        """Whether ``gid`` is the caller's group or one of its supplementary groups."""
        ...


def without_set_id(mode: int) -> int:
    """``mode`` with neither S_ISUID nor S_ISGID."""
    return mode & ~SET_ID


def chmod_mode(mode: int, file_gid: int, who: Credentials) -> int:
    """The mode a chmod to ``mode`` stores on a file of group ``file_gid``.

    S_ISUID needs no check here: only the owner (or CAP_FOWNER) may chmod at all, and the
    kernel has checked that against the attributes the view presents.
    """
    if mode & stat.S_ISGID and not who.privileged and not who.in_group(file_gid):
        return mode & ~stat.S_ISGID
    return mode


def killed_mode(mode: int) -> int:
    """The mode after an unprivileged write, truncate or chown: S_ISUID goes, and S_ISGID
    when the file is group-executable (without group execute it marks mandatory locking,
    which a write leaves alone)."""
    kill = stat.S_ISUID
    if mode & stat.S_IXGRP:
        kill |= stat.S_ISGID
    return mode & ~kill


def new_file_mode(mode: int, gid: int, who: Credentials) -> int:
    """The mode a new non-directory of group ``gid`` gets when asked for ``mode``.

    Its group differs from the caller's only in a setgid directory; there S_ISGID with
    group execute is kept only for a group of the caller (the kernel's mode_strip_sgid).
    """
    wanted = stat.S_ISGID | stat.S_IXGRP
    if mode & wanted == wanted and not who.privileged and not who.in_group(gid):
        return mode & ~stat.S_ISGID
    return mode
