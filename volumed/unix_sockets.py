"""Binding the unix sockets boxvold serves (its API, the vhost-user sockets of exports)."""

from __future__ import annotations

import os
import socket

from volumed.errors import InvalidArgument

#: Longest socket path the kernel takes (sun_path is 108 bytes with its terminating NUL).
MAX_SOCKET_PATH = 107


def check_socket_path(path: str, what: str) -> None:
    """Raise InvalidArgument naming ``what`` if ``path`` is too long for a unix socket."""
    if len(path.encode()) > MAX_SOCKET_PATH:
        raise InvalidArgument(
            f"the {what} path {path} is longer than the {MAX_SOCKET_PATH} bytes a unix socket "
            "allows; give boxvold a shorter --runtime-dir"
        )


def bind_private(path: str, mode: int) -> socket.socket:
    """A unix stream socket bound at ``path`` that nobody else can reach before it has
    ``mode``: it is created 0600 (umask 0177) and only then given ``mode``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    return sock
