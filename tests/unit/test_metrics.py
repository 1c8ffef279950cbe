"""The metrics answer parses as Prometheus text and says what the snapshot says."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from volumed.metrics import Metrics, Snapshot


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_render_states_the_snapshot_and_the_latencies() -> None:
    metrics = Metrics()
    metrics.observe("GET", "/v1/volumes/{ref:path}", 0.003)
    snapshot = Snapshot(
        started_at=1.5e9,
        volumes={"named": 2, "anonymous": 1},
        exports={("fuse", "serving"): 1, ("virtiofs", "unserved"): 0},
        restarts={"fuse_server": 3, "virtiofsd": 1},
        host={"total_bytes": 100, "free_bytes": 40, "total_inodes": 10, "free_inodes": 4},
        reserve={"target_bytes": 8, "present_bytes": 8},
        used={"named": {"bytes": 4096, "inodes": 2}, "anonymous": {"bytes": 0, "inodes": 1}},
    )
    samples = _samples(metrics.render(snapshot).decode())
    assert samples["boxvold_volumes", (("kind", "named"),)] == 2
    assert samples["boxvold_exports", (("kind", "fuse"), ("state", "serving"))] == 1
    assert samples["boxvold_fuse_server_restarts_total", ()] == 3
    assert samples["boxvold_virtiofsd_restarts_total", ()] == 1
    assert samples["boxvold_volume_used_bytes", (("kind", "named"),)] == 4096
    assert samples["boxvold_home_free_bytes", ()] == 40
    assert samples["boxvold_reserve_target_bytes", ()] == 8
    route = (("method", "GET"), ("route", "/v1/volumes/{ref:path}"))
    assert samples["boxvold_api_request_duration_seconds_count", route] == 1


def test_each_app_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.observe("GET", "/v1/health", 0.1)
    assert first.registry is not second.registry
    assert b'route="/v1/health"' not in second.render(
        Snapshot(
            0,
            {},
            {},
            {},
            {"free_bytes": 0, "total_bytes": 0, "free_inodes": 0, "total_inodes": 0},
            {"target_bytes": 0, "present_bytes": 0},
        )
    )
