"""Which virtiofsd serves a virtio-fs export, and how to start it: detection and each
implementation's option dialect. Command building is pure; ``find_virtiofsd`` looks at the
host.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Literal

from volumed.errors import StorageError

Dialect = Literal["rust", "qemu"]
QEMU_VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
#: Where distributions put the Rust virtiofsd when it is not on PATH.
RUST_CANDIDATES = ("/usr/libexec/virtiofsd", "/usr/lib/virtiofsd")


@dataclasses.dataclass(frozen=True, slots=True)
class Virtiofsd:
    """An installed virtiofsd and the dialect it speaks."""

    path: str
    dialect: Dialect

    def command(self, *, fd: int, source: str, cache: str = "auto") -> list[str]:
        """Serve ``source`` on the already-listening vhost-user socket ``fd``.

        Namespace sandboxing pivots the daemon into ``source``; dropping CAP_MKNOD keeps a
        guest from creating device nodes in the volume (FIFOs and sockets need no
        capability and still work).
        """
        if self.dialect == "rust":
            return [
                self.path,
                f"--fd={fd}",
                f"--shared-dir={source}",
                "--sandbox=namespace",
                f"--cache={cache}",
                "--modcaps=-mknod",
            ]
        return [
            self.path,
            f"--fd={fd}",
            "-o",
            f"source={source},sandbox=namespace,cache={cache},modcaps=-mknod",
        ]


def _is_rust(path: str) -> bool:
    # QEMU's C daemon lives at QEMU_VIRTIOFSD; a virtiofsd elsewhere is the Rust one (the C
    # daemon was removed from QEMU 8.0 onwards).
    return os.path.realpath(path) != os.path.realpath(QEMU_VIRTIOFSD)


def find_virtiofsd() -> Virtiofsd:
    """The best virtiofsd on this host: a Rust one on PATH or in libexec, else QEMU's.

    Blocking (it stats a few paths).
    """
    candidates = [shutil.which("virtiofsd"), *RUST_CANDIDATES]
    for path in candidates:
        if path and os.access(path, os.X_OK) and _is_rust(path):
            return Virtiofsd(path, "rust")
    if os.access(QEMU_VIRTIOFSD, os.X_OK):
        return Virtiofsd(QEMU_VIRTIOFSD, "qemu")
    raise StorageError(
        "no virtiofsd on this host: install the 'virtiofsd' package (or QEMU's, which ships "
        f"{QEMU_VIRTIOFSD}) to serve virtio-fs exports"
    )
