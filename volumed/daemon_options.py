"""The daemon's command-line options, apart from the daemon so ``boxvol`` can offer
``serve`` without importing trio and the HTTP stack on every run."""

from __future__ import annotations

import argparse
import os

from volumed import locations

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def add_daemon_options(parser: argparse.ArgumentParser) -> None:
    """Add boxvold's options to ``parser`` (shared by ``boxvold`` and ``boxvol serve``)."""
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
    parser.add_argument(
        "--log-level", default=os.environ.get("BOXVOL_LOG_LEVEL", "INFO"), choices=LOG_LEVELS
    )
    parser.add_argument(
        "--reserve-size",
        type=_reserve_size,
        default=os.environ.get("BOXVOL_RESERVE_SIZE", "64M"),
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


def resolve_dirs(args: argparse.Namespace) -> tuple[str, str]:
    """Absolute home and runtime directory the parsed options ask for."""
    env, euid = os.environ, os.geteuid()
    home = args.home or locations.default_home(env, euid)
    runtime_dir = args.runtime_dir or locations.default_runtime_dir(env, euid)
    return os.path.abspath(home), os.path.abspath(runtime_dir)


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
