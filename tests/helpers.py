"""Helpers shared by every test layer (imported, never taken from another test's conftest)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from volumed.client import Client

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"


class Daemon:
    """A boxvold subprocess and how to reach it."""

    def __init__(
        self,
        home: Path,
        runtime_dir: Path,
        log: Path | None = None,
        *,
        wrapper: tuple[str, ...] = (),
    ) -> None:
        self.home = home
        #: A command boxvold runs under (it must exec boxvold: the pid stays boxvold's).
        self.wrapper = wrapper
        self.runtime_dir = runtime_dir
        self.socket = runtime_dir / "boxvold.sock"
        self.log = log or home.parent / "boxvold.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        """Environment in which the ``boxvol`` CLI talks to this daemon."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("BOXVOL_")}
        env["BOXVOL_SOCKET"] = str(self.socket)
        env["BOXVOL_RESERVE_SIZE"] = os.environ.get("BOXVOL_RESERVE_SIZE", "1M")
        return env

    def start(self, *extra: str) -> None:
        """Start boxvold and wait until this very process says it is serving."""
        self.home.parent.mkdir(parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        offset = self.log_offset()
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    *self.wrapper,
                    str(VENV_BIN / "boxvold"),
                    "--home",
                    str(self.home),
                    "--runtime-dir",
                    str(self.runtime_dir),
                    *extra,
                ],
                stdout=log,
                stderr=log,
                # No host config file leaks into a test (/dev/null: every setting at its
                # default); a test gives its own with --config.
                env={**os.environ, "BOXVOL_CONFIG": os.environ.get("BOXVOL_CONFIG", os.devnull)},
            )
        deadline = time.monotonic() + 30
        while True:
            if "boxvold serving" in self.log_since(offset):
                break
            if self.process.poll() is not None:
                raise AssertionError(f"boxvold exited early:\n{self.log.read_text()}")
            if time.monotonic() > deadline:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"boxvold did not start in 30 s:\n{self.log.read_text()}")
            time.sleep(0.02)
        Client(str(self.socket), timeout=5).health()

    def log_offset(self) -> int:
        """Where the log ends now (for ``log_since``)."""
        return self.log.stat().st_size if self.log.exists() else 0

    def log_since(self, offset: int) -> str:
        """What the log gained after ``offset`` (from ``log_offset``)."""
        with self.log.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stop boxvold with ``sig`` and return its exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            status = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            status = self.process.wait()
        self.process = None
        return status

    def client(self) -> Client:
        """A client of this daemon."""
        return Client(str(self.socket))


def wait_for(
    what: str, check: Callable[[], Any], timeout: float = 30.0, detail: Callable[[], str] = str
) -> Any:
    """``check()`` once it is true, polled for up to ``timeout`` seconds (then the test fails
    naming ``what``, with ``detail()``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{detail()}"
        time.sleep(0.1)


def boxvol(
    daemon: Daemon | None, *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the ``boxvol`` CLI against ``daemon`` (or the given environment)."""
    run_env = env if env is not None else (daemon.env if daemon else dict(os.environ))
    return subprocess.run(
        [str(VENV_BIN / "boxvol"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=run_env,
        timeout=60,
        check=False,
    )


def ok(daemon: Daemon, *args: str) -> str:
    """``boxvol ARGS`` that must succeed; its stdout."""
    result = boxvol(daemon, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


# -- trees for archive round trips ---------------------------------------------------------

#: Where ``make_odd_tree`` puts its sparse file (16 MiB, two 4-byte runs of data).
SPARSE_FILE = "sparse.img"


def make_odd_tree(root: Path) -> None:
    """A tree that exercises an archive: hard links, symbolic links (relative, absolute,
    pointing out, dangling), user xattrs with binary values, a sparse file, names with
    non-UTF-8 bytes, newlines, spaces and 255 bytes, odd modes, owners and mtimes."""
    base = os.fsencode(root)

    def at(*parts: bytes) -> bytes:
        return os.path.join(base, *parts)

    os.makedirs(at(b"dir with spaces", b"a", b"b"))
    for name, content in {
        b"dir with spaces/new\nline": b"newline\n",
        b"caf\xe9 latin-1": b"a name that is not UTF-8",
        b"n" * 255: b"a 255-byte name",
        b"empty": b"",
        b"\xff\xfe binary": bytes(range(256)) * 300,
        b"dir with spaces/a/b/deep": b"deep",
    }.items():
        with open(at(name), "wb") as f:
            f.write(content)
    os.link(at(b"caf\xe9 latin-1"), at(b"dir with spaces", b"hard link"))
    os.link(at(b"caf\xe9 latin-1"), at(b"dir with spaces", b"a", b"hard link 2"))
    os.symlink(b"caf\xe9 latin-1", at(b"rel link"))
    os.symlink(b"/etc/passwd", at(b"abs link"))
    os.symlink(b"../../outside", at(b"dir with spaces", b"up link"))
    os.symlink(b"nowhere", at(b"dangling"))
    os.setxattr(at(b"empty"), "user.binary", b"\x00\xff value\n")
    os.setxattr(at(b"dir with spaces"), "user.dir", b"d")
    fd = os.open(at(os.fsencode(SPARSE_FILE)), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"head", 0)
        os.pwrite(fd, b"tail", (5 << 20) + 123)
        os.ftruncate(fd, 16 << 20)
    finally:
        os.close(fd)
    os.mkdir(at(b"sticky"))
    os.chmod(at(b"sticky"), 0o1777)
    os.mkdir(at(b"setgid dir"))
    os.chmod(at(b"setgid dir"), 0o2750)
    os.chmod(at(b"empty"), 0o640)
    os.chown(at(b"empty"), 1234, 5678)
    os.lchown(at(b"rel link"), 42, 43)
    os.utime(at(b"empty"), ns=(1, 1_234_567_891))
    os.utime(at(b"dir with spaces", b"a", b"b"), ns=(2, 987_654_321_123_456_789))


def tree_snapshot(root: Path) -> dict[bytes, object]:
    """Everything an archive round trip must keep, by path below ``root`` (bytes): type,
    mode, owner, mtime, content or link target, user xattrs; and under ``b"<hard links>"``
    the groups of paths that share an inode."""
    import hashlib
    import stat

    base = os.fsencode(root)
    snapshot: dict[bytes, object] = {}
    inodes: dict[int, list[bytes]] = {}
    for directory, dirs, files in os.walk(base):
        for name in dirs + files:
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, base)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                body: object = os.readlink(path)
                xattrs: dict[str, bytes] = {}
            else:
                xattrs = {
                    key: os.getxattr(path, key)
                    for key in sorted(os.listxattr(path))
                    if key.startswith("user.")
                }
                if stat.S_ISREG(st.st_mode):
                    with open(path, "rb") as f:
                        body = (st.st_size, hashlib.sha256(f.read()).hexdigest())
                    inodes.setdefault(st.st_ino, []).append(relative)
                else:
                    body = None
            snapshot[relative] = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                st.st_mtime_ns,
                body,
                xattrs,
            )
    snapshot[b"<hard links>"] = sorted(sorted(g) for g in inodes.values() if len(g) > 1)
    return snapshot


# -- hostile and hand-made tar archives ------------------------------------------------------


def tar_bytes(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    """A PAX tar archive of ``members`` (a member's content, or None for none)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, content in members:
            if content is not None:
                info.size = len(content)
            tar.addfile(info, io.BytesIO(content) if content is not None else None)
    return out.getvalue()


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    """A tar header named ``name`` of type ``kind`` with ``fields`` set."""
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in fields.items():
        setattr(info, key, value)
    return info


# -- other mount namespaces and clean stops ---------------------------------------------------


@contextlib.contextmanager
def held_in_another_namespace(directory: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process in a mount namespace of its own whose cwd is ``directory``: it keeps the
    mount there alive (as a guest's virtiofsd would) until the block ends."""
    holder = subprocess.Popen(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            f"cd {directory} && exec sleep 600",
        ]
    )
    try:
        deadline = time.monotonic() + 30
        while str(directory) not in Path(f"/proc/{holder.pid}/mountinfo").read_text():
            assert time.monotonic() < deadline, "the holder never entered its namespace"
            time.sleep(0.05)
        yield holder
    finally:
        holder.kill()
        holder.wait()


def stop_cleanly(daemon: Daemon) -> None:
    """Remove the daemon's exports (an export in use outlives a stop by design), then stop it
    and check it exited 0."""
    if daemon.process is None:
        return
    client = daemon.client()
    for export in client.list_exports():
        client.remove_export(export["id"])
    status = daemon.stop()
    assert status == 0, daemon.log.read_text()
