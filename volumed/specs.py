"""The ``-v`` volume spec: one parser shared by the CLI and the VM driver; pure.

Forms: ``/guest`` (anonymous), ``/guest:ro|rw``, ``NAME:/guest``, ``NAME:/guest:ro|rw``.
A host bind (``/host:/guest``) is refused with a migration message: boxvol never takes a
host path. Parsing a list validates every spec before anything acts on it.
"""

from __future__ import annotations

import posixpath

from volumed.errors import HostPathRefused, InvalidArgument
from volumed.names import NAME_RULE, check_name

SPEC_FORMS = "'/guest', '/guest:ro', 'NAME:/guest' or 'NAME:/guest:ro' (ro or rw)"
_MODES = {"ro": True, "rw": False}
MAX_GUEST_PATH = 4096


class VolumeSpec:
    """One parsed spec: a named volume (``name``) or a fresh anonymous one (``name=None``)."""

    __slots__ = ("guest_path", "name", "read_only")

    def __init__(self, name: str | None, guest_path: str, read_only: bool) -> None:
        self.name = name
        self.guest_path = guest_path
        self.read_only = read_only

    @property
    def anonymous(self) -> bool:
        """True if this spec asks for a fresh anonymous volume."""
        return self.name is None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VolumeSpec) and (
            self.name,
            self.guest_path,
            self.read_only,
        ) == (other.name, other.guest_path, other.read_only)

    def __hash__(self) -> int:
        return hash((self.name, self.guest_path, self.read_only))

    def __repr__(self) -> str:
        return f"VolumeSpec({self.name!r}, {self.guest_path!r}, read_only={self.read_only})"

    def __str__(self) -> str:
        mode = ":ro" if self.read_only else ""
        return f"{self.name}:{self.guest_path}{mode}" if self.name else f"{self.guest_path}{mode}"


def _host_bind_refusal(text: str, guest: str) -> HostPathRefused:
    return HostPathRefused(
        f"invalid volume spec {text!r}: host bind mounts are not supported; boxvol exports "
        f"only volumes it manages, referenced by name or id. Use a named volume, "
        f"'NAME:{guest}' (create it with 'boxvol create NAME'), or an anonymous one, '{guest}'"
    )


def _guest_path(text: str, part: str) -> str:
    if not part.startswith("/"):
        raise InvalidArgument(
            f"invalid volume spec {text!r}: the guest path {part!r} is not absolute; "
            f"write it from the root, e.g. '/{part}'. Forms: {SPEC_FORMS}"
        )
    if "\0" in part or len(part) > MAX_GUEST_PATH:
        raise InvalidArgument(f"invalid volume spec {text!r}: the guest path is not usable")
    if ".." in part.split("/"):
        raise InvalidArgument(
            f"invalid volume spec {text!r}: the guest path {part!r} contains '..'; "
            "give the mount point directly"
        )
    path = posixpath.normpath(part)
    if path == "/":
        raise InvalidArgument(
            f"invalid volume spec {text!r}: a volume cannot be mounted on the guest's root '/'"
        )
    return path


def _mode(text: str, part: str) -> bool:
    try:
        return _MODES[part]
    except KeyError:
        raise InvalidArgument(
            f"invalid volume spec {text!r}: unknown option {part!r}; the only options are "
            "'ro' (read-only) and 'rw' (read-write, the default)"
        ) from None


def _looks_like_host_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or "/" in source


def parse_spec(text: str) -> VolumeSpec:
    """Parse one spec; raises InvalidArgument (or HostPathRefused) naming the problem."""
    parts = text.split(":")
    if len(parts) > 3:
        raise InvalidArgument(
            f"invalid volume spec {text!r}: too many ':'-separated parts; forms: {SPEC_FORMS}"
        )
    if any(part == "" for part in parts):
        raise InvalidArgument(
            f"invalid volume spec {text!r}: it has an empty part; forms: {SPEC_FORMS}"
        )
    if len(parts) == 1:
        return VolumeSpec(None, _guest_path(text, parts[0]), read_only=False)
    first, second = parts[0], parts[1]
    if first.startswith("/") and not second.startswith("/"):
        if len(parts) == 3:
            raise InvalidArgument(
                f"invalid volume spec {text!r}: give one option after the guest path; "
                f"forms: {SPEC_FORMS}"
            )
        # '/guest:ro' — an anonymous volume with a mode.
        return VolumeSpec(None, _guest_path(text, first), read_only=_mode(text, second))
    if _looks_like_host_path(first):
        raise _host_bind_refusal(text, second if second.startswith("/") else "/data")
    if len(parts) == 2 and second in _MODES:
        raise InvalidArgument(
            f"invalid volume spec {text!r}: the guest path {first!r} is not absolute; "
            f"write it from the root, e.g. '/{first}:{second}'. Forms: {SPEC_FORMS}"
        )
    try:
        name = check_name(first)
    except InvalidArgument:
        raise InvalidArgument(
            f"invalid volume spec {text!r}: {first!r} is not a volume name ({NAME_RULE})"
        ) from None
    read_only = _mode(text, parts[2]) if len(parts) == 3 else False
    return VolumeSpec(name, _guest_path(text, second), read_only=read_only)


def parse_specs(texts: list[str]) -> list[VolumeSpec]:
    """Parse a whole list, refusing it entirely if any spec is bad or two share a guest path."""
    specs = [parse_spec(text) for text in texts]
    seen: dict[str, VolumeSpec] = {}
    for spec in specs:
        if spec.guest_path in seen:
            raise InvalidArgument(
                f"volume specs {str(seen[spec.guest_path])!r} and {str(spec)!r} both mount "
                f"at {spec.guest_path!r}; give each volume its own guest path"
            )
        seen[spec.guest_path] = spec
    return specs
