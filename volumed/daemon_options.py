"""The daemon's command-line options, apart from the daemon so ``boxvol`` can offer
``serve`` without importing trio and the HTTP stack on every run.

An option left out is None: the environment, then the config file, then the built-in default
decide (``volumed.config.resolve``); so no option here has a default of its own.
"""

from __future__ import annotations

import argparse

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def add_daemon_options(parser: argparse.ArgumentParser) -> None:
    """Add boxvold's options to ``parser`` (shared by ``boxvold`` and ``boxvol serve``)."""
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: BOXVOL_CONFIG, else /etc/boxvol/boxvold.toml if it "
        "exists); options and BOXVOL_* variables take precedence over it",
    )
    parser.add_argument(
        "--home",
        help="home directory (default: /var/lib/boxvol as root, "
        "$XDG_DATA_HOME/boxvol otherwise; or BOXVOL_HOME)",
    )
    parser.add_argument(
        "--runtime-dir",
        help="runtime directory holding the API socket "
        "(default: /run/boxvol as root; or BOXVOL_RUNTIME_DIR)",
    )
    parser.add_argument("--socket-group", help="group owning the API socket (mode 0660)")
    parser.add_argument(
        "--vhost-group",
        help="group QEMU runs with; owns the vhost-user sockets of virtio-fs exports "
        "(default: kvm if it exists)",
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS, help="default INFO, or BOXVOL_LOG_LEVEL")
    parser.add_argument(
        "--reserve-size",
        type=_reserve_size,
        help="space kept preallocated in the home and released on a full disk with "
        "'boxvol reserve-release' (default 64M, or BOXVOL_RESERVE_SIZE; 0: none)",
    )


def _reserve_size(text: str) -> int:
    from volumed.errors import InvalidArgument
    from volumed.sizes import parse_bytes

    try:
        return parse_bytes(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def default_vhost_group() -> str | None:
    """The group QEMU runs with on Debian-like hosts (libvirt-qemu's group), if present."""
    import grp

    for name in ("kvm", "libvirt-qemu", "qemu"):
        try:
            grp.getgrnam(name)
        except KeyError:
            continue
        return name
    return None
