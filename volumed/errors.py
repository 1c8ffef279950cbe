"""The one error hierarchy of boxvold and its clients.

Lower layers raise these; each edge maps them once: the HTTP API through ``HTTP_STATUS``,
the CLI (``boxvol`` and ``boxvol vm``) through ``report_to_terminal``, FUSE to an errno.
Every message is meant for a human: it names what was wrong and what to do instead. Imports
only ``json`` and ``sys`` (the CLI loads both anyway), so it costs the CLI's start nothing.
"""

from __future__ import annotations

import json
import sys


class BoxvolError(Exception):
    """Base of every error boxvol reports; ``code`` is the stable machine-readable name."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(BoxvolError):
    """A request or argument breaks a documented rule (name, spec, size, label...)."""

    code = "invalid_argument"


class HostPathRefused(InvalidArgument):
    """Something tried to hand boxvol a host path; volumes are referenced by name or id."""

    code = "host_path_refused"


class MalformedRequest(InvalidArgument):
    """The request is not well-formed HTTP/1.1 (the server answers it before the API sees it)."""

    code = "bad_request"


class PayloadTooLarge(InvalidArgument):
    """The request body is larger than any request takes."""

    code = "payload_too_large"


class RequestTimeout(InvalidArgument):
    """The client did not send its whole request in time."""

    code = "request_timeout"


class BadArchive(BoxvolError):
    """A restore's input is not a complete tar archive; nothing was restored."""

    code = "bad_archive"


class NotFound(BoxvolError):
    """No volume (or export) answers to the reference."""

    code = "not_found"


class MethodNotAllowed(NotFound):
    """The endpoint exists, but not with this method."""

    code = "method_not_allowed"


class Conflict(BoxvolError):
    """The request contradicts the current state (a name taken, an ambiguous prefix)."""

    code = "conflict"


class AlreadyExists(Conflict):
    """A volume with that name exists already."""

    code = "already_exists"


class AmbiguousReference(Conflict):
    """An id prefix matches more than one volume."""

    code = "ambiguous_reference"


class InUse(Conflict):
    """The volume has live exports; removing it needs ``force``."""

    code = "in_use"


class OutsideManagedRoots(BoxvolError):
    """The gate refused a path: it is not a volume directory boxvold created."""

    code = "outside_managed_roots"


class ForeignMount(BoxvolError):
    """A volume's directory is a mount point boxvold did not make (e.g. root's
    ``mount --bind``); nothing serves, measures or removes it until it is unmounted."""

    code = "foreign_mount"


class StorageError(BoxvolError):
    """The host refused a filesystem or registry operation."""

    code = "storage_error"


class DiskFull(StorageError):
    """The filesystem holding the boxvol home is full; ``boxvol reserve-release`` frees
    boxvold's reserve so that removals can run."""

    code = "disk_full"


class ImageUnavailable(StorageError):
    """A sized volume's image is not mounted (missing, damaged, or not yet re-mounted):
    nothing is served from the empty directory under it."""

    code = "image_unavailable"


class AlreadyServing(BoxvolError):
    """Another boxvold already serves this home or socket."""

    code = "already_serving"


class Busy(BoxvolError):
    """boxvold is at its bound of concurrent requests; retrying later works."""

    code = "busy"


class DaemonUnavailable(BoxvolError):
    """The client could not reach boxvold."""

    code = "daemon_unavailable"


class ProtocolError(BoxvolError):
    """boxvold answered with something the client cannot understand."""

    code = "protocol_error"


#: Every error class by its code, so a client rebuilds the error a daemon reported.
BY_CODE: dict[str, type[BoxvolError]] = {
    cls.code: cls
    for cls in (
        BoxvolError,
        InvalidArgument,
        HostPathRefused,
        MalformedRequest,
        PayloadTooLarge,
        RequestTimeout,
        BadArchive,
        NotFound,
        MethodNotAllowed,
        Conflict,
        AlreadyExists,
        AmbiguousReference,
        InUse,
        OutsideManagedRoots,
        ForeignMount,
        StorageError,
        DiskFull,
        ImageUnavailable,
        AlreadyServing,
        Busy,
        DaemonUnavailable,
        ProtocolError,
    )
}

#: The HTTP status each error class is answered with (most specific class first wins).
HTTP_STATUS: tuple[tuple[type[BoxvolError], int], ...] = (
    (MalformedRequest, 400),
    (PayloadTooLarge, 413),
    (RequestTimeout, 408),
    (InvalidArgument, 422),
    # The caller's data, not a usage error: the CLI exits 1, the API answers 422.
    (BadArchive, 422),
    (MethodNotAllowed, 405),
    (NotFound, 404),
    (Conflict, 409),
    (OutsideManagedRoots, 500),
    # A state of the host the operator must fix (unmount it), not a fault of boxvold.
    (ForeignMount, 409),
    (DiskFull, 507),
    (StorageError, 500),
    (Busy, 503),
    (BoxvolError, 500),
)


def http_status(error: BoxvolError) -> int:
    """The HTTP status an error is reported with."""
    for cls, status in HTTP_STATUS:
        if isinstance(error, cls):
            return status
    return 500


def error_body(error: BoxvolError) -> dict[str, dict[str, str]]:
    """The one JSON shape of every error answer: ``{"error": {"code", "message"}}``."""
    return {"error": {"code": error.code, "message": error.message}}


def error_json(error: BoxvolError) -> str:
    """``error_body`` encoded as the API sends it."""
    return json.dumps(error_body(error), separators=(",", ":"))


#: Exit statuses of the ``boxvol`` command (``boxvol vm`` included).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def report_to_terminal(error: BoxvolError) -> int:
    """Print ``error`` for a person at a terminal; the exit status it gets (an argument
    refused as written is a usage error, 2; anything else a failed operation, 1)."""
    from volumed.text import printable  # not at the top: volumed.text imports this module

    # A message can quote what a request held (a name, a label): never raw to a terminal.
    sys.stderr.write(f"boxvol: error: {printable(error.message)}\n")
    if is_disk_full(error):
        sys.stderr.write(f"boxvol: hint: {DISK_FULL_HINT}\n")
    return EXIT_USAGE if isinstance(error, InvalidArgument) else EXIT_FAILED


#: The one line every "no space left" a person meets ends with.
DISK_FULL_HINT = (
    "the disk is full; 'boxvol reserve-release' frees boxvold's reserve so that "
    "'boxvol rm' and 'boxvol prune' can run, and it comes back once there is room"
)


def is_disk_full(error: BoxvolError) -> bool:
    """True for DiskFull and for any error whose cause was ENOSPC ("No space left")."""
    return isinstance(error, DiskFull) or any(
        phrase in error.message for phrase in ("No space left", "disk is full")
    )


def from_code(code: str, message: str) -> BoxvolError:
    """Rebuild an error reported by the daemon as ``{"code", "message"}``."""
    return BY_CODE.get(code, BoxvolError)(message)
