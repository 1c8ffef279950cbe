"""Socket activation: the API listener systemd hands over (``boxvold.socket``).

systemd binds ``/run/boxvol/boxvold.sock`` itself (owner, group and mode from the socket
unit), starts boxvold on the first connection and passes the listener as fd 3 with
``LISTEN_PID`` (our pid), ``LISTEN_FDS`` (the count) and ``LISTEN_FDNAMES``. boxvold takes
it instead of binding one, and leaves the path alone when it stops: the socket unit keeps
listening, so the next client starts boxvold again. Pure parsing (``listen_fds``) apart from
taking the fd.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from collections.abc import Mapping

from volumed.errors import InvalidArgument

log = logging.getLogger(__name__)

#: The first fd systemd passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3


def listen_fds(env: Mapping[str, str], pid: int) -> list[int]:
    """The fds systemd passed to process ``pid`` per ``env`` (none if they are not ours)."""
    if env.get("LISTEN_PID") != str(pid):
        return []
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    return list(range(LISTEN_FDS_START, LISTEN_FDS_START + max(count, 0)))


def inherited_listener(expected_path: str) -> socket.socket | None:
    """The API listener systemd passed, if it did (non-blocking, ready to accept); the
    variables are removed so no child inherits them. InvalidArgument if what was passed is
    not one listening unix stream socket."""
    fds = listen_fds(os.environ, os.getpid())
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if not fds:
        return None
    if len(fds) != 1 or not stat.S_ISSOCK(os.fstat(fds[0]).st_mode):
        raise InvalidArgument(
            f"systemd passed {len(fds)} file descriptor(s); boxvold takes exactly one "
            "listening unix socket (ListenStream= in boxvold.socket)"
        )
    listener = socket.socket(fileno=fds[0])
    if listener.family != socket.AF_UNIX or listener.type != socket.SOCK_STREAM:
        listener.detach()
        raise InvalidArgument("the socket systemd passed is not a unix stream socket")
    os.set_inheritable(listener.fileno(), False)
    listener.setblocking(False)
    bound = listener.getsockname()
    if bound != expected_path:
        log.warning(
            "the activated socket is %s, not %s: clients find it there", bound, expected_path
        )
    log.info("api socket inherited from systemd path=%s", bound)
    return listener
