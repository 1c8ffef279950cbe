"""Garbage collection: what boxvol created and lost track of, found and reclaimed.

The store finds the home's leftovers (``VolumeStore.collect_garbage``: volume directories and
images without a registry row, rows whose data is gone, trash); the export manager finds the
runtime's (``ExportManager.collect_garbage``: sockets, pidfiles and logs of exports that
are gone, export servers and virtiofsd processes nobody supervises, mounts no export owns).
Each is a
``Finding`` saying what it is, what it takes and what reclaiming it does. Data is never
deleted: an orphan directory or image is moved to the quarantine. This module only
describes (and logs); the owners of each resource act.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Literal

log = logging.getLogger(__name__)

#: What a leftover is.
FindingKind = Literal[
    "orphan-directory",
    "orphan-image",
    "row-without-data",
    "trash",
    "stale-socket",
    "stale-file",
    "stray-virtiofsd",
    "stray-server",
    "stale-mount",
    "stale-mountpoint",
]
#: What reclaiming it does: data is quarantined, never deleted.
FindingAction = Literal["quarantine", "forget-row", "delete", "unlink", "stop", "detach", "rmdir"]


@dataclasses.dataclass(frozen=True, slots=True)
class Finding:
    """One leftover: what it is, which (a path, an id or a pid), the bytes it takes, and
    what reclaiming it does."""

    kind: FindingKind
    what: str
    bytes: int
    action: FindingAction
    detail: str = ""

    def to_json(self) -> dict[str, object]:
        """The API's shape of a finding (``GcFinding``)."""
        return dataclasses.asdict(self)


def log_findings(findings: list[Finding], *, dry_run: bool) -> None:
    """One greppable line per finding: ``gc found ...`` (dry run) or ``gc reclaimed ...``."""
    for finding in findings:
        log.warning(
            "gc %s kind=%s what=%s bytes=%d action=%s",
            "found" if dry_run else "reclaimed",
            finding.kind,
            finding.what,
            finding.bytes,
            finding.action,
        )


def allocated_bytes(path: str) -> int:
    """Host bytes ``path`` itself takes (not following a link; 0 if it is gone)."""
    try:
        return os.lstat(path).st_blocks * 512
    except OSError:
        return 0


def reclaimed_bytes(findings: list[Finding]) -> int:
    """Bytes the findings free on the host (quarantined data still takes its space)."""
    return sum(f.bytes for f in findings if f.action != "quarantine")


def virtiofsd_source(cmdline: list[bytes]) -> str | None:
    """The directory a virtiofsd command line shares (``-o source=...`` of the C daemon,
    ``--shared-dir=`` of the Rust one), if it is one."""
    if not cmdline or b"virtiofsd" not in cmdline[0]:
        return None
    for arg in cmdline[1:]:
        text = arg.decode(errors="surrogateescape")
        if text.startswith("--shared-dir="):
            return text.split("=", 1)[1]
        for option in text.split(","):
            if option.startswith("source="):
                return option.split("=", 1)[1]
    return None


def is_ours(source: str, roots: tuple[str, ...]) -> bool:
    """True if a virtiofsd's ``source`` lies directly under one of boxvold's roots (its
    volume roots, its FUSE mount root)."""
    return any(source.rstrip("/").rsplit("/", 1)[0] == root.rstrip("/") for root in roots)
