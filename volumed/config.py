"""boxvold's settings: the config file (``/etc/boxvol/boxvold.toml``), its keys and their rules,
and the precedence between the command line, the environment and the file.

One table, ``KEYS``, states every key once: how its value is checked, which environment
variable and command-line option override it, and whether a SIGHUP applies it to the running
daemon (``live``) or it takes effect at the next start. Parsing is strict: an unknown key, a
wrong type or a bad value raises ``InvalidArgument`` naming the file, the key and the reason,
so a typo stops start-up instead of being ignored. Precedence, highest first: command-line
option, environment variable, config file, built-in default.

Pure apart from ``read_file`` (the one I/O edge); cheap to import (no trio). The example
file with every key and its default is ``systemd/boxvold.toml``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tomllib
from collections.abc import Callable, Mapping
from typing import Any

from volumed import locations
from volumed.errors import InvalidArgument
from volumed.exports import CACHE_POLICIES, DEFAULT_CACHE
from volumed.reserve import DEFAULT_RESERVE_BYTES
from volumed.sizes import parse_bytes
from volumed.virtiofsd import VIRTIOFSD_CACHE_MODES

log = logging.getLogger(__name__)

DEFAULT_PATH = "/etc/boxvol/boxvold.toml"
#: Names the config file instead of DEFAULT_PATH (``--config`` overrides it).
PATH_ENV = "BOXVOL_CONFIG"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    """Every setting of boxvold, resolved (defaults filled in).

    ``home`` and ``runtime_dir`` are None until ``resolve`` fills in the locations the
    environment and euid give (``volumed.locations``); after it they are absolute.
    """

    home: str | None = None
    runtime_dir: str | None = None
    #: Group that owns the API socket (mode 0660); None keeps the daemon's own group.
    socket_group: str | None = None
    #: Group QEMU runs with: it owns the vhost-user sockets. None: kvm, libvirt-qemu or qemu.
    vhost_group: str | None = None
    log_level: str = "INFO"
    #: Bytes kept preallocated in the home for recovering a full disk (volumed.reserve).
    reserve_bytes: int = DEFAULT_RESERVE_BYTES
    #: The virtiofsd binary; None picks one (volumed.virtiofsd.find_virtiofsd).
    virtiofsd: str | None = None
    #: virtiofsd's own ``--cache`` for the virtio-fs exports boxvold starts.
    virtiofsd_cache: str = "auto"
    #: Cache mode of an export whose create request names none (docs/fuse.md).
    export_cache: str = DEFAULT_CACHE


@dataclasses.dataclass(frozen=True, slots=True)
class Key:
    """One key of the config file.

    Attributes:
        name: the key in the file, and the ``Config`` field it sets.
        parse: turns the TOML value into the field's value; raises ValueError or TypeError
            saying why not.
        live: a SIGHUP applies it to the running daemon; otherwise it needs a restart.
        env: the environment variable that overrides the file, if any.
        option: the ``argparse`` destination of the command-line option that overrides both
            (argparse has checked its value already).
        help: what it is, in a few words.
        relative_ok: the environment may give a relative path (made absolute), as it always
            could for BOXVOL_HOME and BOXVOL_RUNTIME_DIR.
    """

    name: str
    parse: Callable[[object], Any]
    live: bool
    env: str | None = None
    option: str | None = None
    help: str = ""
    relative_ok: bool = False


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"must be a string, not {_toml_type(value)}")
    if not value or "\x00" in value:
        raise ValueError("must be a non-empty string without NUL")
    return value


def _absolute_path(value: object) -> str:
    text = _text(value)
    if not os.path.isabs(text):
        raise ValueError(f"must be an absolute path, not {text!r}")
    return os.path.normpath(text)


def _group(value: object) -> str:
    text = _text(value)
    if ":" in text or "\n" in text or "/" in text:
        raise ValueError(f"must be a group name, not {text!r}")
    return text


def _log_level(value: object) -> str:
    if not isinstance(value, str) or value.upper() not in LOG_LEVELS:
        raise ValueError("must be one of " + ", ".join(LOG_LEVELS))
    return value.upper()


def _size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f'must be a size such as "64M" (or 0: none), not {_toml_type(value)}')
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    try:
        return parse_bytes(value)
    except InvalidArgument as exc:
        raise ValueError(exc.message) from None


def _choice(*choices: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ValueError("must be one of " + ", ".join(choices))
        return value

    return parse


#: Every key of the file; nothing else is accepted.
KEYS: tuple[Key, ...] = (
    Key("home", _absolute_path, False, "BOXVOL_HOME", "home", "volumes, registry", True),
    Key(
        "runtime_dir",
        _absolute_path,
        False,
        "BOXVOL_RUNTIME_DIR",
        "runtime_dir",
        "the API socket, exports' mounts and vhost-user sockets",
        True,
    ),
    Key("socket_group", _group, False, None, "socket_group", "group owning the API socket"),
    Key("vhost_group", _group, False, None, "vhost_group", "group QEMU runs with"),
    Key("log_level", _log_level, True, "BOXVOL_LOG_LEVEL", "log_level", "DEBUG..ERROR"),
    Key(
        "reserve_size",
        _size,
        True,
        "BOXVOL_RESERVE_SIZE",
        "reserve_size",
        "space kept for recovering a full disk",
    ),
    Key("virtiofsd", _absolute_path, False, None, None, "the virtiofsd binary"),
    Key(
        "virtiofsd_cache",
        _choice(*VIRTIOFSD_CACHE_MODES),
        True,
        None,
        None,
        "virtiofsd's --cache for new virtio-fs exports",
    ),
    Key(
        "export_cache",
        _choice(*CACHE_POLICIES),
        True,
        None,
        None,
        "cache mode of new exports that name none",
    ),
)
_BY_NAME = {key.name: key for key in KEYS}
#: Config fields whose key has another name in the file.
_FIELD = {"reserve_size": "reserve_bytes"}


def field_of(key: Key) -> str:
    """The ``Config`` field ``key`` sets."""
    return _FIELD.get(key.name, key.name)


def _toml_type(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _refusal(path: str, key: str | None, reason: str) -> InvalidArgument:
    where = f"{path}: key {key!r}: " if key is not None else f"{path}: "
    return InvalidArgument(f"boxvold: {where}{reason}")


def parse(text: str, path: str) -> dict[str, Any]:
    """The settings the TOML ``text`` of the file at ``path`` gives, by ``Config`` field.

    Only the keys present are returned. Raises InvalidArgument naming ``path``, the key and
    the reason for a syntax error, an unknown key or a bad value.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _refusal(path, None, f"not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for name, value in document.items():
        key = _BY_NAME.get(name)
        if key is None:
            raise _refusal(path, name, "unknown key; known keys: " + ", ".join(_BY_NAME))
        try:
            values[field_of(key)] = key.parse(value)
        except (ValueError, TypeError) as exc:
            raise _refusal(path, name, str(exc)) from None
    return values


def read_file(path: str, *, explicit: bool) -> str:
    """The text of the config file; "" when the default file is missing (defaults apply).

    Blocking. A missing file someone named (``--config``, BOXVOL_CONFIG) is an error, as is
    one that cannot be read.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        if explicit:
            raise _refusal(
                path, None, "no such file (named by --config or BOXVOL_CONFIG)"
            ) from None
        return ""
    except (OSError, UnicodeDecodeError) as exc:
        raise _refusal(path, None, f"cannot be read: {exc}") from None


def config_path(option: str | None, env: Mapping[str, str]) -> tuple[str, bool]:
    """The config file to read and whether it was named explicitly (``--config`` or env)."""
    if option:
        return option, True
    if env.get(PATH_ENV):
        return env[PATH_ENV], True
    return DEFAULT_PATH, False


def resolve(
    file_values: Mapping[str, Any],
    env: Mapping[str, str],
    options: Mapping[str, Any],
    euid: int,
) -> Config:
    """The settings in force: each one from the command line (``options``, by argparse
    destination; None means not given), else the environment, else the file, else the
    default. An environment variable with a bad value is refused naming it."""
    values: dict[str, Any] = dict(file_values)
    for key in KEYS:
        given = options.get(key.option) if key.option else None
        if given is not None:
            values[field_of(key)] = given
            continue
        if key.env and env.get(key.env):
            try:
                text = env[key.env]
                values[field_of(key)] = text if key.relative_ok else key.parse(text)
            except ValueError as exc:
                raise InvalidArgument(f"boxvold: environment {key.env}: {exc}") from None
    # The built-in locations; BOXVOL_HOME/BOXVOL_RUNTIME_DIR were applied above already.
    bare_env = {k: v for k, v in env.items() if k not in ("BOXVOL_HOME", "BOXVOL_RUNTIME_DIR")}
    home = values.get("home") or locations.default_home(bare_env, euid)
    runtime_dir = values.get("runtime_dir") or locations.default_runtime_dir(bare_env, euid)
    values["home"], values["runtime_dir"] = os.path.abspath(home), os.path.abspath(runtime_dir)
    return Config(**values)


def load(path: str, *, explicit: bool = True) -> Config:
    """The file's settings over the defaults (no environment, no options). Blocking."""
    return Config(**parse(read_file(path, explicit=explicit), path))


@dataclasses.dataclass(frozen=True, slots=True)
class Change:
    """One setting that differs between the running config and a reloaded one."""

    key: str
    old: object
    new: object
    live: bool


def changes(old: Config, new: Config) -> list[Change]:
    """What differs between ``old`` and ``new``, key by key, in ``KEYS`` order."""
    found = []
    for key in KEYS:
        field = field_of(key)
        before, after = getattr(old, field), getattr(new, field)
        if before != after:
            found.append(Change(key.name, before, after, key.live))
    return found


def applied(old: Config, change_list: list[Change]) -> Config:
    """``old`` with the live ``changes`` applied (the others wait for a restart)."""
    live: dict[str, Any] = {field_of(_BY_NAME[c.key]): c.new for c in change_list if c.live}
    return dataclasses.replace(old, **live)
