"""boxvold's Prometheus metrics (``GET /metrics``, text format 0.0.4).

Two sources, each read in one place:

- the API's request latency, a histogram by method and route *template*
  (``/v1/volumes/{ref:path}``, never the raw path: one series per volume name would grow
  without bound), observed by ``LatencyMiddleware`` around the whole app;
- the daemon's state at scrape time, a ``Snapshot`` the API gathers (off the loop where it
  touches disk) and hands to ``Metrics.render``; a collector turns it into gauges and
  counters. The same snapshot answers ``GET /v1/system/status``.

A private ``CollectorRegistry``, not prometheus_client's global one: every app (tests build
several in one process) has its own series, and nothing a library registers globally leaks
into the answer. Must not import trio, pyfuse3 or libvirt.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

#: The answer's media type (Prometheus text exposition format 0.0.4).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Latency buckets (seconds): health answers in a millisecond, a create in tens, a df walk or
#: an export's mount can take seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
#: The route label of a request no route matched (404/405; a scanner's paths).
UNMATCHED = "unmatched"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """The daemon's state at one moment, as status and metrics report it."""

    #: Unix time boxvold started.
    started_at: float
    #: Volumes by kind (``named``, ``anonymous``).
    volumes: Mapping[str, int]
    #: Exports by (kind, state).
    exports: Mapping[tuple[str, str], int]
    #: Restarts of export servers (``fuse_server``) and of virtiofsd (``virtiofsd``).
    restarts: Mapping[str, int]
    #: The home's filesystem: total/free bytes and inodes (``store.host_space``).
    host: Mapping[str, int]
    #: The reserve: ``target_bytes``, ``present_bytes``.
    reserve: Mapping[str, int]
    #: Bytes and inodes used by volumes of each kind (the df walk's totals; None if not
    #: measured for this answer).
    used: Mapping[str, Mapping[str, int]] | None = None


def route_template(scope: Scope) -> str:
    """The template of the route that served ``scope`` (set by the router), or UNMATCHED."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


class Metrics:
    """The metrics of one app: its registry, its latency histogram and the last snapshot."""

    registry: CollectorRegistry
    latency: Histogram

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "boxvold_api_request_duration_seconds",
            "Time from a request reaching the API to its answer, by method and route.",
            ("method", "route"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._snapshot: Snapshot | None = None
        self.registry.register(_SnapshotCollector(self))

    def observe(self, method: str, route: str, seconds: float) -> None:
        """Record one request's latency."""
        self.latency.labels(method, route).observe(seconds)

    def render(self, snapshot: Snapshot) -> bytes:
        """The text answer of ``/metrics`` with ``snapshot`` as the state (no I/O)."""
        self._snapshot = snapshot
        return generate_latest(self.registry)

    @property
    def snapshot(self) -> Snapshot | None:
        """The snapshot of the last ``render``."""
        return self._snapshot


class _SnapshotCollector:
    """Gauges and counters from the last snapshot, built when the registry is collected."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        snap = self._metrics.snapshot
        if snap is None:
            return
        start = GaugeMetricFamily("boxvold_start_time_seconds", "When boxvold started (Unix time).")
        start.add_metric([], snap.started_at)
        yield start
        volumes = GaugeMetricFamily("boxvold_volumes", "Volumes by kind.", labels=["kind"])
        for kind, count in sorted(snap.volumes.items()):
            volumes.add_metric([kind], count)
        yield volumes
        exports = GaugeMetricFamily(
            "boxvold_exports", "Exports by kind and state.", labels=["kind", "state"]
        )
        for (kind, state), count in sorted(snap.exports.items()):
            exports.add_metric([kind, state], count)
        yield exports
        for name, what in (
            ("fuse_server", "Restarts of export servers (FUSE views) since boxvold started."),
            ("virtiofsd", "Restarts of virtiofsd processes since boxvold started."),
        ):
            counter = CounterMetricFamily(f"boxvold_{name}_restarts", what)
            counter.add_metric([], snap.restarts.get(name, 0))
            yield counter
        if snap.used is not None:
            used_bytes = GaugeMetricFamily(
                "boxvold_volume_used_bytes", "Bytes used by volumes, by kind.", labels=["kind"]
            )
            used_inodes = GaugeMetricFamily(
                "boxvold_volume_used_inodes", "Inodes used by volumes, by kind.", labels=["kind"]
            )
            for kind, totals in sorted(snap.used.items()):
                used_bytes.add_metric([kind], totals["bytes"])
                used_inodes.add_metric([kind], totals["inodes"])
            yield used_bytes
            yield used_inodes
        for name, source, key, what in (
            ("home_free_bytes", snap.host, "free_bytes", "Bytes free on the home's filesystem."),
            ("home_size_bytes", snap.host, "total_bytes", "Size of the home's filesystem."),
            ("home_free_inodes", snap.host, "free_inodes", "Inodes free on the home's fs."),
            ("home_inodes", snap.host, "total_inodes", "Inodes of the home's filesystem."),
            ("reserve_target_bytes", snap.reserve, "target_bytes", "The reserve's size."),
            ("reserve_present_bytes", snap.reserve, "present_bytes", "The reserve held now."),
        ):
            gauge = GaugeMetricFamily(f"boxvold_{name}", what)
            gauge.add_metric([], source[key])
            yield gauge


class LatencyMiddleware:
    """ASGI middleware that times every HTTP request into ``metrics`` (the one place)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.metrics.observe(
                scope["method"], route_template(scope), time.perf_counter() - started
            )
