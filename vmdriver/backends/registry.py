"""Which backend a ``--connect`` URI names, by its scheme: ``qmp://`` is QEMU over QMP,
``ch://`` Cloud Hypervisor, any other URI is libvirt's (``qemu:///system``,
``qemu+ssh://...``, ``test:///default``)."""

from __future__ import annotations

import urllib.parse

from vmdriver.backends.base import Backend

#: Schemes with a backend of their own, and one example each (for ``--help``).
EXAMPLES = {
    "libvirt": "qemu:///system",
    "qmp": "qmp:///run/myvm/qmp.sock",
    "ch": "ch:///run/myvm/api.sock",
}


def scheme(uri: str) -> str:
    """The backend a URI names: ``qmp``, ``ch`` or ``libvirt``."""
    name = urllib.parse.urlsplit(uri).scheme
    return name if name in EXAMPLES and name != "libvirt" else "libvirt"


def open_backend(uri: str) -> Backend:
    """The backend of a non-libvirt URI (libvirt keeps its own driver for now)."""
    kind = scheme(uri)
    if kind == "qmp":
        from vmdriver.backends.qmp import QmpBackend

        return QmpBackend(uri)
    if kind == "ch":
        from vmdriver.backends.cloud_hypervisor import CloudHypervisorBackend

        return CloudHypervisorBackend(uri)
    raise ValueError(f"{uri} is a libvirt URI")  # pragma: no cover - callers check scheme()


def help_text() -> str:
    """One line per known scheme, with an example."""
    return "; ".join(f"{name}: {example}" for name, example in EXAMPLES.items())
