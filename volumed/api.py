"""The HTTP/JSON API (an ASGI app) over a VolumeStore.

Handlers are thin: they check the request, run the store's blocking work in a worker
thread under a named limiter, and shape the answer. Errors are mapped to HTTP once, here,
through ``volumed.errors.http_status``. Must not import libvirt or pyfuse3.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Literal, TypeVar

import trio
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from volumed import API_VERSION, __version__, errors
from volumed.archive_jobs import ArchiveJobs
from volumed.audit import AuditMiddleware
from volumed.export_manager import ExportManager
from volumed.exports import ExportPolicy, VirtiofsTarget
from volumed.gc import reclaimed_bytes
from volumed.http_server import PASSED_FD, PassedFd, ServerLimits, server_bounds_text
from volumed.metrics import CONTENT_TYPE, LatencyMiddleware, Metrics, Snapshot, route_template
from volumed.model import KINDS, ListFilter, Volume
from volumed.names import MAX_LABEL_FILTERS, parse_label
from volumed.schemas import (
    HOST_PATH_FIELDS,
    ArchiveReport,
    CollectGarbage,
    CreateExport,
    CreateVolume,
    DiskUsage,
    ErrorAnswer,
    ExportIdText,
    ExportList,
    ExportOut,
    GcAnswer,
    Health,
    LabelFilterText,
    NameFilterText,
    PruneAnswer,
    PruneVolumes,
    QueryBool,
    ReferenceText,
    RemoveAnswer,
    ReserveReleased,
    ResizeVolume,
    RestoreReport,
    RestoreVolume,
    SystemStatus,
    Version,
    VirtiofsConsumer,
    VolumeList,
    VolumeOut,
)
from volumed.store import ReconcileAction, Usage, VolumeState, VolumeStore, utc_now
from volumed.text import printable, printable_repr

log = logging.getLogger(__name__)
T = TypeVar("T")

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorAnswer} for status in (400, 404, 408, 409, 413, 422, 500, 503)
}


class Service:
    """What the API serves: the store, the limiters its blocking work runs under, and the
    start-up reconciliation report."""

    store: VolumeStore
    #: One writer: creates, removals and prunes run one at a time, like the registry's lock.
    writer: trio.CapacityLimiter
    #: Reads (lookups, listings, usage walks) run beside each other.
    reader: trio.CapacityLimiter
    reconciled: list[ReconcileAction]
    exports: ExportManager
    #: Archives and restores: each runs in a worker process with the client's pipe.
    archives: ArchiveJobs
    #: The last df, shared by the requests that come while it is fresh or being measured.
    usage: UsageCache
    #: The app's Prometheus metrics (``GET /metrics``).
    metrics: Metrics
    #: When the service started: Unix time (reported) and trio-independent monotonic time
    #: (for the uptime).
    started_at: float
    _started_monotonic: float

    def __init__(
        self,
        store: VolumeStore,
        reconciled: list[ReconcileAction],
        exports: Callable[[trio.CapacityLimiter], ExportManager],
    ) -> None:
        self.store = store
        self.writer = trio.CapacityLimiter(1)
        self.reader = trio.CapacityLimiter(4)
        self.reconciled = reconciled
        self.exports = exports(self.writer)
        self.archives = ArchiveJobs(store, self.exports, self.writer)
        self.usage = UsageCache(functools.partial(_disk_usage, store))
        self.metrics = Metrics()
        self.started_at = time.time()
        self._started_monotonic = time.monotonic()

    @property
    def uptime(self) -> float:
        """Seconds since the service started."""
        return time.monotonic() - self._started_monotonic

    async def snapshot(self, *, usage: bool) -> Snapshot:
        """The daemon's state now, for status and metrics; with ``usage``, the bytes and
        inodes volumes use (the df walk, shared and reused for 2 s: ``UsageCache``). The
        registry and statvfs are read in worker threads: the loop never touches the disk."""
        used: dict[str, Any] | None = None
        if usage:
            by_kind = (await self.usage.get())["by_kind"]
            used = {kind: by_kind[kind] for kind in KINDS}
        counts = await self.read(self.store.registry.count_by_kind)
        space = await self.read(_space, self.store)
        return Snapshot(
            started_at=self.started_at,
            volumes={kind: counts.get(kind, 0) for kind in KINDS},
            exports=self.exports.counts(),
            restarts=self.exports.restarts(),
            host=space["host"],
            reserve=space["reserve"],
            used=used,
        )

    async def write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a mutating store call in a worker thread."""
        return await trio.to_thread.run_sync(
            functools.partial(fn, *args, **kwargs), limiter=self.writer
        )

    async def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a reading store call in a worker thread."""
        return await trio.to_thread.run_sync(
            functools.partial(fn, *args, **kwargs), limiter=self.reader
        )


#: Seconds a df answer is reused: a walk of every volume can take seconds, and twenty callers
#: at once must not mean twenty walks (or twenty reader threads that health waits behind).
USAGE_MAX_AGE = 2.0


class UsageCache:
    """df answers measured at most once per USAGE_MAX_AGE, one walk at a time.

    A request that comes while a walk runs waits for that walk; one that comes within
    USAGE_MAX_AGE of the last walk gets its answer, which says when it was measured. The walk
    runs in its own worker thread (limiter of one), never in the readers' pool.
    """

    def __init__(self, measure: Callable[[], dict[str, Any]]) -> None:
        self._measure = measure
        self._limiter = trio.CapacityLimiter(1)
        self._answer: dict[str, Any] | None = None
        self._taken = -float("inf")
        self._running: trio.Event | None = None

    async def get(self) -> dict[str, Any]:
        """A df answer no older than USAGE_MAX_AGE when the call began."""
        asked = trio.current_time()
        while True:
            if self._answer is not None and self._taken >= asked - USAGE_MAX_AGE:
                return self._answer
            if self._running is not None:
                await self._running.wait()
                if self._answer is not None and self._taken >= asked - USAGE_MAX_AGE:
                    return self._answer
                continue
            self._running = trio.Event()
            try:
                taken = trio.current_time()
                answer = await trio.to_thread.run_sync(self._measure, limiter=self._limiter)
                answer["measured_at"] = utc_now()
                self._answer, self._taken = answer, taken
                return answer
            finally:
                self._running.set()
                self._running = None


def volume_json(state: VolumeState) -> dict[str, Any]:
    """The API's view of a volume (matches ``VolumeOut``)."""
    volume = state.volume
    return {
        "id": volume.id,
        "name": volume.name,
        "kind": volume.kind,
        "created_at": volume.created_at,
        "labels": volume.labels,
        "size_bytes": volume.size_bytes,
        "inode_limit": volume.inode_limit,
        "consumer": volume.consumer,
        "backing": volume.backing,
        "in_use": state.in_use,
        "exports": state.exports,
    }


def usage_json(store: VolumeStore, volume: Volume, usage: Usage) -> dict[str, Any]:
    """A volume's measured usage (matches ``UsageOut``)."""
    image = usage.image
    return {
        "bytes": usage.bytes,
        "inodes": usage.inodes,
        "image": None
        if image is None
        else {
            "file": os.path.relpath(store.images.path(volume), store.layout.home),
            "size_bytes": image.size_bytes,
            "used_bytes": image.used_bytes,
            "total_inodes": image.total_inodes,
            "used_inodes": image.used_inodes,
            "allocated_bytes": image.allocated_bytes,
        },
    }


def _inspected(store: VolumeStore, ref: str) -> dict[str, Any]:
    """Blocking: one volume with its usage measured."""
    state = store.state(ref)
    return {
        **volume_json(state),
        "usage": usage_json(store, state.volume, store.usage(state.volume)),
    }


def _removed_json(volume: Volume) -> dict[str, Any]:
    return {"id": volume.id, "name": volume.name, "kind": volume.kind}


def json_response(body: Any, status: int = 200) -> Response:
    """A JSON answer encoded once, without re-validating it (listings can be large)."""
    return Response(
        content=json.dumps(body, separators=(",", ":")).encode(),
        status_code=status,
        media_type="application/json",
    )


def error_response(request: Request, error: errors.BoxvolError) -> Response:
    """The one place a domain error becomes an HTTP answer, and the one log line of a
    failed request (a 5xx at ERROR, a refusal at INFO)."""
    status = errors.http_status(error)
    log.log(
        logging.ERROR if status >= 500 else logging.INFO,
        "api request failed method=%s path=%s status=%d code=%s message=%s",
        request.method,
        printable(request.url.path),
        status,
        error.code,
        printable(error.message),
    )
    return json_response(errors.error_body(error), status)


def check_query(request: Request, allowed: Iterable[str]) -> None:
    """Refuse unknown query parameters (and host-path-like ones by name)."""
    allowed = set(allowed)
    for key in request.query_params:
        if key.lower() in HOST_PATH_FIELDS:
            raise errors.HostPathRefused(
                f"parameter {key!r} looks like a host path, and boxvol never takes one: "
                "volumes are referenced by name or id"
            )
        if key not in allowed:
            raise errors.InvalidArgument(
                f"unknown query parameter {key!r}; accepted here: "
                + (", ".join(sorted(allowed)) or "none")
            )


def _validation_error(exc: RequestValidationError) -> errors.BoxvolError:
    details = exc.errors()
    for detail in details:
        if detail.get("type") == "host_path_refused":
            return errors.HostPathRefused(str(detail["msg"]))
    first = details[0] if details else {"loc": (), "msg": "malformed request"}
    field = _field_name(first.get("loc", ()))
    kind = first.get("type")
    if kind == "extra_forbidden":
        return errors.InvalidArgument(
            f"unknown field {field!r}; see docs/openapi.json for the fields this request takes"
        )
    if kind == "json_invalid":
        return errors.InvalidArgument("the request body is not valid JSON")
    if kind in ("model_attributes_type", "dict_type") and not field:
        return errors.InvalidArgument(
            "the request body must be a JSON object sent with Content-Type: application/json"
        )
    if kind == "missing":
        return errors.InvalidArgument(f"missing field {field!r}; see docs/openapi.json")
    if not field:
        return errors.InvalidArgument(f"invalid request: {first.get('msg')}")
    shown = printable_repr(first.get("input"))
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return errors.InvalidArgument(f"invalid {field} {shown}: {first.get('msg')}")


def _field_name(location: Iterable[object]) -> str:
    """``owner.uid`` from pydantic's location of an error (``body``/``query``/``path`` and the
    names pydantic gives union members, such as ``str`` or ``function-after[...]``, left out)."""
    parts: list[str] = []
    for part in location:
        text = str(part)
        if text in ("body", "query", "path"):
            continue
        if not text.isidentifier() or text in ("str", "int", "bool", "dict", "list"):
            break
        if text[:1].isupper() and not parts:
            continue  # a model's name before its first field
        parts.append(text)
    return ".".join(parts)


def _http_exception_error(request: Request, exc: StarletteHTTPException) -> errors.BoxvolError:
    """The domain error an HTTP exception from routing or body parsing stands for."""
    if exc.status_code in (404, 405):
        message = (
            f"no endpoint {request.method} {printable(request.url.path)}; see docs/openapi.json"
        )
        if exc.status_code == 405:
            return errors.MethodNotAllowed(message)
        return errors.NotFound(message)
    if exc.status_code == 400:
        # FastAPI's answer to a body json.loads refused: not UTF-8, nested too deep, an
        # integer of thousands of digits. The API documents these as 422.
        return errors.InvalidArgument(
            "the request body is not valid JSON: it must be UTF-8, nest at most a few hundred "
            "levels, and hold integers of at most 4300 digits"
        )
    return errors.InvalidArgument(f"the request was refused: {exc.detail}")


def _query_bool(value: QueryBool | None) -> bool | None:
    return None if value is None else value == "true"


def _parse_filter(
    kind: str | None,
    labels: list[str],
    name: str | None,
    in_use: bool | None,
    dangling: bool | None,
) -> ListFilter:
    if in_use is not None and dangling is not None and in_use == dangling:
        raise errors.InvalidArgument("in_use and dangling contradict each other; give one")
    wanted_in_use = in_use if in_use is not None else (None if dangling is None else not dangling)
    label_pairs = []
    for text in labels:
        key, value = parse_label(text)
        has_value = "=" in text
        label_pairs.append((key, value if has_value else None))
    return ListFilter(
        kind=kind,  # type: ignore[arg-type]
        labels=tuple(label_pairs),
        name_contains=name,
        in_use=wanted_in_use,
    )


def create_app(service: Service) -> FastAPI:
    """The ASGI application serving ``service``."""
    app = FastAPI(
        title="boxvold",
        version=__version__,
        description=(
            "Managed volumes for hosts that run sandboxed VMs. Volumes are referenced by "
            "name or id; no request takes a host path. " + server_bounds_text(ServerLimits())
        ),
        openapi_url=f"/{API_VERSION}/openapi.json",
        docs_url=None,
        redoc_url=None,
        responses=_ERROR_RESPONSES,
    )
    store = service.store
    # Added last runs first: latency covers the audit line too. Both see the route the
    # router chose (scope["route"]) once the app returns.
    app.add_middleware(AuditMiddleware, route_of=route_template)
    app.add_middleware(LatencyMiddleware, metrics=service.metrics)

    @app.exception_handler(errors.BoxvolError)
    async def _domain_error(request: Request, exc: errors.BoxvolError) -> Response:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> Response:
        return error_response(request, _validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(request, _http_exception_error(request, exc))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> Response:
        # The one traceback of a bug; the server does not log it again.
        log.exception(
            "api request failed method=%s path=%s: a bug", request.method, request.url.path
        )
        return json_response(
            errors.error_body(errors.BoxvolError(f"internal error: {exc!r}; see boxvold's log")),
            500,
        )

    @app.post("/v1/volumes", status_code=201, response_model=VolumeOut)
    async def create_volume(request: Request, body: CreateVolume | None = None) -> Response:
        """Create a named volume (``name`` given) or an anonymous one (empty body)."""
        check_query(request, ())
        body = body or CreateVolume()
        volume = await service.write(
            store.create,
            name=body.name,
            labels=body.labels,
            size_bytes=body.size_bytes,
            inode_limit=body.inode_limit,
            consumer=body.consumer,
        )
        return json_response(volume_json(VolumeState(volume, 0)), 201)

    @app.get("/v1/volumes", response_model=VolumeList)
    async def list_volumes(
        request: Request,
        kind: Literal["named", "anonymous"] | None = None,
        label: Annotated[list[LabelFilterText], Query(max_length=MAX_LABEL_FILTERS)] = [],  # noqa: B006
        name: NameFilterText | None = None,
        in_use: QueryBool | None = None,
        dangling: QueryBool | None = None,
    ) -> Response:
        """List volumes; every given filter must hold (``label`` is KEY or KEY=VALUE)."""
        check_query(request, ("kind", "label", "name", "in_use", "dangling"))
        where = _parse_filter(kind, label, name, _query_bool(in_use), _query_bool(dangling))
        listing = await service.read(store.list_json, where)
        return Response(
            content=b'{"volumes":' + listing.encode() + b"}", media_type="application/json"
        )

    @app.get("/v1/volumes/{ref:path}", response_model=VolumeOut)
    async def get_volume(request: Request, ref: ReferenceText) -> Response:
        """One volume by name, id or unique id prefix, with what it takes now."""
        check_query(request, ())
        return json_response(await service.read(_inspected, store, ref))

    @app.post("/v1/volumes/{ref}/resize", response_model=VolumeOut)
    async def resize_volume(request: Request, ref: ReferenceText, body: ResizeVolume) -> Response:
        """Grow a sized volume's cap (never shrink; refused while it is exported)."""
        check_query(request, ())
        state = await service.write(store.resize, ref, body.size_bytes)
        return json_response(volume_json(state))

    @app.delete("/v1/volumes/{ref:path}", response_model=RemoveAnswer)
    async def remove_volume(
        request: Request, ref: ReferenceText, force: QueryBool = "false"
    ) -> Response:
        """Remove a volume and its data; refused (409) while in use unless ``force``."""
        check_query(request, ("force",))
        volume = await service.exports.remove_volume(ref, force=force == "true")
        return json_response({"removed": _removed_json(volume)})

    @app.post("/v1/volumes/prune", response_model=PruneAnswer)
    async def prune_volumes(request: Request, body: PruneVolumes | None = None) -> Response:
        """Remove unused anonymous volumes, or every unused volume with ``all``."""
        check_query(request, ())
        body = body or PruneVolumes()
        removed, reclaimed = await service.write(store.prune, all_volumes=body.all)
        return json_response(
            {"removed": [_removed_json(v) for v in removed], "reclaimed_bytes": reclaimed}
        )

    @app.post("/v1/exports", status_code=201, response_model=ExportOut)
    async def create_export(request: Request, body: CreateExport) -> Response:
        """Export a volume: a FUSE view, or a virtio-fs socket for one guest (whose
        virtiofsd boxvold spawns, supervises and stops). The volume is then in use."""
        check_query(request, ())
        owner = None if body.owner is None else (body.owner.uid, body.owner.gid)
        cache = body.cache or service.exports.default_cache
        policy = ExportPolicy(read_only=body.read_only, owner=owner, cache=cache)
        target, label = _export_target(body)
        live = await service.exports.create(body.volume, policy, label, target)
        return json_response(live.to_json(), 201)

    @app.get("/v1/exports", response_model=ExportList)
    async def list_exports(request: Request, volume: ReferenceText | None = None) -> Response:
        """Live exports, of one volume (name or id) if ``volume`` is given."""
        check_query(request, ("volume",))
        volume_id = None if volume is None else (await service.read(store.resolve, volume)).id
        exports = service.exports.list(volume_id)
        return json_response({"exports": [live.to_json() for live in exports]})

    @app.get("/v1/exports/{export_id}", response_model=ExportOut)
    async def get_export(request: Request, export_id: ExportIdText) -> Response:
        """One live export."""
        check_query(request, ())
        return json_response(service.exports.get(export_id).to_json())

    @app.delete("/v1/exports/{export_id}", response_model=ExportOut)
    async def remove_export(request: Request, export_id: ExportIdText) -> Response:
        """Tear an export down: its directory vanishes, open files on it get errors."""
        check_query(request, ())
        return json_response((await service.exports.remove(export_id)).to_json())

    @app.get("/v1/system/df", response_model=DiskUsage)
    async def disk_usage(request: Request) -> Response:
        """Bytes and inodes per volume, totals, and room left on the host."""
        check_query(request, ())
        volumes = await service.usage.get()
        # The reserve and host space are two stats: always fresh, unlike the walk.
        return json_response({**volumes, **await service.read(_space, store)})

    @app.post("/v1/system/gc", response_model=GcAnswer)
    async def collect_garbage(request: Request, body: CollectGarbage | None = None) -> Response:
        """Find what boxvol created and lost track of and reclaim it (``dry_run``: only
        list it). Orphan data is quarantined, never deleted; nothing live is touched."""
        check_query(request, ())
        dry_run = (body or CollectGarbage()).dry_run
        findings = await service.exports.collect_garbage(dry_run=dry_run)
        return json_response(
            {
                "dry_run": dry_run,
                "findings": [f.to_json() for f in findings],
                "reclaimed_bytes": reclaimed_bytes(findings),
            }
        )

    @app.post("/v1/system/reserve-release", response_model=ReserveReleased)
    async def reserve_release(request: Request) -> Response:
        """Unlink boxvold's reserve so removals can run on a full disk; it comes back once
        the host has twice its size free (after a removal, or at the next start)."""
        check_query(request, ())
        released = await service.write(store.reserve.release)
        state = await service.read(store.reserve.state)
        return json_response({"released_bytes": released, "reserve": dataclasses.asdict(state)})

    _add_archive_routes(app, service)

    @app.get("/v1/health", response_model=Health)
    async def health(request: Request) -> Response:
        """Liveness, the volume count and what start-up reconciliation repaired."""
        check_query(request, ())
        # Inline (the count is kept in memory): health answers while listings and usage
        # walks queue, without waiting for a thread or the database.
        count = store.registry.count()
        return json_response(
            {
                "status": "ok",
                "volumes": count,
                "reconciled": [dataclasses.asdict(a) for a in service.reconciled],
            }
        )

    @app.get("/v1/system/status", response_model=SystemStatus)
    async def system_status(request: Request) -> Response:
        """Version, uptime, volumes by kind, exports by kind and state, restarts, room on
        the home's filesystem and the reserve: ``boxvol status``. Cheap: no usage walk."""
        check_query(request, ())
        return json_response(status_json(service, await service.snapshot(usage=False)))

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        """Prometheus metrics (text format 0.0.4); docs/api.md lists them."""
        check_query(request, ())
        snapshot = await service.snapshot(usage=True)
        return Response(content=service.metrics.render(snapshot), media_type=CONTENT_TYPE)

    @app.get("/v1/version", response_model=Version)
    async def version(request: Request) -> Response:
        """Daemon and API versions."""
        check_query(request, ())
        return json_response({"version": __version__, "api_version": API_VERSION})

    return app


#: The routes a request may pass a file descriptor to (``takes_passed_fd``).
_FD_ROUTE = re.compile(r"/v1/volumes/[^/]+/(archive|restore)")


def takes_passed_fd(method: str, path: str) -> bool:
    """Whether a request may carry a file descriptor (SCM_RIGHTS on the API socket): only
    archive and restore, whose data flows through it, never through boxvold."""
    return method == "POST" and _FD_ROUTE.fullmatch(path) is not None


def _take_passed_fd(request: Request, what: str) -> int:
    """The fd passed with ``request``, now the caller's to close; MalformedRequest if none."""
    passed = request.scope.get("extensions", {}).get(PASSED_FD)
    if not isinstance(passed, PassedFd):
        raise errors.MalformedRequest(
            f"{what} needs a pipe passed with the request (one file descriptor sent with "
            "SCM_RIGHTS on the API socket, as 'boxvol archive' and 'boxvol restore' do); "
            "none came"
        )
    return passed.take()


def _add_archive_routes(app: FastAPI, service: Service) -> None:
    """Archive and restore (docs/archives.md): the data moves through the pipe passed with
    the request, between the client and a worker process; boxvold only waits."""

    @app.post("/v1/volumes/{ref}/archive", response_model=ArchiveReport)
    async def archive_volume(request: Request, ref: ReferenceText) -> Response:
        """Write the volume's content as a PAX tar stream to the pipe passed with the
        request (SCM_RIGHTS); answered once the archive is complete."""
        check_query(request, ())
        fd = _take_passed_fd(request, "an archive")
        return json_response(await service.archives.archive(ref, fd))

    @app.post("/v1/volumes/{ref}/restore", response_model=RestoreReport)
    async def restore_volume(
        request: Request, ref: ReferenceText, body: RestoreVolume | None = None
    ) -> Response:
        """Replace the volume's content with the tar stream read from the pipe passed with
        the request (SCM_RIGHTS), all or nothing. A missing named volume is created (and
        removed again if the restore fails); a non-empty one needs ``force``; one with live
        exports is refused."""
        check_query(request, ())
        body = body or RestoreVolume()
        fd = _take_passed_fd(request, "a restore")
        return json_response(await service.archives.restore(ref, fd, force=body.force))


def _export_target(body: CreateExport) -> tuple[VirtiofsTarget | None, str | None]:
    """The virtio-fs target and the free-form consumer label a create asks for."""
    if body.kind == "fuse":
        if isinstance(body.consumer, VirtiofsConsumer) or body.via is not None:
            raise errors.InvalidArgument(
                "a fuse export takes a free-form consumer label and no 'via'; "
                "use kind 'virtiofs' to export to a VM"
            )
        return None, body.consumer
    if not isinstance(body.consumer, VirtiofsConsumer):
        raise errors.InvalidArgument(
            'a virtiofs export needs "consumer": {"vm": DOMAIN, "tag": TAG} naming the guest'
        )
    # Read-only is enforced by the FUSE view: libvirt 9.0 ignores <readonly/> for an
    # external virtiofsd, and a guest can remount its share read-write.
    via = "fuse" if body.read_only else (body.via or "direct")
    if body.owner is not None and via != "fuse":
        raise errors.InvalidArgument(
            "an ownership mapping is a FUSE view policy: give via 'fuse' with 'owner'"
        )
    consumer = body.consumer
    return VirtiofsTarget(
        vm=consumer.vm,
        tag=consumer.tag,
        via=via,
        backend=consumer.backend,
        instance=consumer.instance,
        guest_path=consumer.guest_path,
    ), None


def _disk_usage(store: VolumeStore) -> dict[str, Any]:
    """Blocking: walks every volume."""
    rows = []
    for state in store.list_volumes():
        volume = state.volume
        usage = store.usage(volume)
        image = usage.image
        rows.append(
            {
                "id": volume.id,
                "name": volume.name,
                "kind": volume.kind,
                "bytes": usage.bytes,
                "inodes": usage.inodes,
                "in_use": state.in_use,
                "backing": volume.backing,
                "cap_bytes": volume.size_bytes if volume.backing == "image" else None,
                "cap_inodes": image.total_inodes if image is not None else None,
                "allocated_bytes": image.allocated_bytes if image is not None else usage.bytes,
            }
        )
    return {
        "volumes": rows,
        "totals": _totals(rows),
        "by_kind": {kind: _totals([r for r in rows if r["kind"] == kind]) for kind in KINDS},
        **_space(store),
    }


def status_json(service: Service, snapshot: Snapshot) -> dict[str, Any]:
    """The answer of ``/v1/system/status`` (matches ``SystemStatus``)."""
    return {
        "version": __version__,
        "api_version": API_VERSION,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(snapshot.started_at)),
        "uptime_seconds": round(service.uptime, 3),
        "volumes": dict(snapshot.volumes),
        "exports": [
            {"kind": kind, "state": state, "count": count}
            for (kind, state), count in sorted(snapshot.exports.items())
        ],
        "restarts": dict(snapshot.restarts),
        "host": dict(snapshot.host),
        "reserve": dict(snapshot.reserve),
    }


def _space(store: VolumeStore) -> dict[str, Any]:
    """Blocking: the reserve and the room left on the home's filesystem."""
    return {"reserve": dataclasses.asdict(store.reserve.state()), "host": store.host_space()}


def _totals(rows: list[dict[str, Any]]) -> dict[str, int]:
    return {
        "volumes": len(rows),
        "bytes": sum(row["bytes"] for row in rows),
        "inodes": sum(row["inodes"] for row in rows),
    }


def openapi_document(app: FastAPI) -> str:
    """The OpenAPI document as checked into docs/openapi.json."""
    return json.dumps(app.openapi(), indent=2, sort_keys=True) + "\n"


__all__ = ["DiskUsage", "Service", "create_app", "openapi_document"]
