"""The real ``boxvol`` binary against a real boxvold subprocess."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from tests.helpers import VENV_BIN, Daemon, boxvol, ok


def test_create_ls_inspect_rm(daemon: Daemon) -> None:
    assert (
        ok(daemon, "create", "data", "--label", "team=db", "--size", "64M", "--inodes", "5000")
        == "data\n"
    )
    anon_id = ok(daemon, "create").strip()
    assert len(anon_id) == 26
    assert (daemon.home / "volumes" / "anonymous" / anon_id).is_dir()

    table = ok(daemon, "ls").splitlines()
    assert table[0].split() == ["VOLUME", "ID", "NAME", "KIND", "IN", "USE", "CREATED", "LABELS"]
    assert any(" data " in line and "team=db" in line for line in table[1:])
    assert ok(daemon, "ls", "-q") == f"data\n{anon_id}\n"
    assert ok(daemon, "ls", "-q", "--filter", "kind=anonymous") == f"{anon_id}\n"
    assert ok(daemon, "ls", "-q", "--filter", "label=team=db") == "data\n"
    assert ok(daemon, "ls", "-q", "--filter", "dangling=true") == f"data\n{anon_id}\n"
    assert ok(daemon, "ls", "-q", "--filter", "in-use=true") == ""
    listed = json.loads(ok(daemon, "ls", "--format", "json"))
    assert [v["name"] for v in listed] == ["data", None]

    inspected = json.loads(ok(daemon, "inspect", "data", anon_id))
    assert inspected[0]["size_bytes"] == 64 << 20
    assert inspected[0]["inode_limit"] == 5000
    assert inspected[0]["labels"] == {"team": "db"}
    assert inspected[1]["id"] == anon_id

    partial = boxvol(daemon, "inspect", "data", "missing")
    assert partial.returncode == 1
    assert [v["name"] for v in json.loads(partial.stdout)] == ["data"]
    assert "no volume named 'missing'" in partial.stderr

    assert ok(daemon, "rm", "data", anon_id) == f"data\n{anon_id}\n"
    assert ok(daemon, "ls", "-q") == ""
    again = boxvol(daemon, "rm", "data")
    assert again.returncode == 1
    assert "boxvol ls" in again.stderr


def test_conflicts_are_failures_not_usage_errors(daemon: Daemon) -> None:
    ok(daemon, "create", "data")
    result = boxvol(daemon, "create", "data")
    assert result.returncode == 1
    assert "already exists" in result.stderr


def test_usage_errors_exit_2_and_change_nothing(daemon: Daemon) -> None:
    for args, needle in [
        (("create", "../escape"), "invalid volume name"),
        (("create", "01HZX4J3M8ZKQ6W9V2T7N5R1BC"), "shaped like a volume id"),
        (("create", "x", "--size", "lots"), "invalid size"),
        (("create", "x", "--inodes", "-1"), "inode limit"),
        (("create", "x", "--label", "bad key=v"), "label key"),
        (("ls", "--filter", "colour=red"), "invalid filter"),
        (("ls", "--filter", "dangling=maybe"), "true or false"),
        (("ls", "--format", "xml"), "invalid choice"),
        (("ls", "--filter", "kind=bogus"), "invalid kind"),
        (("ls", "--filter", "label=bad key"), "label key"),
        (("frobnicate",), "invalid choice"),
        ((), "required"),
    ]:
        result = boxvol(daemon, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert needle in result.stderr, (args, result.stderr)
    assert ok(daemon, "ls", "-q") == ""
    assert os.listdir(daemon.home / "volumes" / "named") == []


def test_prune_asks_first(daemon: Daemon) -> None:
    ok(daemon, "create", "keep")
    anon_id = ok(daemon, "create").strip()
    declined = boxvol(daemon, "prune", stdin="n\n")
    assert declined.returncode == 0
    assert "nothing removed" in declined.stderr
    assert anon_id in ok(daemon, "ls", "-q")
    accepted = boxvol(daemon, "prune", stdin="y\n")
    assert accepted.returncode == 0, accepted.stderr
    assert anon_id in accepted.stdout
    assert "Total reclaimed space" in accepted.stdout
    assert ok(daemon, "ls", "-q") == "keep\n"
    assert "keep" in ok(daemon, "prune", "--all", "-f")
    assert ok(daemon, "ls", "-q") == ""


def test_df(daemon: Daemon) -> None:
    ok(daemon, "create", "data")
    ok(daemon, "create", "capped", "--size", "64M", "--inodes", "2000")
    ok(daemon, "create")
    (daemon.home / "volumes" / "named" / "data" / "blob").write_bytes(b"x" * (3 << 20))
    (daemon.home / "volumes" / "named" / "capped" / "blob").write_bytes(b"x" * (5 << 20))
    lines = ok(daemon, "df").splitlines()
    assert lines[0].split() == [
        "VOLUME",
        "KIND",
        "IN",
        "USE",
        "SIZE",
        "CAP",
        "INODES",
        "INODE",
        "CAP",
    ]
    row = next(line for line in lines if line.startswith("data"))
    assert row.split()[-4:] == ["3.0M", "-", "2", "-"]
    capped = next(line for line in lines if line.startswith("capped")).split()
    assert capped[3:5] == ["5.0M", "64M"]
    assert abs(int(capped[6]) - 2000) < 100  # ext4 rounds it to whole inode-table blocks
    assert any(line.startswith("TOTAL named") and "2 volumes" in line for line in lines)
    assert any(line.startswith("TOTAL anonymous") and "1 volumes" in line for line in lines)
    assert any(line.startswith("Host:") and "free of" in line for line in lines)
    assert any(line.startswith("Reserve: 1.0M held") for line in lines)
    usage = json.loads(ok(daemon, "df", "--format", "json"))
    assert usage["by_kind"]["named"]["volumes"] == 2
    assert usage["reserve"] == {"target_bytes": 1 << 20, "present_bytes": 1 << 20}


def test_daemon_not_running_says_how_to_start(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOXVOL_")}
    env["BOXVOL_SOCKET"] = str(tmp_path / "boxvold.sock")
    result = boxvol(None, "ls", env=env)
    assert result.returncode == 1
    assert "boxvold is not running" in result.stderr
    assert "boxvol serve" in result.stderr


def test_socket_found_through_runtime_dir(daemon: Daemon) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOXVOL_")}
    env["BOXVOL_RUNTIME_DIR"] = str(daemon.runtime_dir)
    result = boxvol(None, "version", env=env)
    assert result.returncode == 0, result.stderr
    assert "boxvold 0.1.0 (API v1)" in result.stdout


def test_serve_runs_the_daemon_in_the_foreground(home: Path, runtime_dir: Path) -> None:
    process = subprocess.Popen(
        [str(VENV_BIN / "boxvol"), "serve", "--home", str(home), "--runtime-dir", str(runtime_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    socket_path = runtime_dir / "boxvold.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOXVOL_")}
    env["BOXVOL_SOCKET"] = str(socket_path)
    try:
        deadline = time.monotonic() + 30
        while boxvol(None, "ls", "-q", env=env).returncode != 0:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert boxvol(None, "create", "x", env=env).returncode == 0
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "boxvold serving" in output
    assert "boxvold stopping signal=SIGTERM" in output
    assert not socket_path.exists()
    assert (home / "volumes" / "named" / "x").is_dir()


def test_export_commands(daemon: Daemon) -> None:
    ok(daemon, "create", "data")
    export_id, mountpoint = ok(
        daemon,
        "export",
        "create",
        "data",
        "--read-only",
        "--owner",
        "1000:1000",
        "--consumer",
        "ci",
    ).split()
    assert Path(mountpoint).is_dir()
    table = ok(daemon, "export", "ls").splitlines()
    assert table[0].split()[:3] == ["EXPORT", "ID", "VOLUME"]
    assert export_id in table[1] and "ro" in table[1].split() and "1000:1000" in table[1]
    assert ok(daemon, "export", "ls", "-q", "--volume", "data") == export_id + "\n"
    inspected = json.loads(ok(daemon, "export", "inspect", export_id))
    assert inspected[0]["owner"] == {"uid": 1000, "gid": 1000}
    assert inspected[0]["mountpoint"] == mountpoint
    in_use = boxvol(daemon, "rm", "data")
    assert in_use.returncode == 1
    assert "boxvol rm -f data" in in_use.stderr
    assert ok(daemon, "export", "rm", export_id) == export_id + "\n"
    assert not Path(mountpoint).exists()
    bad_owner = boxvol(daemon, "export", "create", "data", "--owner", "me")
    assert bad_owner.returncode == 2
    assert "UID:GID" in bad_owner.stderr
    missing = boxvol(daemon, "export", "rm", export_id)
    assert missing.returncode == 1
    assert "boxvol export ls" in missing.stderr
    ok(daemon, "rm", "data")


def test_no_control_character_reaches_the_terminal_raw(daemon: Daemon) -> None:
    ok(daemon, "create", "data")
    # A registry written before labels were checked as strictly as now: the CLI still must
    # not hand an escape sequence or a bidi override to the terminal.
    db = sqlite3.connect(daemon.home / "registry.sqlite3")
    with db:
        db.execute(
            "UPDATE volumes SET labels = ? WHERE name = 'data'",
            (json.dumps({"note": "\x1b]0;owned\x07\u202eevil\x9b"}),),
        )
    db.close()
    for args in (("ls",), ("inspect", "data"), ("ls", "--format", "json"), ("df",)):
        out = ok(daemon, *args)
        assert not any(c in out for c in "\x1b\x07\u202e\x9b"), (args, out)
    assert "\\x1b]0;owned\\x07\\u202eevil\\x9b" in ok(daemon, "ls")
    refused = boxvol(daemon, "inspect", "x\x1b[2Jy")
    assert refused.returncode == 1
    assert "\x1b" not in refused.stderr and "\\x1b[2J" in refused.stderr
