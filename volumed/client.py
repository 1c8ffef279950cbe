"""A small synchronous client of boxvold's API, used by the CLI and the VM driver.

Why not http.client or httpx: ``boxvol`` must start about as fast as podman's Go binary,
and importing http.client (it pulls in the email package) or httpx costs more than the
whole budget here (measured: +34 ms and +150 ms on a 19 ms interpreter start). The API
speaks one narrow dialect we control: HTTP/1.1, one request per connection
(``Connection: close``), JSON bodies. This module speaks exactly that and refuses
anything else; tests drive it against the real server.
"""

from __future__ import annotations

import _socket  # not socket: its enum and selectors imports cost the CLI ~4 ms per run
import json

from volumed.errors import (
    AlreadyExists,
    BoxvolError,
    DaemonUnavailable,
    NotFound,
    ProtocolError,
    from_code,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; mypy honours the name
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")
MAX_RESPONSE_BYTES = 256 << 20


def quote(text: str) -> str:
    """Percent-encode ``text`` for a URL path segment or query value."""
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in text.encode())


def encode_query(params: Iterable[tuple[str, str]]) -> str:
    """``?k=v&k2=v2`` from pairs (empty string if none)."""
    pairs = [f"{quote(key)}={quote(value)}" for key, value in params]
    return "?" + "&".join(pairs) if pairs else ""


def _decode_chunked(body: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while True:
        end = body.index(b"\r\n", pos)
        size = int(body[pos:end].split(b";", 1)[0], 16)
        if size == 0:
            return bytes(out)
        out += body[end + 2 : end + 2 + size]
        pos = end + 2 + size + 2


def parse_response(raw: bytes) -> tuple[int, bytes]:
    """Status and body of a complete HTTP/1.1 response read until the server closed."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ProtocolError("boxvold closed the connection before a complete answer")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"boxvold answered with something that is not HTTP: {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        try:
            body = _decode_chunked(body)
        except ValueError as exc:
            raise ProtocolError(f"boxvold sent a malformed chunked body: {exc}") from None
    elif b"content-length" in headers:
        length = int(headers[b"content-length"])
        if len(body) < length:
            raise ProtocolError("boxvold's answer was cut short")
        body = body[:length]
    return int(parts[1]), body


def _socket_group(path: str) -> str:
    """ "group 'NAME'", the group that owns the API socket, for a permission error."""
    import grp
    import os

    try:
        gid = os.stat(path).st_gid
        return f"group {grp.getgrgid(gid).gr_name!r}"
    except (OSError, KeyError):
        return "the socket's group"


class Client:
    """Talks to one boxvold over its unix socket; every call raises BoxvolError subclasses
    rebuilt from the daemon's ``{"error": {"code", "message"}}`` answers."""

    def __init__(self, socket_path: str, *, timeout: float = 300.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None, *, fd: int | None = None) -> Any:
        """Send one request and return the decoded JSON answer; raises on an error status.

        ``fd`` is passed along with the request (SCM_RIGHTS; archive and restore take a pipe
        end): the caller keeps its own copy. Such a request waits for its answer as long as
        the work takes (the timeout then bounds only connecting)."""
        payload = b"" if body is None else json.dumps(body).encode()
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: boxvold\r\nConnection: close\r\n"
            f"Accept: application/json\r\nContent-Length: {len(payload)}\r\n"
        )
        if body is not None:
            head += "Content-Type: application/json\r\n"
        raw = self._exchange(head.encode() + b"\r\n" + payload, fd)
        status, data = parse_response(raw)
        try:
            decoded = json.loads(data) if data else None
        except ValueError:
            raise ProtocolError(f"boxvold answered {status} with a body that is not JSON") from None
        if status >= 400:
            error = decoded.get("error") if isinstance(decoded, dict) else None
            if not isinstance(error, dict):
                raise ProtocolError(f"boxvold answered {status} without an error body")
            raise from_code(str(error.get("code")), str(error.get("message")))
        return decoded

    def _exchange(self, request: bytes, fd: int | None = None) -> bytes:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            try:
                self._connect(sock)
            except (FileNotFoundError, ConnectionRefusedError):
                raise DaemonUnavailable(
                    f"boxvold is not running (nothing answers on {self.socket_path}); start it "
                    "with 'systemctl enable --now boxvold.socket' (or 'boxvol serve'), or "
                    "point BOXVOL_SOCKET at its socket"
                ) from None
            except PermissionError:
                raise DaemonUnavailable(
                    f"permission denied on {self.socket_path}; run as root or as a member of "
                    f"{_socket_group(self.socket_path)} (an administrator adds you with "
                    "'usermod -aG GROUP USER'; log in again afterwards)"
                ) from None
            if fd is None:
                sock.sendall(request)
            else:
                _send_with_fd(sock, request, fd)
                sock.settimeout(None)
            chunks = []
            received = 0
            while True:
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
                received += len(chunk)
                if received > MAX_RESPONSE_BYTES:
                    raise ProtocolError("boxvold's answer is larger than any the API sends")
            return b"".join(chunks)
        except TimeoutError:
            raise DaemonUnavailable(
                f"boxvold did not answer within {self.timeout:.0f}s on {self.socket_path}"
            ) from None
        except OSError as exc:
            if isinstance(exc, BoxvolError):
                raise
            raise DaemonUnavailable(
                f"talking to boxvold on {self.socket_path} failed: {exc}"
            ) from None
        finally:
            sock.close()

    def _connect(self, sock: _socket.socket) -> None:
        """Connect, waiting while boxvold's backlog is full: a unix socket with a timeout
        fails with EAGAIN then instead of waiting as a TCP connect would."""
        import time

        deadline = time.monotonic() + self.timeout
        pause = 0.001
        while True:
            try:
                sock.connect(self.socket_path)
            except BlockingIOError:
                if time.monotonic() + pause > deadline:
                    raise TimeoutError from None
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
            else:
                return

    # -- volumes --------------------------------------------------------------------------

    def create_volume(
        self,
        name: str | None = None,
        *,
        labels: dict[str, str] | None = None,
        size_bytes: int | None = None,
        inode_limit: int | None = None,
        consumer: str | None = None,
    ) -> dict[str, Any]:
        """Create a named volume (``name`` given) or an anonymous one."""
        body: dict[str, Any] = {"labels": labels or {}}
        for key, value in (
            ("name", name),
            ("size_bytes", size_bytes),
            ("inode_limit", inode_limit),
            ("consumer", consumer),
        ):
            if value is not None:
                body[key] = value
        result: dict[str, Any] = self.request("POST", "/v1/volumes", body)
        return result

    def get_volume(self, ref: str) -> dict[str, Any]:
        """One volume by name, id or unique id prefix."""
        result: dict[str, Any] = self.request("GET", f"/v1/volumes/{quote(ref)}")
        return result

    def list_volumes(self, filters: Iterable[tuple[str, str]] = ()) -> list[dict[str, Any]]:
        """Volumes passing every filter (``kind``, ``label``, ``name``, ``in_use``,
        ``dangling``)."""
        result = self.request("GET", "/v1/volumes" + encode_query(filters))
        volumes: list[dict[str, Any]] = result["volumes"]
        return volumes

    def remove_volume(self, ref: str, *, force: bool = False) -> dict[str, Any]:
        """Remove a volume; refused while in use unless ``force``."""
        query = "?force=true" if force else ""
        result: dict[str, Any] = self.request("DELETE", f"/v1/volumes/{quote(ref)}{query}")
        return result

    def resize_volume(self, ref: str, size_bytes: int) -> dict[str, Any]:
        """Grow a sized volume's cap."""
        result: dict[str, Any] = self.request(
            "POST", f"/v1/volumes/{quote(ref)}/resize", {"size_bytes": size_bytes}
        )
        return result

    def collect_garbage(self, *, dry_run: bool = False) -> dict[str, Any]:
        """Reclaim (or with ``dry_run`` list) what boxvol lost track of."""
        result: dict[str, Any] = self.request("POST", "/v1/system/gc", {"dry_run": dry_run})
        return result

    def release_reserve(self) -> dict[str, Any]:
        """Unlink boxvold's reserve (recovering a full disk)."""
        result: dict[str, Any] = self.request("POST", "/v1/system/reserve-release")
        return result

    def archive_volume(self, ref: str, data_fd: int) -> dict[str, Any]:
        """Have boxvold write the volume as a tar stream into the pipe end ``data_fd`` (read
        the other end meanwhile, from another thread); its report once complete."""
        result: dict[str, Any] = self.request(
            "POST", f"/v1/volumes/{quote(ref)}/archive", fd=data_fd
        )
        return result

    def restore_volume(self, ref: str, data_fd: int, *, force: bool = False) -> dict[str, Any]:
        """Have boxvold replace the volume's content with the tar stream read from the pipe
        end ``data_fd`` (feed the other end meanwhile); its report once complete."""
        result: dict[str, Any] = self.request(
            "POST", f"/v1/volumes/{quote(ref)}/restore", {"force": force}, fd=data_fd
        )
        return result

    def prune(self, *, all_volumes: bool = False) -> dict[str, Any]:
        """Remove unused anonymous (or, with ``all_volumes``, all unused) volumes."""
        result: dict[str, Any] = self.request("POST", "/v1/volumes/prune", {"all": all_volumes})
        return result

    # -- exports --------------------------------------------------------------------------

    def create_export(
        self,
        volume: str,
        *,
        kind: str = "fuse",
        read_only: bool = False,
        owner: tuple[int, int] | None = None,
        consumer: str | dict[str, str] | None = None,
        cache: str | None = None,
        via: str | None = None,
    ) -> dict[str, Any]:
        """Export a volume (name or id): ``kind="fuse"`` answers with its mountpoint,
        ``kind="virtiofs"`` (consumer ``{"vm", "tag"}``) with its vhost-user socket."""
        body: dict[str, Any] = {"volume": volume, "kind": kind, "read_only": read_only}
        if via is not None:
            body["via"] = via
        if owner is not None:
            body["owner"] = {"uid": owner[0], "gid": owner[1]}
        if consumer is not None:
            body["consumer"] = consumer
        if cache is not None:
            body["cache"] = cache
        result: dict[str, Any] = self.request("POST", "/v1/exports", body)
        return result

    def list_exports(self, volume: str | None = None) -> list[dict[str, Any]]:
        """Live exports (of one volume if given)."""
        query = encode_query([("volume", volume)] if volume is not None else [])
        exports: list[dict[str, Any]] = self.request("GET", "/v1/exports" + query)["exports"]
        return exports

    def get_export(self, export_id: str) -> dict[str, Any]:
        """One live export."""
        result: dict[str, Any] = self.request("GET", f"/v1/exports/{quote(export_id)}")
        return result

    def remove_export(self, export_id: str) -> dict[str, Any]:
        """Tear an export down."""
        result: dict[str, Any] = self.request("DELETE", f"/v1/exports/{quote(export_id)}")
        return result

    def disk_usage(self) -> dict[str, Any]:
        """Per-volume usage, totals and host free space."""
        result: dict[str, Any] = self.request("GET", "/v1/system/df")
        return result

    def system_status(self) -> dict[str, Any]:
        """Version, uptime, counts, restarts and room left (``boxvol status``)."""
        result: dict[str, Any] = self.request("GET", "/v1/system/status")
        return result

    def health(self) -> dict[str, Any]:
        """Liveness and start-up reconciliation report."""
        result: dict[str, Any] = self.request("GET", "/v1/health")
        return result

    def version(self) -> dict[str, Any]:
        """Daemon and API versions."""
        result: dict[str, Any] = self.request("GET", "/v1/version")
        return result


def _send_with_fd(sock: _socket.socket, data: bytes, fd: int) -> None:
    """Send ``data`` with ``fd`` attached to its first byte (SCM_RIGHTS)."""
    import sys

    rights = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fd.to_bytes(4, sys.byteorder, signed=True))]
    sent = sock.sendmsg([data], rights)
    sock.sendall(data[sent:])


def ensure_spec_volumes(
    client: Client, specs: list[Any], *, consumer: str | None = None
) -> list[dict[str, Any]]:
    """The volume behind each parsed spec (``volumed.specs.VolumeSpec``), in order.

    A named spec resolves to the same volume every time (created on first use); an
    anonymous spec creates a fresh volume bound to ``consumer``. All or nothing: if any
    step fails, every volume this call created is removed again.
    """
    volumes: list[dict[str, Any]] = []
    created: list[str] = []
    try:
        for spec in specs:
            if spec.name is None:
                volume = client.create_volume(consumer=consumer)
                created.append(volume["id"])
            else:
                volume, made = _get_or_create(client, spec.name)
                if made:
                    created.append(volume["id"])
            volumes.append(volume)
    except BoxvolError:
        for volume_id in created:
            try:
                client.remove_volume(volume_id, force=True)
            except BoxvolError:
                pass
        raise
    return volumes


def _get_or_create(client: Client, name: str) -> tuple[dict[str, Any], bool]:
    try:
        return client.get_volume(name), False
    except NotFound:
        pass
    try:
        return client.create_volume(name), True
    except AlreadyExists:  # created by someone else meanwhile: it is the same volume
        return client.get_volume(name), False
