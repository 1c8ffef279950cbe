"""boxvold's HTTP/1.1 server: h11 on trio, hosting the API's ASGI app on a unix socket.

Why our own and not hypercorn: a client that closed half-way through a request body made
hypercorn's error reply race the app's reply on one stream; the ``BusyResourceError`` escaped
into the listeners' nursery and ended boxvold (and every FUSE export with it). It also had no
bound on a request body and none on connections. The API is a local control plane with one
narrow dialect, so the server keeps exactly the rules that dialect needs:

- One task per connection reads one request, answers it, and only then reads the next: two
  tasks never send on one stream. Whatever goes wrong in a connection (a client that
  vanishes, malformed HTTP, a bug) ends that connection alone, never the server.
- Deadlines: a request head within ``head_timeout`` of the connection opening (or of the
  previous answer), the whole body within ``body_timeout``, an answer written within
  ``send_timeout``. A client that sends nothing, or a byte a minute, cannot hold a slot.
- A body larger than ``max_body_bytes`` is refused with 413 before it is read.
- At most ``max_connections`` at once. At the bound, the connection that has waited longest
  for its request is closed to make room, so idle clients cannot crowd out one that talks;
  only when every connection is busy with a request is a newcomer answered 503.
- At most ``max_active_requests`` requests are inside the app at once; the rest wait, parked,
  first come first served. Paths named ``unqueued`` (health) skip that wait: with a thousand
  requests all runnable, trio's run queue alone kept a health check 300-400 ms.

Passing a file descriptor: a client may attach one fd to its request (``SCM_RIGHTS`` on the
request's first ``sendmsg``; every receive here is a ``recvmsg``), for routes that move data
without it flowing through boxvold (archives: the fd is a pipe end handed to a worker). At
most one fd per request, and only on the paths ``takes_fd`` accepts; anything else is
answered 400 before the app sees the request, and the fd is closed. The route takes the fd
from ``scope["extensions"][PASSED_FD]`` (``PassedFd.take``); one it does not take is closed
when the request ends. A request carrying an fd skips the queue for the app (it may run for
minutes; the API bounds such work itself), like the ``unqueued`` paths.

Who is asking: the peer's pid, uid and gid (``SO_PEERCRED``, read once as a connection is
accepted) go into every request's scope under ``PEER_CREDENTIALS``, for the audit log
(``volumed.audit``).

Errors the server answers itself use the API's one error shape (``errors.error_body``). HTTP
parsing is h11's; routing and validation are the app's. Must not import pyfuse3.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import errno
import logging
import os
import socket
import struct
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import h11
import trio

from volumed import errors
from volumed.text import printable

log = logging.getLogger(__name__)

ASGIApp = Callable[
    [
        MutableMapping[str, Any],
        Callable[[], Awaitable[MutableMapping[str, Any]]],
        Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ],
    Awaitable[None],
]
#: accept(2) errors that mean "out of a resource for now": wait and retry, as trio's own
#: serve_listeners does; anything else is a bug in how the listener was set up.
_OVERLOAD_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_RECEIVE_BYTES = 1 << 16
#: Seconds a refused request's remaining bytes are read and dropped before closing.
LINGER_SECONDS = 1.0
#: Room for the control message of one received fd, and one more so that a second fd is
#: seen (and refused) rather than silently dropped by the kernel.
_ANCILLARY_BYTES = socket.CMSG_SPACE(2 * array.array("i").itemsize)
#: The ASGI scope extension under which a request's passed fd (a ``PassedFd``) waits.
PASSED_FD = "boxvol.passed_fd"
#: The ASGI scope extension holding the connection's ``PeerCredentials``.
PEER_CREDENTIALS = "boxvol.peer_credentials"
_UCRED = struct.Struct("3i")


@dataclasses.dataclass(frozen=True, slots=True)
class PeerCredentials:
    """Who is at the other end of an API connection: SO_PEERCRED, which the kernel fills in
    when the client connects (a client cannot claim another's)."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: trio.socket.SocketType) -> PeerCredentials | None:
    """The credentials of a unix socket's peer; None if the kernel has none to give."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    return PeerCredentials(*_UCRED.unpack(raw))


class PassedFd:
    """A file descriptor a client passed with its request. The route that ``take``s it owns
    it from then on; the server closes one nobody took when the request ends."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def take(self) -> int:
        """The fd, now the caller's to close."""
        fd = self._fd
        if fd is None:
            raise RuntimeError("the passed fd was taken already")
        self._fd = None
        return fd

    def close(self) -> None:
        """Close the fd unless it was taken."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _takes_no_fd(method: str, path: str) -> bool:
    return False


@dataclasses.dataclass(frozen=True, slots=True)
class ServerLimits:
    """Bounds that keep the API answering whatever its clients do (docs/api.md states them)."""

    #: Connections served at once; each costs one fd (LimitNOFILE= in the unit fits it).
    max_connections: int = 1024
    #: Seconds for a complete request head, counted from the connection opening or from the
    #: end of the previous answer (an idle kept-alive connection is closed then).
    head_timeout: float = 10.0
    #: Seconds for a complete request body, counted from the end of its head.
    body_timeout: float = 30.0
    #: Seconds for writing an answer to a client that does not read it.
    send_timeout: float = 30.0
    #: Request line and headers together.
    max_head_bytes: int = 16 << 10
    #: The largest request body (the largest valid one, 64 labels of 4 KiB, is about 300 KiB).
    max_body_bytes: int = 1 << 20
    #: Requests inside the app at once; the rest wait their turn in order, parked (not in
    #: trio's run queue), so a request that skips the queue is scheduled at once.
    #: 4 on two cores: with 16, health's p99 under 1,000 listings was 100-180 ms; with 4,
    #: 40-80 ms (bench/control_plane.py).
    max_active_requests: int = 4


def server_bounds_text(limits: ServerLimits) -> str:
    """The bounds in words, for the API's OpenAPI document."""
    return (
        f"Types are strict. A request body is at most {limits.max_body_bytes} bytes (413 "
        f"payload_too_large), its line and headers at most {limits.max_head_bytes} bytes (400 "
        f"bad_request); the head must arrive within {limits.head_timeout:g} s and the body "
        f"within {limits.body_timeout:g} s (408 request_timeout). At most "
        f"{limits.max_connections} connections are served at once: the one that has waited "
        "longest for its request makes room for a new one, and 503 busy is answered only "
        "when every connection is busy with a request. Every error is "
        '{"error": {"code", "message"}}.'
    )


class _Refusal(Exception):
    """A request the server answers itself with ``error`` and then closes the connection."""

    def __init__(self, error: errors.BoxvolError) -> None:
        super().__init__(error.message)
        self.error = error


class _Connection:
    """One client: its stream and HTTP state, and whether it waits for a request."""

    __slots__ = ("fds", "fds_cut", "http", "peer", "scope", "stream")

    def __init__(
        self,
        stream: trio.SocketStream,
        limits: ServerLimits,
        peer: PeerCredentials | None = None,
    ) -> None:
        self.stream = stream
        self.peer = peer
        self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head_bytes)
        self.scope = trio.CancelScope()
        #: Fds received with the current request (SCM_RIGHTS), and whether the kernel had
        #: to drop some (more than ``_ANCILLARY_BYTES`` hold).
        self.fds: list[int] = []
        self.fds_cut = False

    def close_fds(self) -> None:
        """Close the fds received with the current request."""
        fds, self.fds, self.fds_cut = self.fds, [], False
        for fd in fds:
            os.close(fd)


class HttpServer:
    """Serves one ASGI app on listening unix sockets under ``limits``.

    Attributes:
        app: the ASGI application (the API).
        limits: the bounds above.
    """

    app: ASGIApp
    limits: ServerLimits
    _connections: set[_Connection]
    #: Connections waiting for (the rest of) a request, oldest first: eviction candidates.
    _waiting: collections.OrderedDict[_Connection, None]

    def __init__(
        self,
        app: ASGIApp,
        limits: ServerLimits,
        *,
        unqueued: frozenset[str] = frozenset(),
        takes_fd: Callable[[str, str], bool] = _takes_no_fd,
    ) -> None:
        self.app = app
        self.limits = limits
        #: Whether a request (method, path) may carry a passed fd.
        self.takes_fd = takes_fd
        #: GET paths that skip the queue for the app (liveness: they must answer while a
        #: thousand listings wait; each is cheap and never waits on a volume).
        self.unqueued = unqueued
        self._active = trio.CapacityLimiter(limits.max_active_requests)
        self._connections = set()
        self._waiting = collections.OrderedDict()

    @property
    def connections(self) -> int:
        """Connections open right now (for tests and diagnostics)."""
        return len(self._connections)

    async def serve(
        self,
        listener: socket.socket,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept and serve connections on ``listener`` (bound and listening) until cancelled."""
        sock = trio.socket.from_stdlib_socket(listener)
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                try:
                    accepted, _ = await sock.accept()
                except OSError as exc:
                    if exc.errno not in _OVERLOAD_ERRNOS:
                        raise
                    log.error("api accept failed error=%s; retrying in 0.1 s", exc)
                    await trio.sleep(0.1)
                    continue
                stream = trio.SocketStream(accepted)
                if len(self._connections) >= self.limits.max_connections and not self._evict():
                    nursery.start_soon(self._refuse_busy, stream)
                    continue
                connection = _Connection(stream, self.limits, peer_credentials(accepted))
                self._connections.add(connection)
                nursery.start_soon(self._serve_connection, connection)

    def _evict(self) -> bool:
        """Close the connection that has waited longest for its request; False if none."""
        if not self._waiting:
            return False
        oldest, _ = self._waiting.popitem(last=False)
        oldest.scope.cancel()
        log.debug("api connection evicted: at the bound of %d", self.limits.max_connections)
        return True

    async def _refuse_busy(self, stream: trio.SocketStream) -> None:
        busy = errors.Busy(
            f"boxvold is answering {len(self._connections)} requests at once, its bound; "
            "retry in a moment"
        )
        try:
            with trio.move_on_after(1):
                await stream.send_all(_raw_error_response(busy))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await _close(stream)

    async def _serve_connection(self, connection: _Connection) -> None:
        try:
            with connection.scope:
                await self._serve_requests(connection)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            log.debug("api client went away")
        except Exception:
            # A bug: this connection ends, the server goes on.
            log.exception("api connection failed")
        finally:
            connection.close_fds()
            self._waiting.pop(connection, None)
            self._connections.discard(connection)
            await _close(connection.stream)

    async def _serve_requests(self, connection: _Connection) -> None:
        http = connection.http
        while True:
            self._waiting[connection] = None
            try:
                request = await self._read_head(connection)
                if request is None:
                    return
                body = await self._read_body(connection, request)
                passed = self._passed_fd(connection, request)
            except _Refusal as refusal:
                connection.close_fds()
                await self._send_refusal(connection, refusal.error)
                return
            self._waiting.pop(connection, None)
            try:
                if passed is not None or (
                    request.method == b"GET" and _path_of(request) in self.unqueued
                ):
                    await self._run_app(connection, request, body, passed)
                else:
                    async with self._active:
                        await self._run_app(connection, request, body, passed)
            finally:
                if passed is not None:
                    passed.close()
                connection.close_fds()
            if http.our_state is not h11.DONE or http.their_state is not h11.DONE:
                return  # either side asked to close (Connection: close, HTTP/1.0...)
            http.start_next_cycle()

    def _passed_fd(self, connection: _Connection, request: h11.Request) -> PassedFd | None:
        """The fd that came with ``request``, if one did and its route takes one."""
        if not connection.fds and not connection.fds_cut:
            return None
        method, path = request.method.decode("ascii"), _path_of(request)
        if connection.fds_cut or len(connection.fds) > 1:
            raise _Refusal(
                errors.MalformedRequest(
                    "more than one file descriptor came with the request; a request "
                    "passes at most one"
                )
            )
        if not self.takes_fd(method, path):
            raise _Refusal(
                errors.MalformedRequest(
                    f"a file descriptor came with {method} {printable(path)}, which takes "
                    "none; only the archive and restore endpoints take one"
                )
            )
        fd = connection.fds.pop()
        return PassedFd(fd)

    async def _receive(self, connection: _Connection) -> bytes:
        """The next bytes from the client, keeping any fds that come with them."""
        try:
            data, ancillary, flags, _ = await connection.stream.socket.recvmsg(
                _RECEIVE_BYTES, _ANCILLARY_BYTES
            )
        except OSError as exc:
            raise trio.BrokenResourceError(f"receiving from the client failed: {exc}") from exc
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                connection.fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            connection.fds_cut = True
        return bytes(data)

    async def _next_event(self, connection: _Connection) -> h11.Event:
        """The next h11 event, receiving more bytes when h11 needs them."""
        http = connection.http
        while True:
            try:
                event = http.next_event()
            except h11.RemoteProtocolError as exc:
                raise _Refusal(
                    errors.MalformedRequest(
                        f"malformed HTTP request: {exc}; boxvold speaks HTTP/1.1 with JSON"
                    )
                ) from None
            if event is h11.PAUSED:
                # Only between requests, and a new cycle starts before the next read.
                raise RuntimeError("h11 paused in the middle of a request")
            if event is not h11.NEED_DATA:
                assert isinstance(event, h11.Event)
                return event
            data = await self._receive(connection)
            http.receive_data(data)  # b"" tells h11 the client closed

    async def _read_head(self, connection: _Connection) -> h11.Request | None:
        """The next request's head, or None when the client is done (closed or idle)."""
        http = connection.http
        with trio.move_on_after(self.limits.head_timeout):
            event = await self._next_event(connection)
            if isinstance(event, h11.Request):
                return event
            if isinstance(event, h11.ConnectionClosed):
                return None
            raise _Refusal(errors.MalformedRequest(f"unexpected HTTP event {event!r}"))
        if http.their_state is h11.IDLE and not http.trailing_data[0]:
            return None  # idle between requests: close quietly
        raise _Refusal(
            errors.RequestTimeout(
                f"the request head did not arrive within {self.limits.head_timeout:g} s"
            )
        )

    async def _read_body(self, connection: _Connection, request: h11.Request) -> bytes:
        """The whole body of ``request``, within the size and time bounds."""
        limit = self.limits.max_body_bytes
        declared = _content_length(request)
        if declared is not None and declared > limit:
            raise _Refusal(_too_large(limit))
        http = connection.http
        if http.client_is_waiting_for_100_continue:
            await self._send(
                connection, http.send(h11.InformationalResponse(status_code=100, headers=[]))
            )
        body = bytearray()
        with trio.move_on_after(self.limits.body_timeout):
            while True:
                event = await self._next_event(connection)
                if isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > limit:
                        raise _Refusal(_too_large(limit))
                elif isinstance(event, h11.EndOfMessage):
                    return bytes(body)
                elif isinstance(event, h11.ConnectionClosed):
                    raise trio.BrokenResourceError("the client closed in the middle of a body")
        raise _Refusal(
            errors.RequestTimeout(
                f"the request body did not arrive within {self.limits.body_timeout:g} s"
            )
        )

    async def _run_app(
        self,
        connection: _Connection,
        request: h11.Request,
        body: bytes,
        passed: PassedFd | None = None,
    ) -> None:
        """Call the app with one request and write its answer as it comes."""
        http = connection.http
        answered = False
        delivered = False
        status = 0
        headers: list[tuple[bytes, bytes]] = []

        async def receive() -> MutableMapping[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            # Asked again only to watch for a disconnect: the body is all there is.
            await trio.sleep_forever()
            raise AssertionError("unreachable")

        async def send(message: MutableMapping[str, Any]) -> None:
            nonlocal status, headers, answered
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", ())]
                return
            if message["type"] != "http.response.body":
                return
            data = b""
            if http.our_state is h11.SEND_RESPONSE:
                data += http.send(h11.Response(status_code=status, headers=headers))
            chunk = bytes(message.get("body", b""))
            if chunk:
                data += http.send(h11.Data(data=chunk))
            if not message.get("more_body", False):
                data += http.send(h11.EndOfMessage())
                answered = True
            await self._send(connection, data)

        try:
            scope = _asgi_scope(request)
            if passed is not None:
                scope["extensions"][PASSED_FD] = passed
            scope["extensions"][PEER_CREDENTIALS] = connection.peer
            await self.app(scope, receive, send)
        except Exception:
            if answered:
                # Starlette re-raises a handler's exception after its 500 answer has gone
                # out; the app's handler has logged it already.
                return
            log.exception("api request failed method=%s target=%r", request.method, request.target)
            if http.our_state is h11.SEND_RESPONSE:
                bug = errors.BoxvolError("internal error; see boxvold's log")
                await self._send(connection, _error_bytes(http, bug))
            return
        if not answered:
            raise RuntimeError(f"the app did not answer {request.method!r} {request.target!r}")

    async def _send_refusal(self, connection: _Connection, error: errors.BoxvolError) -> None:
        """Answer ``error`` if the connection can still take an answer; then it closes."""
        http = connection.http
        if http.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        log.info("api request refused code=%s message=%s", error.code, error.message)
        try:
            await self._send(connection, _error_bytes(http, error))
            # A lingering close: closing with unread bytes would make the kernel reset the
            # connection, and the client would lose the answer with them. So stop sending,
            # then read and drop what the client still sends, for a moment at most.
            await connection.stream.send_eof()
            with trio.move_on_after(LINGER_SECONDS):
                while await connection.stream.receive_some(_RECEIVE_BYTES):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass

    async def _send(self, connection: _Connection, data: bytes) -> None:
        with trio.fail_after(self.limits.send_timeout):
            await connection.stream.send_all(data)


def _path_of(request: h11.Request) -> str:
    return bytes(request.target).partition(b"?")[0].decode("latin-1")


def _content_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)  # h11 has checked it is digits
    return None


def _too_large(limit: int) -> errors.PayloadTooLarge:
    return errors.PayloadTooLarge(
        f"the request body is larger than {limit} bytes, the most any request takes"
    )


def _asgi_scope(request: h11.Request) -> dict[str, Any]:
    """The ASGI HTTP scope of one request (over a unix socket: no client or server address)."""
    raw_path, _, query = bytes(request.target).partition(b"?")
    # Percent-decoded as UTF-8; bytes that are not UTF-8 become lone surrogates, which the
    # API's text rules refuse (a name, id or query is never looked up with them).
    path = urllib.parse.unquote_to_bytes(raw_path).decode("utf-8", "surrogateescape")
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": request.http_version.decode(),
        "method": request.method.decode("ascii"),
        "scheme": "http",
        "path": path,
        "raw_path": raw_path,
        "query_string": query,
        "root_path": "",
        "headers": [(bytes(name), bytes(value)) for name, value in request.headers],
        "client": None,
        "server": None,
        "extensions": {},
    }


def _error_headers(body: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]


def _error_bytes(http: h11.Connection, error: errors.BoxvolError) -> bytes:
    """An error answer through ``http`` (which then must close)."""
    body = errors.error_json(error).encode()
    return (
        http.send(h11.Response(status_code=errors.http_status(error), headers=_error_headers(body)))
        + http.send(h11.Data(data=body))
        + http.send(h11.EndOfMessage())
    )


def _raw_error_response(error: errors.BoxvolError) -> bytes:
    """An error answer for a connection that is not served (no request was read)."""
    body = errors.error_json(error).encode()
    status = errors.http_status(error)
    head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n".encode()
    for name, value in _error_headers(body):
        head += name + b": " + value + b"\r\n"
    return head + b"\r\n" + body


_REASONS = {503: "Service Unavailable"}


async def _close(stream: trio.SocketStream) -> None:
    with trio.move_on_after(1, shield=True):
        await stream.aclose()
