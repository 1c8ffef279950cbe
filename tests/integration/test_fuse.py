"""boxvold's FUSE exports on the real mount: operations, policies, escapes, lifecycle."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import Daemon
from tests.integration.fuse_helpers import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RESOLVE_BENEATH,
    RESOLVE_NO_SYMLINKS,
    Export,
    openat2,
    read_directory,
    renameat2,
    run_as,
)
from volumed.errors import InUse, NotFound
from volumed.fs.fuse_mount import mounted_at

USER = (4242, 4242)
DT_DIR = 4


@pytest.fixture
def export(daemon: Daemon) -> Iterator[Export]:
    yield Export(daemon, "data")


def test_export_appears_and_lists_only_live_exports(daemon: Daemon, export: Export) -> None:
    """Each export is a FUSE mount of its own under the mount root, served by a process of
    its own."""
    root = daemon.runtime_dir / "fs"
    assert not mounted_at(str(root)) and mounted_at(str(export.path))
    assert os.listdir(root) == [export.id]
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o711
    other = Export(daemon, "other")
    assert sorted(os.listdir(root)) == sorted([export.id, other.id])
    assert daemon.client().list_exports("other")[0]["id"] == other.id
    servers = {e["id"]: e["server"]["pid"] for e in daemon.client().list_exports()}
    assert len(set(servers.values())) == 2 and daemon.process is not None
    assert daemon.process.pid not in servers.values()
    daemon.client().remove_export(other.id)
    assert os.listdir(root) == [export.id]
    with pytest.raises(FileNotFoundError):
        os.stat(other.path)
    assert not Path(f"/proc/{servers[other.id]}").exists()


def test_files_and_directories(export: Export) -> None:
    p = export.path
    (p / "a.txt").write_bytes(b"hello")
    assert (export.backing / "a.txt").read_bytes() == b"hello"
    assert (p / "a.txt").read_bytes() == b"hello"
    (p / "dir" / "sub").mkdir(parents=True)
    os.rename(p / "a.txt", p / "dir" / "b.txt")
    assert sorted(os.listdir(p)) == ["dir"]
    os.link(p / "dir" / "b.txt", p / "hard")
    assert os.stat(p / "hard").st_nlink == 2
    assert os.stat(p / "hard").st_ino == os.stat(p / "dir" / "b.txt").st_ino
    os.symlink("dir/b.txt", p / "link")
    assert os.readlink(p / "link") == "dir/b.txt"
    assert os.lstat(p / "link").st_mode & stat.S_IFMT(0o170000) == stat.S_IFLNK
    os.unlink(p / "hard")
    assert os.stat(p / "dir" / "b.txt").st_nlink == 1
    with pytest.raises(OSError) as caught:
        os.rmdir(p / "dir")
    assert caught.value.errno == errno.ENOTEMPTY
    os.rmdir(p / "dir" / "sub")
    os.mkfifo(p / "fifo")
    assert stat.S_ISFIFO(os.lstat(p / "fifo").st_mode)
    st = os.statvfs(p)
    assert st.f_namemax == 255
    long_name = "n" * 255
    (p / long_name).write_text("x")
    with pytest.raises(OSError) as caught:
        (p / ("n" * 256)).write_text("x")
    assert caught.value.errno == errno.ENAMETOOLONG


def test_attributes(export: Export) -> None:
    f = export.path / "f"
    f.write_bytes(b"0123456789")
    os.chmod(f, 0o640)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o640
    os.chown(f, 1234, 5678)
    assert (os.stat(export.backing / "f").st_uid, os.stat(f).st_gid) == (1234, 5678)
    os.truncate(f, 4)
    assert f.read_bytes() == b"0123"
    os.truncate(f, 6)
    assert f.read_bytes() == b"0123\0\0"
    os.utime(f, ns=(1_000_000_000, 2_000_000_123))
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000, 2_000_000_123)
    os.utime(f)  # UTIME_NOW for both
    assert os.stat(f).st_mtime_ns > 2_000_000_123


def test_missing_names_are_remembered_per_cache_mode(daemon: Daemon) -> None:
    # ``always`` remembers a missing name (for 10 minutes: no race with the clock here), so a
    # name created behind the export's back stays hidden, while a create through the export
    # replaces what the kernel remembered. ``none`` remembers nothing.
    cached = Export(daemon, "data", cache="always")
    assert not (cached.path / "late").exists()
    (cached.backing / "late").write_text("behind its back")
    assert not (cached.path / "late").exists()
    assert not (cached.path / "made2").exists()
    with open(cached.path / "made2", "x") as made:
        made.write("through the export")
    assert (cached.path / "made2").read_text() == "through the export"

    fresh = Export(daemon, "data", cache="none")
    assert not (fresh.path / "later").exists()
    (fresh.backing / "later").write_text("seen at once")
    assert (fresh.path / "later").read_text() == "seen at once"
    assert (fresh.path / "late").read_text() == "behind its back"


def test_renames_with_flags(export: Export) -> None:
    p = export.path
    (p / "a").write_text("A")
    (p / "b").write_text("B")
    with pytest.raises(FileExistsError):
        renameat2(p / "a", p / "b", RENAME_NOREPLACE)
    renameat2(p / "a", p / "b", RENAME_EXCHANGE)
    assert ((p / "a").read_text(), (p / "b").read_text()) == ("B", "A")
    renameat2(p / "a", p / "c", RENAME_NOREPLACE)
    assert sorted(os.listdir(p)) == ["b", "c"]


def test_append_and_trunc_are_per_open(export: Export) -> None:
    f = export.path / "log"
    f.write_bytes(b"abc")
    appender = os.open(f, os.O_WRONLY | os.O_APPEND)
    plain = os.open(f, os.O_WRONLY)
    try:
        os.write(plain, b"X")
        os.write(appender, b"def")
        os.pwrite(appender, b"ghi", 0)  # O_APPEND: pwrite still appends on Linux
        os.write(plain, b"Y")
    finally:
        os.close(appender)
        os.close(plain)
    assert f.read_bytes() == b"XYcdefghi"
    fd = os.open(f, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert f.read_bytes() == b""


def test_fsync_and_xattrs(export: Export) -> None:
    f = export.path / "x"
    fd = os.open(f, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"data")
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    dir_fd = os.open(export.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    os.setxattr(f, "user.colour", b"blue")
    assert os.getxattr(f, "user.colour") == b"blue"
    assert os.listxattr(f) == ["user.colour"]
    assert os.getxattr(export.backing / "x", "user.colour") == b"blue"
    for name in ("trusted.secret", "security.evil"):
        with pytest.raises(PermissionError):
            os.setxattr(f, name, b"x")
    os.setxattr(export.backing / "x", "trusted.hidden", b"host only")
    assert os.listxattr(f) == ["user.colour"]
    with pytest.raises(OSError) as caught:
        os.getxattr(f, "trusted.hidden")
    assert caught.value.errno == errno.ENODATA
    os.removexattr(f, "user.colour")
    assert os.listxattr(f) == []


def test_no_device_nodes(export: Export) -> None:
    for kind in (stat.S_IFBLK, stat.S_IFCHR):
        with pytest.raises(PermissionError):
            os.mknod(export.path / "dev", kind | 0o600, os.makedev(8, 0))
    assert not (export.backing / "dev").exists()
    os.mknod(export.path / "regular", stat.S_IFREG | 0o600)
    assert (export.backing / "regular").is_file()


def test_new_entries_belong_to_the_caller_with_their_exact_mode(export: Export) -> None:
    shared = export.path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    os.chmod(export.path, 0o755)  # the volume root is 0700; let others in
    code = (
        "import os, sys; d = sys.argv[1]; "
        "os.close(os.open(d + '/f', os.O_CREAT | os.O_WRONLY, 0o666)); "
        "os.mkdir(d + '/d', 0o777); os.symlink('f', d + '/l'); os.mkfifo(d + '/p', 0o666); "
        "os.close(os.open(d + '/exact', os.O_CREAT | os.O_WRONLY, 0o640))"
    )
    run_as(*USER, code, str(shared), umask=0o022)
    expected = {"f": 0o644, "d": 0o755, "p": 0o644, "exact": 0o640}
    for name, mode in expected.items():
        st = os.lstat(export.backing / "shared" / name)
        assert (st.st_uid, st.st_gid) == USER, name
        assert stat.S_IMODE(st.st_mode) == mode, name
    assert os.lstat(export.backing / "shared" / "l").st_uid == USER[0]


def test_setgid_directories_are_honoured(export: Export) -> None:
    os.chmod(export.path, 0o755)
    team = export.path / "team"
    team.mkdir()
    os.chown(team, 0, 777)
    os.chmod(team, 0o2777)
    code = (
        "import os, sys; d = sys.argv[1]; "
        "os.close(os.open(d + '/f', os.O_CREAT | os.O_WRONLY, 0o644)); os.mkdir(d + '/sub', 0o755)"
    )
    run_as(*USER, code, str(team))
    f = os.stat(export.backing / "team" / "f")
    sub = os.stat(export.backing / "team" / "sub")
    assert (f.st_uid, f.st_gid) == (USER[0], 777)
    assert (sub.st_uid, sub.st_gid) == (USER[0], 777)
    assert sub.st_mode & stat.S_ISGID


def test_setuid_is_cleared_when_another_user_writes(export: Export) -> None:
    os.chmod(export.path, 0o755)
    f = export.path / "tool"
    f.write_bytes(b"#!/bin/sh\n")
    os.chown(f, USER[0], USER[1])
    os.chmod(f, 0o6775)
    run_as(*USER, "import sys; open(sys.argv[1], 'ab').write(b'echo\\n')", str(f))
    assert stat.S_IMODE(os.stat(export.backing / "tool").st_mode) == 0o0775
    os.chmod(f, 0o4755)
    run_as(*USER, "import os, sys; os.truncate(sys.argv[1], 1)", str(f))
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o755
    os.chmod(f, 0o4755)
    os.chown(f, USER[0], 0)
    assert not os.stat(f).st_mode & stat.S_ISUID


def test_read_only_export(daemon: Daemon) -> None:
    writable = Export(daemon, "data")
    (writable.path / "kept").write_text("kept")
    (writable.path / "dir").mkdir()
    ro = Export(daemon, "data", read_only=True)
    assert (ro.path / "kept").read_text() == "kept"
    attempts: list[Callable[[], object]] = [
        lambda: (ro.path / "new").write_text("x"),
        lambda: (ro.path / "kept").write_text("x"),
        lambda: open(ro.path / "kept", "ab").close(),
        lambda: os.truncate(ro.path / "kept", 0),
        lambda: os.mkdir(ro.path / "d2"),
        lambda: os.rmdir(ro.path / "dir"),
        lambda: os.unlink(ro.path / "kept"),
        lambda: os.rename(ro.path / "kept", ro.path / "k2"),
        lambda: os.symlink("x", ro.path / "l"),
        lambda: os.link(ro.path / "kept", ro.path / "h"),
        lambda: os.chmod(ro.path / "kept", 0o777),
        lambda: os.chown(ro.path / "kept", 1, 1),
        lambda: os.utime(ro.path / "kept"),
        lambda: os.mkfifo(ro.path / "p"),
        lambda: os.setxattr(ro.path / "kept", "user.a", b"1"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as caught:
            attempt()
        assert caught.value.errno == errno.EROFS
    assert (writable.backing / "kept").read_text() == "kept"
    assert sorted(os.listdir(writable.backing)) == ["dir", "kept"]


def test_ownership_mapping(daemon: Daemon) -> None:
    mapped = Export(daemon, "data", owner=USER)
    (mapped.path / "f").write_text("x")
    (mapped.path / "d").mkdir()
    for name in ("", "f", "d"):
        st = os.stat(mapped.path / name)
        assert (st.st_uid, st.st_gid) == USER
        backing = os.stat(mapped.backing / name)
        assert (backing.st_uid, backing.st_gid) == (0, 0)
    os.chown(mapped.path / "f", *USER)  # to the presented owner: accepted, nothing changes
    with pytest.raises(PermissionError):
        os.chown(mapped.path / "f", 1, 1)
    # The mapped user owns what it sees, so it can write into the 0700 volume root.
    run_as(*USER, "import sys; open(sys.argv[1] + '/mine', 'w').write('y')", str(mapped.path))
    assert os.stat(mapped.backing / "mine").st_uid == 0
    plain = Export(daemon, "data")
    assert os.stat(plain.path / "f").st_uid == 0


def test_escapes_planted_while_live(export: Export, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host secret")
    p, backing = export.path, export.backing
    (backing / "d").mkdir()
    (backing / "d" / "inner").write_text("inside")
    os.symlink("/etc", backing / "etc-link")
    os.symlink(outside, backing / "out-link")

    # A symlink is data: the export returns the link, never what it points to.
    assert os.readlink(p / "out-link") == str(outside)
    root_fd = os.open(p, os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as caught:
            openat2(root_fd, "out-link/secret", os.O_RDONLY, RESOLVE_NO_SYMLINKS)
        assert caught.value.errno == errno.ELOOP
        with pytest.raises(OSError) as caught:
            os.open("out-link", os.O_RDONLY | os.O_NOFOLLOW, dir_fd=root_fd)
        assert caught.value.errno == errno.ELOOP

        # A symlink swapped in for a directory mid-walk: the daemon keeps resolving under
        # the directory it had looked up, never under the link's target.
        dir_fd = openat2(root_fd, "d", os.O_PATH | os.O_DIRECTORY, RESOLVE_NO_SYMLINKS)
        os.rename(backing / "d", backing / "d-moved")
        os.symlink(outside, backing / "d")
        fd = os.open("inner", os.O_RDONLY, dir_fd=dir_fd)
        assert os.read(fd, 100) == b"inside"
        os.close(fd)
        with pytest.raises(FileNotFoundError):
            os.open("secret", os.O_RDONLY, dir_fd=dir_fd)
        os.close(dir_fd)
        for path in ("d/secret", "d/../out-link/secret", "etc-link/passwd"):
            with pytest.raises(OSError) as caught:
                openat2(root_fd, path, os.O_RDONLY, RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH)
            assert caught.value.errno in (errno.ELOOP, errno.EXDEV, errno.ENOENT), path
    finally:
        os.close(root_fd)

    # Hard links cannot reach in from outside the export.
    with pytest.raises(OSError) as caught:
        os.link(outside / "secret", p / "stolen")
    assert caught.value.errno == errno.EXDEV
    assert not (backing / "stolen").exists()
    assert (outside / "secret").read_text() == "host secret"


def test_links_and_renames_never_cross_exports(daemon: Daemon) -> None:
    a = Export(daemon, "a")
    b = Export(daemon, "b")
    (a.path / "f").write_text("a")
    crossings: list[Callable[[], object]] = [
        lambda: os.link(a.path / "f", b.path / "f"),
        lambda: os.rename(a.path / "f", b.path / "f"),
    ]
    for attempt in crossings:
        with pytest.raises(OSError) as caught:
            attempt()
        assert caught.value.errno == errno.EXDEV
    assert not (b.backing / "f").exists()


def test_removed_export_vanishes_and_open_files_go_stale(daemon: Daemon, export: Export) -> None:
    (export.path / "f").write_bytes(b"x" * 10000)
    fd = os.open(export.path / "f", os.O_RDWR)
    dir_fd = os.open(export.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        daemon.client().remove_export(export.id)
        assert not export.path.exists()
        stale: list[Callable[[], object]] = [
            lambda: os.pwrite(fd, b"y", 0),
            lambda: os.open("f", os.O_RDONLY, dir_fd=dir_fd),
        ]
        for attempt in stale:
            with pytest.raises(OSError) as caught:
                attempt()
            assert caught.value.errno in (errno.ESTALE, errno.EIO, errno.ENOENT, errno.ENOTCONN)
    finally:
        with contextlib.suppress(OSError):  # close reports the stale handle too
            os.close(fd)
        with contextlib.suppress(OSError):
            os.close(dir_fd)
    assert (export.backing / "f").read_bytes() == b"x" * 10000


def test_exported_volume_is_in_use(daemon: Daemon, export: Export) -> None:
    client = daemon.client()
    assert client.get_volume("data")["in_use"] is True
    with pytest.raises(InUse):
        client.remove_volume("data")
    (export.path / "f").write_text("x")
    client.remove_volume("data", force=True)
    assert not export.path.exists()
    assert client.list_exports() == []
    with pytest.raises(NotFound):
        client.get_export(export.id)


def test_readdir_offsets_survive_changes(export: Export) -> None:
    names = {f"f{i:03d}" for i in range(300)}
    for name in names:
        (export.backing / name).write_text("")
    seen = []
    with os.scandir(export.path) as entries:
        for i, entry in enumerate(entries):
            seen.append(entry.name)
            if i == 10:
                for j in range(50):
                    (export.backing / f"new{j}").write_text("")
                    os.unlink(export.backing / f"f{299 - j:03d}")
    assert len(seen) == len(set(seen))
    survivors = {f"f{i:03d}" for i in range(250)}
    assert survivors <= set(seen)


def test_listings_show_dot_and_dotdot_as_ext4_does(daemon: Daemon, export: Export) -> None:
    sub = export.path / "sub"
    inner = sub / "inner"
    inner.mkdir(parents=True)
    names = {"inner"} | {f"n{i:03d}" for i in range(100)}
    for name in names - {"inner"}:
        (sub / name).write_text("")
    listed = subprocess.run(
        ["ls", "-a", str(export.path)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert listed == [".", "..", "sub"]
    # (directory, what its ".." is): the export is a mount of its own, and its root's ".."
    # entry is itself, as on every filesystem's root (a path walk leaves the mount instead).
    cases = ((inner, sub), (sub, export.path), (export.path, export.path))
    for directory, parent in cases:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            # A 100-byte buffer holds a few entries: the kernel comes back for the rest at
            # the offset of the last one it returned, every few entries.
            entries = read_directory(fd, 100)
            by_name = {entry.name: entry for entry in entries}
            assert len(by_name) == len(entries), "an entry was listed twice"
            assert by_name["."].ino == os.stat(directory).st_ino
            assert by_name[".."].ino == os.stat(parent).st_ino
            assert by_name["."].type == by_name[".."].type == DT_DIR
            # Resuming at any entry's offset (seekdir) lists exactly the entries after it.
            for k, entry in enumerate(entries):
                os.lseek(fd, entry.off, os.SEEK_SET)
                assert read_directory(fd) == entries[k + 1 :], entry.name
        finally:
            os.close(fd)
        if directory == sub:
            assert set(by_name) == names | {".", ".."}


def test_deep_paths(export: Export) -> None:
    path = export.path
    depth = 0
    while len(str(path)) < 3900:
        path = path / ("d" * 200)
        depth += 1
    os.makedirs(path)
    (path / "leaf").write_text("deep")
    assert (path / "leaf").read_text() == "deep"
    assert depth > 15


def test_a_frozen_export_stalls_only_its_own_server(daemon: Daemon, export: Export) -> None:
    """Syscalls run inline in each export's own server process: while one export's write is
    stuck in the kernel (its backing filesystem is frozen), that server alone waits; another
    export's server answers and so does the API."""
    import shutil
    import tempfile

    image_dir = Path(tempfile.mkdtemp(dir="/var/tmp"))
    image, mnt = image_dir / "fs.img", image_dir / "mnt"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        # The log stays off the filesystem that gets frozen.
        frozen = Daemon(
            mnt / "home",
            daemon.runtime_dir.with_name(daemon.runtime_dir.name + "z"),
            log=image_dir / "boxvold.log",
        )
        frozen.start()
        try:
            # No kernel caching: every stat below must be answered by a server itself.
            stuck = Export(frozen, "data", cache="none")
            other = Export(frozen, "other", cache="none")
            (stuck.path / "probe").write_text("x")
            (other.path / "probe").write_text("y")
            client = frozen.client()
            stuck_pid = client.get_export(stuck.id)["server"]["pid"]
            subprocess.run(["fsfreeze", "-f", str(mnt)], check=True)
            writer = threading.Thread(
                target=lambda: (stuck.path / "w").write_bytes(b"y" * 100000), daemon=True
            )
            try:
                writer.start()
                _wait_for_blocked_process(stuck_pid)
                # (Only stats: reading a directory would update its atime, which the frozen
                # filesystem blocks in the kernel for any process, FUSE or not.)
                for _ in range(20):
                    assert os.stat(other.path / "probe").st_size == 1
                    assert client.health()["status"] == "ok"
                assert writer.is_alive()
            finally:
                subprocess.run(["fsfreeze", "-u", str(mnt)], check=True)
            writer.join(60)
            assert not writer.is_alive()
        finally:
            assert frozen.stop() == 0
            shutil.rmtree(frozen.runtime_dir, ignore_errors=True)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
        shutil.rmtree(image_dir)


def _wait_for_blocked_process(pid: int) -> None:
    """Poll (bounded) until one of the threads of ``pid`` sleeps uninterruptibly."""
    import time

    deadline = time.monotonic() + 30
    tasks = Path(f"/proc/{pid}/task")
    while time.monotonic() < deadline:
        for task in tasks.iterdir():
            try:
                state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state == "D":
                return
        time.sleep(0.01)
    raise AssertionError(f"export server {pid} never blocked on the frozen filesystem")


def test_exports_keep_serving_through_a_boxvold_crash_and_restart(
    home: Path, runtime_dir: Path
) -> None:
    """Export servers are processes of their own: a SIGKILLed boxvold leaves them serving,
    the next boxvold re-adopts them (same process, same mount), and a clean stop leaves no
    mount and no server."""
    daemon = Daemon(home, runtime_dir)
    daemon.start()
    ex = Export(daemon, "data")
    (ex.path / "f").write_text("survives")
    server = daemon.client().get_export(ex.id)["server"]["pid"]
    try:
        with open(ex.path / "f") as held:  # a client holding a file across the crash
            daemon.stop(signal.SIGKILL)
            assert (ex.path / "f").read_text() == "survives"  # while boxvold is down
            daemon.start()
            log = daemon.log.read_text()
            assert f"export server re-adopted export={ex.id} pid={server}" in log
            [export] = daemon.client().list_exports()
            assert export["id"] == ex.id and export["server"]["pid"] == server
            assert held.read() == "survives"  # never noticed
            (ex.path / "g").write_text("after")
    finally:
        # Nobody uses the export any more: a clean stop leaves nothing (volumed.stop_policy).
        assert daemon.stop() == 0
    assert not mounted_at(str(ex.path)) and not Path(f"/proc/{server}").exists()


def test_a_server_that_died_while_boxvold_was_down_is_replaced(
    home: Path, runtime_dir: Path
) -> None:
    import time

    daemon = Daemon(home, runtime_dir)
    daemon.start()
    ex = Export(daemon, "data")
    (ex.path / "f").write_text("kept")
    server = daemon.client().get_export(ex.id)["server"]["pid"]
    daemon.stop(signal.SIGKILL)
    os.kill(server, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{server}").exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with pytest.raises(OSError) as caught:
        os.listdir(ex.path)
    assert caught.value.errno == errno.ENOTCONN
    daemon.start()
    try:
        assert (ex.path / "f").read_text() == "kept"
        assert daemon.client().get_export(ex.id)["server"]["pid"] not in (None, server)
    finally:
        assert daemon.stop() == 0
    assert not mounted_at(str(ex.path))


def test_each_server_is_sandboxed_in_its_volume(daemon: Daemon, export: Export) -> None:
    """The server's root is the volume (nothing of the host), in a mount namespace of its
    own, with five capabilities, no_new_privs and the syscall filter."""
    (export.path / "seen").write_text("x")
    pid = daemon.client().get_export(export.id)["server"]["pid"]
    assert sorted(os.listdir(f"/proc/{pid}/root")) == ["seen"]
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    assert (
        int(status["CapEff"].strip(), 16) == 0x1F
    )  # CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID
    assert int(status["CapBnd"].strip(), 16) == 0x1F
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"  # filter mode
    assert status["Seccomp_filters"].strip() == "1"


def test_a_killed_server_is_replaced_at_the_same_path(daemon: Daemon, export: Export) -> None:
    """A server that dies is reported (restarts, last exit) and a fresh one serves the same
    mountpoint; data fsynced before the kill is intact; other exports never notice."""
    import time

    with open(export.path / "kept", "wb") as f:
        f.write(b"fsynced")
        os.fsync(f.fileno())
    client = daemon.client()
    bystander = Export(daemon, "bystander")
    (bystander.path / "b").write_text("unaffected")
    old = client.get_export(export.id)["server"]["pid"]
    os.kill(old, signal.SIGKILL)
    # Every other export and the API keep serving.
    assert (bystander.path / "b").read_text() == "unaffected"
    assert client.health()["status"] == "ok"
    deadline = time.monotonic() + 30
    while True:
        server = client.get_export(export.id)["server"]
        if server["pid"] not in (None, old) and server["restarts"] == 1:
            break
        assert time.monotonic() < deadline, server
        time.sleep(0.05)
    assert server["last_exit"] == -signal.SIGKILL
    assert (export.path / "kept").read_bytes() == b"fsynced"
    (export.path / "after").write_text("new server")
    assert (export.backing / "after").read_text() == "new server"
    assert "export server died" in daemon.log.read_text()
    assert client.get_export(bystander.id)["server"]["restarts"] == 0
