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
#: virtiofsd's cache modes as boxvold's config names them (the Rust daemon's words; QEMU's C
#: daemon calls ``never`` ``none``).
VIRTIOFSD_CACHE_MODES = ("auto", "always", "never")
QEMU_VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
#: Where distributions put the Rust virtiofsd when it is not on PATH.
RUST_CANDIDATES = ("/usr/libexec/virtiofsd", "/usr/lib/virtiofsd")


@dataclasses.dataclass(frozen=True, slots=True)
class Virtiofsd:
    """An installed virtiofsd and the dialect it speaks."""

    path: str
    dialect: Dialect
    #: ``--cache`` (one of VIRTIOFSD_CACHE_MODES): the config's ``virtiofsd_cache``.
    cache: str = "auto"

    def command(self, *, fd: int, source: str, cache: str | None = None) -> list[str]:
        """Serve ``source`` on the already-listening vhost-user socket ``fd`` (with ``cache``,
        else this virtiofsd's own cache mode).

        Namespace sandboxing pivots the daemon into ``source``; dropping CAP_MKNOD keeps a
        guest from creating device nodes in the volume (FIFOs and sockets need no
        capability and still work).
        """
        cache = cache or self.cache
        if self.dialect == "rust":
            return [
                self.path,
                f"--fd={fd}",
                f"--shared-dir={source}",
                "--sandbox=namespace",
                f"--cache={cache}",
                "--modcaps=-mknod",
            ]
        if cache == "never":
            cache = "none"
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


def find_virtiofsd(configured: str | None = None) -> Virtiofsd:
    """The virtiofsd the config names (``configured``), else the best on this host: a Rust
    one on PATH or in libexec, else QEMU's.

    Blocking (it stats a few paths).
    """
    if configured is not None:
        if not os.access(configured, os.X_OK):
            raise StorageError(
                f"the virtiofsd the config names, {configured}, is not an executable; fix "
                "the 'virtiofsd' key or remove it to let boxvold pick one"
            )
        return Virtiofsd(configured, "rust" if _is_rust(configured) else "qemu")
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
