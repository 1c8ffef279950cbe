"""``boxvol archive`` and ``boxvol restore`` against a real boxvold: byte-for-byte round trips,
hostile archives, all-or-nothing restores, and the edges of passing a pipe with a request."""

from __future__ import annotations

import array
import os
import select
import socket
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import (
    SPARSE_FILE,
    VENV_BIN,
    Daemon,
    boxvol,
    make_odd_tree,
    ok,
    tar_bytes,
    tar_member,
    tree_snapshot,
)
from volumed import errors
from volumed.client import Client


def _volume(daemon: Daemon, name: str) -> Path:
    return daemon.home / "volumes" / "named" / name


def _one_line(text: str) -> str:
    assert text.count("\n") == 1 and text.startswith("boxvol: error: "), text
    return text


def test_round_trip_of_an_odd_tree_is_byte_for_byte(daemon: Daemon, tmp_path: Path) -> None:
    ok(daemon, "create", "src")
    make_odd_tree(_volume(daemon, "src"))
    archive_file = tmp_path / "src.tar"
    archived = boxvol(daemon, "archive", "src", "-o", str(archive_file))
    assert archived.returncode == 0, archived.stderr
    assert archived.stderr.startswith("archived src: 18 entries")
    assert oct(archive_file.stat().st_mode & 0o777) == oct(0o600)

    restored = boxvol(daemon, "restore", "dst", str(archive_file))
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout.startswith("restored dst (created): 18 entries")
    # Links pointing out of the volume are kept as data, and said so in one line.
    assert restored.stderr == (
        "boxvol: warning: 2 entries made harmless: symlinks_out 2 (see docs/archives.md)\n"
    )
    source = tree_snapshot(_volume(daemon, "src"))
    assert tree_snapshot(_volume(daemon, "dst")) == source
    sparse = os.stat(_volume(daemon, "dst") / SPARSE_FILE)
    assert sparse.st_blocks <= os.stat(_volume(daemon, "src") / SPARSE_FILE).st_blocks
    assert sparse.st_blocks * 512 < sparse.st_size // 4

    # Through pipes: stdout to stdin, into a volume that exists and is empty.
    ok(daemon, "create", "piped")
    piped = subprocess.run(
        f"{VENV_BIN}/boxvol archive src | {VENV_BIN}/boxvol restore piped -",
        shell=True,
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert piped.returncode == 0, piped.stderr
    assert "restored piped: 18 entries" in piped.stdout
    assert tree_snapshot(_volume(daemon, "piped")) == source


def _everything(root: Path) -> list[str]:
    """Every path below ``root`` (links not followed)."""
    found = []
    for directory, dirs, files in os.walk(root):
        found += [os.path.join(directory, name) for name in dirs + files]
    return sorted(found)


def test_a_hostile_archive_leaves_nothing_outside_the_volume(
    daemon: Daemon, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    ok(daemon, "create", "other")
    (_volume(daemon, "other") / "data").write_text("other volume")
    hostile = tmp_path / "hostile.tar"
    hostile.write_bytes(
        tar_bytes(
            (tar_member("/etc/boxvol-pwned"), b"absolute"),
            (tar_member("../pwned"), b"up"),
            (tar_member("a/../../../../pwned"), b"up"),
            (tar_member("esc", tarfile.SYMTYPE, linkname=str(outside)), None),
            (tar_member("esc/pwned"), b"through a link"),
            (tar_member("up", tarfile.SYMTYPE, linkname="../other"), None),
            (tar_member("up/pwned"), b"into another volume"),
            (tar_member("null", tarfile.CHRTYPE, devmajor=1, devminor=3), None),
            (tar_member("fifo", tarfile.FIFOTYPE), None),
            (tar_member("hl", tarfile.LNKTYPE, linkname=str(outside / "secret")), None),
            (tar_member("hl2", tarfile.LNKTYPE, linkname="../other/data"), None),
            (tar_member("suid", mode=0o6755), b"#!/bin/sh\n"),
        )
    )
    before = set(_everything(tmp_path))

    result = boxvol(daemon, "restore", "hostile", str(hostile))

    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "boxvol: warning: 8 entries left out: bad_hardlink 1, device 1, fifo 1, "
        "parent_refs 3, through_symlink 2 (see docs/archives.md)",
        "boxvol: warning: 4 entries made harmless: absolute_paths 1, setid_bits 1, "
        "symlinks_out 2 (see docs/archives.md)",
    ]
    volume = _volume(daemon, "hostile")
    after = {p for p in _everything(tmp_path) if not p.startswith(str(volume) + "/")}
    assert after - before == {str(volume)}
    assert before - after == set()
    assert (outside / "secret").read_text() == "secret"
    assert os.listdir(_volume(daemon, "other")) == ["data"]
    assert not Path("/etc/boxvol-pwned").exists()
    assert sorted(os.listdir(volume)) == ["esc", "etc", "suid", "up"]
    assert (volume / "etc" / "boxvol-pwned").read_bytes() == b"absolute"
    assert os.stat(volume / "suid").st_mode & 0o7777 == 0o755


def test_a_failed_restore_leaves_the_volume_as_it_was(daemon: Daemon, tmp_path: Path) -> None:
    ok(daemon, "create", "src")
    make_odd_tree(_volume(daemon, "src"))
    whole = tmp_path / "whole.tar"
    ok(daemon, "archive", "src", "-o", str(whole))
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    (_volume(daemon, "src") / "extra").write_text("only here")
    before = tree_snapshot(_volume(daemon, "src"))

    cut = boxvol(daemon, "restore", "src", str(truncated), "--force")
    assert cut.returncode == 1
    assert "not a complete tar archive" in _one_line(cut.stderr)
    assert tree_snapshot(_volume(daemon, "src")) == before

    unforced = boxvol(daemon, "restore", "src", str(whole))
    assert unforced.returncode == 1
    assert "give --force" in _one_line(unforced.stderr)
    assert tree_snapshot(_volume(daemon, "src")) == before

    # A restore that would have created the volume leaves no volume behind.
    missing = boxvol(daemon, "restore", "new", str(truncated))
    assert missing.returncode == 1
    assert "not a complete tar archive" in _one_line(missing.stderr)
    assert ok(daemon, "ls", "-q") == "src\n"

    # A file that is not there is a usage error; a missing volume to archive a failure.
    assert boxvol(daemon, "restore", "src", str(tmp_path / "nope.tar")).returncode == 2
    gone = boxvol(daemon, "archive", "nope", "-o", str(tmp_path / "nope.tar"))
    assert gone.returncode == 1
    assert "no volume named 'nope'" in _one_line(gone.stderr)
    assert not (tmp_path / "nope.tar").exists()
    assert sorted(os.listdir(tmp_path)) == ["boxvold.log", "home", "truncated.tar", "whole.tar"]

    forced = boxvol(daemon, "restore", "src", str(whole), "--force")
    assert forced.returncode == 0, forced.stderr
    assert not (_volume(daemon, "src") / "extra").exists()


def test_a_restore_into_an_exported_volume_is_refused(daemon: Daemon, tmp_path: Path) -> None:
    ok(daemon, "create", "live")
    (_volume(daemon, "live") / "kept").write_text("kept")
    archive_file = tmp_path / "live.tar"
    ok(daemon, "archive", "live", "-o", str(archive_file))
    ok(daemon, "export", "create", "live")
    refused = boxvol(daemon, "restore", "live", str(archive_file), "--force")
    assert refused.returncode == 1
    assert "live export" in _one_line(refused.stderr)
    assert os.listdir(_volume(daemon, "live")) == ["kept"]


def test_a_volume_being_restored_is_busy_and_others_are_not_held_up(
    daemon: Daemon, tmp_path: Path
) -> None:
    """While a restore's stream is still coming, its volume refuses exports, removal and
    resizes; another volume exports at once; the restore then completes."""
    import threading

    ok(daemon, "create", "target")
    ok(daemon, "create", "other")
    source = tmp_path / "src.tar"
    ok(daemon, "archive", "other", "-o", str(source))
    read_end, write_end = os.pipe()
    answers: list[object] = []
    worker = threading.Thread(
        target=lambda: answers.append(daemon.client().restore_volume("target", read_end)),
    )
    worker.start()
    try:
        client = daemon.client()
        os.write(write_end, source.read_bytes()[:512])  # the first header only: it waits
        # The volume is marked before its worker starts: once the worker runs, it is busy.
        deadline = time.monotonic() + 30
        while not _archive_workers("unpack"):
            assert time.monotonic() < deadline, "no restore worker started"
            time.sleep(0.02)
        attempts: list[Callable[[], object]] = [
            lambda: client.create_export("target"),
            lambda: client.remove_volume("target", force=True),
        ]
        for attempt in attempts:
            with pytest.raises(errors.InUse, match="is being restored"):
                attempt()
        other = client.create_export("other")  # another volume is not held up
        client.remove_export(other["id"])
        os.write(write_end, source.read_bytes()[512:])
    finally:
        os.close(write_end)
        worker.join(timeout=60)
        os.close(read_end)
    assert answers and isinstance(answers[0], dict)
    export = daemon.client().create_export("target")  # free again
    daemon.client().remove_export(export["id"])


def _archive_workers(mode: str) -> list[int]:
    """Pids of running archive workers in ``mode`` (pack or unpack)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"volumed.archive_worker" in args and mode.encode() in args:
            found.append(int(entry))
    return found


def _closed_by_the_other_side(read_end: int) -> bool:
    """True if every other copy of the pipe's write end is closed (read gives EOF)."""
    readable, _, _ = select.select([read_end], [], [], 10)
    return bool(readable) and os.read(read_end, 1) == b""


def test_a_pipe_passed_where_none_is_taken_is_refused_and_closed(client: Client) -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(errors.MalformedRequest, match="takes none"):
            client.request("POST", "/v1/volumes", {"name": "x"}, fd=write_end)
        os.close(write_end)
        assert _closed_by_the_other_side(read_end)
    finally:
        os.close(read_end)
    assert client.list_volumes() == []


def test_an_archive_without_a_pipe_is_a_clear_400(client: Client) -> None:
    client.create_volume("data")
    for path, body in (("archive", None), ("restore", {"force": True})):
        with pytest.raises(errors.MalformedRequest, match="needs a pipe passed"):
            client.request("POST", f"/v1/volumes/data/{path}", body)


def test_a_refused_archive_request_closes_its_pipe(client: Client) -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(errors.InvalidArgument):
            client.request("POST", "/v1/volumes/.hidden/archive", fd=write_end)
        os.close(write_end)
        assert _closed_by_the_other_side(read_end)
    finally:
        os.close(read_end)


def test_two_fds_with_one_request_are_refused(daemon: Daemon) -> None:
    pipes = [os.pipe(), os.pipe()]
    request = (
        b"POST /v1/volumes/data/archive HTTP/1.1\r\nHost: boxvold\r\nConnection: close\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(daemon.socket))
        fds = array.array("i", [pipes[0][1], pipes[1][1]])
        sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"more than one file descriptor" in answer
    for read_end, write_end in pipes:
        os.close(write_end)
        assert _closed_by_the_other_side(read_end)
        os.close(read_end)
