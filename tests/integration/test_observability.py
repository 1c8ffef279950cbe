"""Configuration, audit and observability of a real boxvold subprocess: a bad config file
stops start-up with one line; SIGHUP applies what can change live and keeps the running
config when the file is broken; every mutating request is one audit line naming the test
process itself; /metrics parses and moves; ``boxvol status`` reads at a glance."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import VENV_BIN, Daemon, boxvol, ok, stop_cleanly
from volumed import errors


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "boxvold.toml"
    path.write_text('log_level = "INFO"\n')
    return path


@pytest.fixture
def configured(home: Path, runtime_dir: Path, config_file: Path) -> Iterator[Daemon]:
    """A boxvold started with the test's own config file."""
    daemon = Daemon(home, runtime_dir)
    daemon.start("--config", str(config_file))
    try:
        yield daemon
    finally:
        stop_cleanly(daemon)


def _boxvold(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "boxvold"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=env,
    )


def test_a_bad_config_stops_start_up_with_one_line(
    home: Path, runtime_dir: Path, config_file: Path
) -> None:
    config_file.write_text('log_level = "LOUD"\n')
    done = _boxvold(
        "--config", str(config_file), "--home", str(home), "--runtime-dir", str(runtime_dir)
    )
    assert done.returncode != 0
    assert done.stderr == (
        f"boxvold: {config_file}: key 'log_level': must be one of DEBUG, INFO, WARNING, ERROR\n"
    )
    assert not (runtime_dir / "boxvold.sock").exists()

    config_file.write_text('home = "/srv"\ncolour = "blue"\n')
    env = {**os.environ, "BOXVOL_CONFIG": str(config_file)}
    done = _boxvold("--home", str(home), "--runtime-dir", str(runtime_dir), env=env)
    assert done.returncode != 0
    assert done.stderr.startswith(f"boxvold: {config_file}: key 'colour': unknown key")
    assert done.stderr.count("\n") == 1

    missing = config_file.with_name("missing.toml")
    done = _boxvold(
        "--config", str(missing), "--home", str(home), "--runtime-dir", str(runtime_dir)
    )
    assert done.returncode != 0
    assert done.stderr.startswith(f"boxvold: {missing}: no such file")


def _wait_for(daemon: Daemon, offset: int, text: str) -> str:
    deadline = time.monotonic() + 10
    while text not in (log := daemon.log_since(offset)):
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{log}"
        time.sleep(0.02)
    return log


def _hup(daemon: Daemon) -> int:
    assert daemon.process is not None
    offset = daemon.log_offset()
    daemon.process.send_signal(signal.SIGHUP)
    return offset


def test_sighup_applies_live_settings_and_logs_the_others(
    configured: Daemon, config_file: Path
) -> None:
    client = configured.client()
    client.create_volume("data")
    config_file.write_text('log_level = "DEBUG"\nexport_cache = "none"\nsocket_group = "root"\n')
    offset = _hup(configured)
    log = _wait_for(configured, offset, "config reloaded")
    assert "config changed key=log_level old='INFO' new='DEBUG'" in log
    assert "config changed key=export_cache old='auto' new='none'" in log
    assert (
        "config changed key=socket_group old=None new='root': takes effect at the next start" in log
    )
    assert "DEBUG volumed.reload: config in force:" in log  # the new level is in force
    export = client.create_export("data")
    assert export["cache"] == "none"  # the new default of exports that name none

    # A broken file changes nothing: logged, and the running config stays.
    config_file.write_text('log_level = "DEBUG"\nexport_cache = "sometimes"\n')
    offset = _hup(configured)
    log = _wait_for(configured, offset, "config reload failed")
    assert (
        f"config reload failed, keeping the running config: boxvold: {config_file}: "
        "key 'export_cache': must be one of auto, none, always" in log
    )
    assert client.create_export("data", consumer="second")["cache"] == "none"
    assert client.health()["status"] == "ok"


def _audit_lines(daemon: Daemon, offset: int) -> list[dict[str, str]]:
    lines = []
    for line in daemon.log_since(offset).splitlines():
        _, found, rest = line.partition(" volumed.audit: audit ")
        if found:
            lines.append(dict(part.split("=", 1) for part in shlex.split(rest)))
    return lines


def test_every_mutating_request_is_one_audit_line_with_the_callers_credentials(
    configured: Daemon,
) -> None:
    client = configured.client()
    offset = configured.log_offset()
    client.create_volume("data")
    export = client.create_export("data")
    client.health()  # not mutating: no line
    with pytest.raises(errors.BoxvolError) as refused:
        client.create_volume("data")
    client.remove_export(export["id"])
    client.remove_volume("data")
    with pytest.raises(errors.BoxvolError):
        client.request("DELETE", "/v1/volumes/x%09%22%20result=ok")
    deadline = time.monotonic() + 5
    while len(lines := _audit_lines(configured, offset)) < 6:
        assert time.monotonic() < deadline, configured.log_since(offset)
        time.sleep(0.02)
    me = {"uid": str(os.getuid()), "gid": str(os.getgid()), "pid": str(os.getpid())}
    for line in lines:
        assert {k: line[k] for k in me} == me
    shape = [(x["op"], x["route"], x["target"], x["status"], x["result"]) for x in lines]
    assert shape == [
        ("POST", "/v1/volumes", "data", "201", "ok"),
        ("POST", "/v1/exports", "data", "201", "ok"),
        ("POST", "/v1/volumes", "data", str(errors.http_status(refused.value)), refused.value.code),
        ("DELETE", "/v1/exports/{export_id}", export["id"], "200", "ok"),
        ("DELETE", "/v1/volumes/{ref:path}", "data", "200", "ok"),
        ("DELETE", "/v1/volumes/{ref:path}", 'x\\x09" result=ok', "422", "invalid_argument"),
    ]
    assert lines[1]["created"] == export["id"]
    log = configured.log_since(offset)
    assert not re.search(r"^result=ok", log, re.MULTILINE)


def _samples(daemon: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    transport = httpx.HTTPTransport(uds=str(daemon.socket))
    with httpx.Client(transport=transport, base_url="http://boxvold") as http:
        answer = http.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def test_metrics_parse_and_move(configured: Daemon) -> None:
    client = configured.client()
    before = _samples(configured)
    assert before["boxvold_volumes", (("kind", "named"),)] == 0
    assert before["boxvold_exports", (("kind", "fuse"), ("state", "serving"))] == 0
    assert before["boxvold_home_free_bytes", ()] > 0
    assert ("boxvold_volume_used_bytes", (("kind", "named"),)) in before
    client.create_volume("data")
    client.create_export("data")
    after = _samples(configured)
    assert after["boxvold_volumes", (("kind", "named"),)] == 1
    assert after["boxvold_exports", (("kind", "fuse"), ("state", "serving"))] == 1
    assert after["boxvold_fuse_server_restarts_total", ()] == 0
    created = (("method", "POST"), ("route", "/v1/volumes"))
    assert after["boxvold_api_request_duration_seconds_count", created] == 1
    scraped = (("method", "GET"), ("route", "/metrics"))
    assert after["boxvold_api_request_duration_seconds_count", scraped] >= 1
    # Routes are templates: a lookup of any name is one series.
    client.get_volume("data")
    with pytest.raises(errors.NotFound):
        client.get_volume("nothing")
    routes = {dict(labels).get("route") for _, labels in _samples(configured)}
    assert "/v1/volumes/{ref:path}" in routes
    assert not any(route and "nothing" in route for route in routes)


def test_status_table_and_json(configured: Daemon) -> None:
    client = configured.client()
    client.create_volume("data")
    client.create_volume()
    client.create_export("data")
    table = ok(configured, "status")
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in table.splitlines())
    assert rows["ITEM"] == "VALUE"
    assert rows["version"].startswith("0.")
    assert rows["volumes"] == "2 (named 1, anonymous 1)"
    assert rows["exports"] == "1 (fuse 1, virtiofs 0; 0 not served)"
    assert rows["restarts"] == "export servers 0, virtiofsd 0"
    assert "free of" not in rows["home free"] and " of " in rows["home free"]
    document = json.loads(ok(configured, "status", "--format", "json"))
    assert document["volumes"] == {"named": 1, "anonymous": 1}
    assert {"kind": "fuse", "state": "serving", "count": 1} in document["exports"]
    assert document["uptime_seconds"] >= 0
    assert document["host"]["free_bytes"] > 0
    assert boxvol(configured, "status", "--format", "yaml").returncode == 2
