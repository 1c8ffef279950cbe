"""Where boxvold keeps its home and runtime directory, and where clients find its socket.

Pure: every function takes the environment and effective uid it decides by. Uses only
``os.path`` (not pathlib) because the CLI resolves the socket on every run.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; mypy honours the name
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

SOCKET_NAME = "boxvold.sock"
SYSTEM_HOME = "/var/lib/boxvol"
SYSTEM_RUNTIME_DIR = "/run/boxvol"


def default_home(env: Mapping[str, str], euid: int) -> str:
    """``BOXVOL_HOME``, else /var/lib/boxvol for root, else $XDG_DATA_HOME/boxvol."""
    if env.get("BOXVOL_HOME"):
        return env["BOXVOL_HOME"]
    if euid == 0:
        return SYSTEM_HOME
    data_home = env.get("XDG_DATA_HOME") or os.path.join(
        env.get("HOME") or os.path.expanduser("~"), ".local", "share"
    )
    return os.path.join(data_home, "boxvol")


def default_runtime_dir(env: Mapping[str, str], euid: int) -> str:
    """``BOXVOL_RUNTIME_DIR``, else /run/boxvol for root, else $XDG_RUNTIME_DIR/boxvol."""
    if env.get("BOXVOL_RUNTIME_DIR"):
        return env["BOXVOL_RUNTIME_DIR"]
    if euid == 0:
        return SYSTEM_RUNTIME_DIR
    runtime = env.get("XDG_RUNTIME_DIR") or os.path.join("/tmp", f"boxvol-{euid}")
    return os.path.join(runtime, "boxvol")


def socket_path(
    env: Mapping[str, str],
    euid: int,
    runtime_dir: str | None = None,
    *,
    exists: Callable[[str], bool] = os.path.exists,
) -> str:
    """The API socket a client talks to: ``BOXVOL_SOCKET`` or ``<runtime>/boxvold.sock``.

    A user other than root without either variable set talks to their own boxvold if one
    runs, else to the system's (``/run/boxvol/boxvold.sock``, for members of its group), as a
    docker client does; with neither there, the user's path (so the error names it).
    """
    if runtime_dir is None and env.get("BOXVOL_SOCKET"):
        return env["BOXVOL_SOCKET"]
    own = os.path.join(runtime_dir or default_runtime_dir(env, euid), SOCKET_NAME)
    if runtime_dir is not None or euid == 0 or env.get("BOXVOL_RUNTIME_DIR") or exists(own):
        return own
    system = os.path.join(SYSTEM_RUNTIME_DIR, SOCKET_NAME)
    return system if exists(system) else own


class Layout:
    """The directories under a home that boxvold owns (all created 0700)."""

    __slots__ = (
        "anonymous",
        "home",
        "images",
        "named",
        "quarantine",
        "registry",
        "reserve",
        "trash",
        "volumes",
    )

    def __init__(self, home: str) -> None:
        self.home = home
        self.volumes = os.path.join(home, "volumes")
        self.named = os.path.join(self.volumes, "named")
        self.anonymous = os.path.join(self.volumes, "anonymous")
        #: Volume directories whose removal is under way (renamed here first, atomically).
        self.trash = os.path.join(home, "trash")
        #: Entries found under the managed roots that cannot be adopted; never deleted.
        self.quarantine = os.path.join(home, "quarantine")
        self.registry = os.path.join(home, "registry.sqlite3")
        #: The ext4 images of sized volumes (``<volume-id>.ext4``), loop-mounted at their
        #: volume directories (volumed.images).
        self.images = os.path.join(home, "images")
        #: Preallocated space released on demand so a full disk stays recoverable
        #: (volumed.reserve).
        self.reserve = os.path.join(home, "reserve")

    def root(self, kind: str) -> str:
        """The managed root of a volume kind (``named`` or ``anonymous``)."""
        return self.named if kind == "named" else self.anonymous
