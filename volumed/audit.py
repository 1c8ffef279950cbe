"""The audit trail: one log line per mutating API request (POST, PUT, PATCH, DELETE), with who
asked (the peer's uid, gid and pid from SO_PEERCRED, which the server puts into the request's
scope under ``http_server.PEER_CREDENTIALS``), the operation, its target and its result.

Logged by ``AuditMiddleware`` around the whole app, so no route can forget it, to the logger
``volumed.audit``::

    audit uid=0 gid=0 pid=1234 op=POST route=/v1/volumes target=data status=201 result=ok

``target`` is the volume or export the request names (its path parameter, else ``name`` or
``volume`` in the body); ``created`` the id a create answered with; ``result`` is ``ok`` or
the error code of the answer. A value that is not a plain token is double-quoted with
backslash escapes (``printable`` for control and bidi characters), so a hostile volume name
cannot forge a field or a line. Requests the server refuses before the app sees them
(malformed HTTP, a body too large) reach no route and are logged by the server, not here.

Must not import pyfuse3 or libvirt.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

from volumed.http_server import PEER_CREDENTIALS, PeerCredentials
from volumed.metrics import ASGIApp, Receive, Scope, Send
from volumed.text import printable

log = logging.getLogger(__name__)

MUTATING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: Path parameters that name what a request acts on.
_TARGET_PARAMS = ("ref", "export_id")
#: Body fields that name it when the path does not (a create).
_TARGET_FIELDS = ("name", "volume")
#: Answers read for their id or error code; larger ones (none today) are not parsed.
_MAX_PARSED_ANSWER = 64 << 10
_PLAIN = re.compile(r"[A-Za-z0-9._:/@+{}-]+")


def quoted(value: object) -> str:
    """``value`` as one field value: bare if a plain token, else double-quoted with ``"`` and
    ``\\`` escaped and every unsafe character escaped (``printable``)."""
    text = "-" if value is None else str(value)
    if _PLAIN.fullmatch(text):
        return text
    return '"' + printable(text).replace('"', '\\"') + '"'


def audit_line(
    peer: PeerCredentials | None,
    method: str,
    route: str,
    target: str | None,
    status: int,
    result: str,
    created: str | None = None,
) -> str:
    """The one audit line of a request (pure)."""
    who = (
        f"uid={peer.uid} gid={peer.gid} pid={peer.pid}" if peer is not None else "uid=- gid=- pid=-"
    )
    line = (
        f"audit {who} op={quoted(method)} route={quoted(route)} target={quoted(target)} "
        f"status={status} result={quoted(result)}"
    )
    if created is not None:
        line += f" created={quoted(created)}"
    return line


def request_target(path_params: Mapping[str, Any], body: bytes) -> str | None:
    """What a request acts on: its volume or export path parameter, else the ``name`` or
    ``volume`` of its JSON body; None if it names nothing (an anonymous create, a prune)."""
    for key in _TARGET_PARAMS:
        value = path_params.get(key)
        if isinstance(value, str):
            return value
    document = _json_object(body)
    for key in _TARGET_FIELDS:
        value = document.get(key)
        if isinstance(value, str):
            return value
    return None


def answer_fields(status: int, body: bytes) -> tuple[str, str | None]:
    """The result (``ok`` or the error's code) and the created id of an answer."""
    document = _json_object(body)
    if status >= 400:
        error = document.get("error")
        code = error.get("code") if isinstance(error, dict) else None
        return (code if isinstance(code, str) else f"http_{status}"), None
    created = document.get("id") if status == 201 else None
    return "ok", created if isinstance(created, str) else None


def _json_object(body: bytes) -> dict[str, Any]:
    if not body or len(body) > _MAX_PARSED_ANSWER:
        return {}
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    return document if isinstance(document, dict) else {}


class AuditMiddleware:
    """ASGI middleware that logs the audit line of every mutating request (the one place)."""

    def __init__(self, app: ASGIApp, route_of: Callable[[Scope], str]) -> None:
        self.app = app
        #: scope -> route template (``metrics.route_template``).
        self.route_of = route_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in MUTATING_METHODS:
            await self.app(scope, receive, send)
            return
        request_body = bytearray()
        answer = bytearray()
        status = 0

        async def receive_kept() -> MutableMapping[str, Any]:
            message = await receive()
            if message["type"] == "http.request" and len(request_body) <= _MAX_PARSED_ANSWER:
                request_body.extend(message.get("body", b""))
            return message

        async def send_kept(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body" and len(answer) <= _MAX_PARSED_ANSWER:
                answer.extend(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive_kept, send_kept)
        except BaseException:
            if status == 0:
                status, answer[:] = 500, b""
            raise
        finally:
            result, created = answer_fields(status, bytes(answer))
            peer = scope.get("extensions", {}).get(PEER_CREDENTIALS)
            log.info(
                "%s",
                audit_line(
                    peer if isinstance(peer, PeerCredentials) else None,
                    scope["method"],
                    self.route_of(scope),
                    request_target(scope.get("path_params", {}), bytes(request_body)),
                    status,
                    result if status else "no_answer",
                    created,
                ),
            )
