"""FUSE data-path benchmark: a boxvold export against a plain directory and pyfuse3's example.

Runs the same workloads, in one run and on one disk, against up to three targets:

- ``native``: a plain directory on the disk (the baseline every ratio is against);
- ``boxvol``: a FUSE export of a volume, served by a throw-away boxvold started here;
- ``example``: pyfuse3's own ``examples/passthroughfs.py`` (the Python peer), run from
  pyfuse3's source distribution, which ``pip download`` fetches once into a cache dir.

Workloads: sequential write and read (cold, warm) of one file in 1 MiB blocks and 4 KiB
random reads (cold, warm), all with fio; create / stat / list / unlink of many empty files
in one directory, in Python; and ``tar -x`` of a source tree (the interpreter's stdlib,
about 2,400 files, made once into the cache dir). "Cold" means the kernel's page, dentry
and inode caches were dropped first (``/proc/sys/vm/drop_caches``), which drops the FUSE
mounts' caches and the backing files' alike. It reports absolute figures, the ratio to
native and the CPU seconds of each FUSE server process during each workload, then the
issue's targets with PASS/FAIL. Needs root (cold runs drop caches; FUSE mounts), fio and
fusermount3.

Each workload runs ``--repeat`` times (default 3) on every target, the targets taking
turns, and the report shows medians. A benchmark reports, it does not test: the exit code
is 0 whether or not a target is met (1 only if the run itself failed, 130 if interrupted).
Every mount and process it starts is gone when it returns, also on an error, Ctrl-C or
SIGTERM. See bench/FUSE.md for the choices behind each measurement.

boxvol is reached only as a user would: boxvold's API through ``volumed.client`` and
``bench.control_plane``'s daemon helpers. The one internal it reads is ``Layout``, to find
the exported volume's directory on disk (for the same-disk check and the backing fsync).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any

from bench.control_plane import BIN, interrupt_on_sigterm, positive_int, running_daemon
from volumed.client import Client
from volumed.errors import BoxvolError, NotFound
from volumed.locations import Layout

TARGETS = ("native", "boxvol", "example")
WORKLOADS = ("seqwrite", "seqread", "randread", "meta", "untar", "scale")

DEFAULT_PARENT = "/var/tmp"  # on disk (not tmpfs, unlike /tmp on many hosts)
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "boxvol-bench")
VOLUME_NAME = "fuse-bench"

MOUNT_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
TOOL_TIMEOUT = 900.0  # one fio or tar run; only a hung FUSE server comes near it
LIST_REPEATS = 5
#: Repetitions of one workload further apart than this (max / min) are flagged as noisy.
NOISY = 1.5
MB = 1_000_000
MIB = 1 << 20

#: /proc/<pid>/stat counts CPU time in these ticks.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """The benchmark itself could not run (a tool, a mount or boxvold failing)."""


# -- what is measured and what is reported -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """The run's parameters (from the command line)."""

    size_mib: int
    rand_mib: int
    files: int
    seconds: int
    targets: tuple[str, ...]
    workloads: tuple[str, ...]
    repeat: int
    parent: str
    cache_dir: str


@dataclasses.dataclass(frozen=True)
class Target:
    """One place the workloads run in."""

    name: str
    #: The directory the workloads create their files in (a mountpoint for FUSE targets).
    root: str
    #: The same directory as it lies on the disk: where the data really ends up.
    backing: str
    #: The FUSE server whose CPU time is reported; None for native.
    pid: int | None


@dataclasses.dataclass(frozen=True)
class Sample:
    """One workload's figure on one target, and its FUSE server's CPU seconds meanwhile."""

    value: float
    cpu: float | None


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the report."""

    key: str
    label: str
    unit: str
    #: Throughputs are better higher; the unpack's seconds better lower.
    higher_is_better: bool = True


@dataclasses.dataclass(frozen=True)
class Goal:
    """One of the issue's targets: ``row`` on a FUSE target against ``baseline``."""

    label: str
    row: str
    baseline: str
    limit: float

    def met(self, ratio: float, row: Row) -> bool:
        """Whether the ratio (target / baseline) meets the goal."""
        return ratio >= self.limit if row.higher_is_better else ratio <= self.limit


#: The targets of issue 10 (one sandboxed server process per export, syscalls inline).
GOALS = (
    Goal("creates >= 1.2x the pyfuse3 example", "create", "example", 1.2),
    Goal("tar -x <= 1.0x the example's time", "untar", "example", 1.0),
    Goal("sequential write >= 0.55x native", "seqwrite", "native", 0.55),
    Goal("warm stat >= 0.8x native", "stat-warm", "native", 0.8),
    Goal("warm 4 KiB random read >= 0.9x native", "randread-warm", "native", 0.9),
    Goal("warm sequential read >= 0.7x native", "seqread-warm", "native", 0.7),
)


def rows(config: Config, tree_files: int) -> list[Row]:
    """Every row the workloads can produce, in report order."""
    size, rand, files = config.size_mib, config.rand_mib, config.files
    return [
        Row("seqwrite", f"seq write {size} MiB, 1 MiB blocks", "MB/s"),
        Row("seqread-cold", f"seq read {size} MiB, cold", "MB/s"),
        Row("seqread-warm", f"seq read {size} MiB, warm", "MB/s"),
        Row("randread-cold", f"4 KiB random read, {rand} MiB, cold", "ops/s"),
        Row("randread-warm", f"4 KiB random read, {rand} MiB, warm", "ops/s"),
        Row("create", f"create {files} files", "ops/s"),
        Row("stat-warm", f"stat {files} files, warm", "ops/s"),
        Row("list", f"list {files} files x{LIST_REPEATS}", "entries/s"),
        Row("stat-cold", f"stat {files} files, cold", "ops/s"),
        Row("unlink", f"unlink {files} files", "ops/s"),
        Row("untar", f"tar -x {tree_files} files (time)", "s", higher_is_better=False),
    ]


#: row key -> target name -> one sample per repetition
Results = dict[str, dict[str, list[Sample]]]


def median_sample(samples: Sequence[Sample]) -> Sample:
    """The median figure and the median CPU seconds of a workload's repetitions."""
    cpus = [s.cpu for s in samples if s.cpu is not None]
    return Sample(
        statistics.median(s.value for s in samples), statistics.median(cpus) if cpus else None
    )


# -- processes, mounts, caches -------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` (all its threads) has used so far."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            stat = f.read()
    except OSError as exc:
        raise BenchError(f"the FUSE server (pid {pid}) is gone: {exc}") from None
    # Fields after the command name, which is in parentheses and may itself hold spaces.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLOCK_TICKS


class Watch:
    """Wall-clock seconds, and a FUSE server's CPU seconds, over a ``with`` block."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.wall = 0.0
        self.cpu: float | None = None
        self._start = 0.0
        self._cpu_start = 0.0

    def __enter__(self) -> Watch:
        if self.pid is not None:
            self._cpu_start = cpu_seconds(self.pid)
        self._start = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.wall = time.perf_counter() - self._start
        if self.pid is not None and exc_type is None:
            self.cpu = cpu_seconds(self.pid) - self._cpu_start


def drop_caches() -> None:
    """Write back dirty data, then drop the page cache, dentries and inodes (needs root)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as f:
        f.write("3\n")


def check_drop_caches(directory: str) -> None:
    """Prove that dropping caches really evicts a file we just read (fincore counts it)."""
    path = os.path.join(directory, "drop-caches-probe")
    with open(path, "wb") as f:
        f.write(os.urandom(MIB))
        f.flush()
        os.fsync(f.fileno())
    with open(path, "rb") as f:
        f.read()
    drop_caches()
    done = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", path],
        capture_output=True,
        text=True,
        check=False,
    )
    os.unlink(path)
    if done.returncode != 0:
        raise BenchError(f"fincore failed: {done.stderr.strip()}")
    if int(done.stdout.strip() or "0") != 0:
        raise BenchError(
            "writing /proc/sys/vm/drop_caches left a file in the page cache, so cold runs "
            "would not be cold (a container without the host's caches?)"
        )


def sync_file(path: str) -> float:
    """fsync ``path`` (a backing file, on the disk itself); the seconds it took."""
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def _unescape_mount_field(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts() -> list[tuple[str, str]]:
    """(mountpoint, fstype) of every mount this process sees."""
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
        entries = [line.split() for line in f]
    return [(_unescape_mount_field(e[1]), e[2]) for e in entries if len(e) >= 3]


def is_mounted(mountpoint: str) -> bool:
    """Whether something is mounted exactly at ``mountpoint``."""
    return any(point == mountpoint for point, _ in mounts())


def mounts_under(directory: str) -> list[tuple[str, str]]:
    """Mounts at or below ``directory``, deepest first."""
    prefix = directory.rstrip("/") + "/"
    found = [(p, t) for p, t in mounts() if p == directory or p.startswith(prefix)]
    return sorted(found, key=lambda m: m[0].count("/"), reverse=True)


def fusermount_unmount(mountpoint: str, *, lazy: bool = False) -> bool:
    """``fusermount3 -u [-z] mountpoint``; whether it succeeded."""
    argv = ["fusermount3", "-u", *(["-z"] if lazy else []), mountpoint]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=STOP_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def wait_mounted(mountpoint: str, proc: subprocess.Popen[bytes], log_path: str) -> None:
    """Poll the mount table until ``proc`` has mounted ``mountpoint``."""
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not is_mounted(mountpoint):
        if proc.poll() is not None:
            raise BenchError(
                f"the FUSE server exited with status {proc.returncode} before mounting "
                f"{mountpoint}:\n{_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            raise BenchError(
                f"nothing was mounted at {mountpoint} within {MOUNT_TIMEOUT:.0f}s:\n"
                + _tail(log_path)
            )
        time.sleep(0.02)


def stop_fuse_server(proc: subprocess.Popen[bytes], mountpoint: str) -> None:
    """Unmount (the server's main loop then returns), wait for the exit, kill on timeout,
    and detach the mount lazily if it is still there (e.g. the server died)."""
    if is_mounted(mountpoint):
        fusermount_unmount(mountpoint)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if is_mounted(mountpoint):
        fusermount_unmount(mountpoint, lazy=True)


def sweep_mounts(directory: str) -> list[str]:
    """Detach every FUSE mount left at or below ``directory``; the mounts still there."""
    for mountpoint, fstype in mounts_under(directory):
        if fstype.startswith("fuse"):
            fusermount_unmount(mountpoint, lazy=True)
    return [point for point, _ in mounts_under(directory)]


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while clean-up runs, so a second Ctrl-C cannot leave a
    mount or a process behind; they are delivered (as KeyboardInterrupt) afterwards."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def remove_workdir(tmp: str) -> None:
    """Delete the run's directory, but never through a mount that is still there."""
    left = sweep_mounts(tmp)
    if left:
        sys.stderr.write(f"fuse: still mounted, so {tmp} was kept: {', '.join(left)}\n")
        return
    shutil.rmtree(tmp, ignore_errors=True)


def findmnt(path: str) -> tuple[str, str]:
    """(MAJ:MIN of the device, "SOURCE FSTYPE at TARGET") of the filesystem holding path."""
    done = subprocess.run(
        ["findmnt", "--noheadings", "--output", "MAJ:MIN,SOURCE,FSTYPE,TARGET", "--target", path],
        capture_output=True,
        text=True,
        check=False,
    )
    fields = done.stdout.split()
    if done.returncode != 0 or len(fields) < 4:
        raise BenchError(f"findmnt --target {path} failed: {done.stderr.strip()}")
    return fields[0], f"{fields[1]} {fields[2]} ({fields[0]}) mounted at {fields[3]}"


def _tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


def progress(message: str) -> None:
    """One line of progress on stderr (stdout carries only the report)."""
    sys.stderr.write(f"fuse: {message}\n")
    sys.stderr.flush()


# -- the three targets ---------------------------------------------------------------------


def native_target(tmp: str) -> Target:
    """A plain directory beside the others."""
    root = os.path.join(tmp, "native")
    os.mkdir(root)
    return Target("native", root, root, None)


def example_script(cache_dir: str) -> str:
    """pyfuse3's ``examples/passthroughfs.py`` for the installed pyfuse3, from its sdist
    (the wheel does not ship it), downloaded once into ``cache_dir``."""
    version = importlib.metadata.version("pyfuse3")
    script = os.path.join(cache_dir, f"pyfuse3-{version}", "examples", "passthroughfs.py")
    if os.path.exists(script):
        return script
    os.makedirs(cache_dir, exist_ok=True)
    sdist = os.path.join(cache_dir, f"pyfuse3-{version}.tar.gz")
    if not os.path.exists(sdist):
        progress(f"downloading pyfuse3 {version}'s source distribution into {cache_dir}")
        done = subprocess.run(
            [
                os.path.join(BIN, "python"),
                *("-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps"),
                *(f"pyfuse3=={version}", "-d", cache_dir),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0 or not os.path.exists(sdist):
            raise BenchError(
                f"pip download of pyfuse3=={version}'s sdist failed:\n{done.stdout}{done.stderr}"
            )
    member = f"pyfuse3-{version}/examples/passthroughfs.py"
    with tarfile.open(sdist) as archive:
        try:
            source = archive.extractfile(member)
        except KeyError:
            source = None
        if source is None:
            raise BenchError(f"{sdist} has no {member}")
        text = source.read()
    os.makedirs(os.path.dirname(script), exist_ok=True)
    with open(script + ".tmp", "wb") as f:
        f.write(text)
    os.replace(script + ".tmp", script)
    return script


@contextlib.contextmanager
def example_target(tmp: str, script: str) -> Iterator[Target]:
    """pyfuse3's passthroughfs.py mirroring ``tmp/example-src`` at ``tmp/example-mnt``."""
    source = os.path.join(tmp, "example-src")
    mountpoint = os.path.join(tmp, "example-mnt")
    log_path = os.path.join(tmp, "passthroughfs.log")
    os.mkdir(source)
    os.mkdir(mountpoint)
    with open(log_path, "wb") as log:
        # Its own session: a Ctrl-C on the terminal must not reach it, or it would exit
        # without unmounting; it is stopped by unmounting instead.
        proc = subprocess.Popen(
            [os.path.join(BIN, "python"), script, source, mountpoint],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    try:
        wait_mounted(mountpoint, proc, log_path)
        yield Target("example", mountpoint, source, proc.pid)
    finally:
        stop_fuse_server(proc, mountpoint)


def server_pid(socket_path: str) -> int:
    """The pid of the process serving ``socket_path`` (SO_PEERCRED of a connection)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(socket_path)
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid: int = struct.unpack("3i", creds)[0]
    return pid


def create_export(client: Client, volume: str) -> dict[str, Any]:
    """``POST /v1/exports`` a read-write FUSE export of ``volume``."""
    body = {"volume": volume, "kind": "fuse", "read_only": False}
    try:
        export: dict[str, Any] = client.request("POST", "/v1/exports", body)
    except NotFound as exc:
        if "no endpoint" in str(exc):
            raise BenchError(
                "boxvold has no /v1/exports yet, so the boxvol target cannot run; "
                "leave it out with --targets native,example"
            ) from None
        raise
    for key in ("id", "mountpoint"):
        if not isinstance(export.get(key), str):
            raise BenchError(f"POST /v1/exports answered without a {key!r}: {export!r}")
    return export


@contextlib.contextmanager
def boxvol_target(tmp: str) -> Iterator[Target]:
    """A throw-away boxvold (home and runtime dir under ``tmp``), one volume, one FUSE
    export of it; the export is deleted and the daemon stopped afterwards."""
    with running_daemon(tmp) as socket_path:
        client = Client(socket_path, timeout=60.0)
        client.create_volume(VOLUME_NAME)
        export = create_export(client, VOLUME_NAME)
        # The export's own server process does the work (one per export).
        pid = int((export.get("server") or {}).get("pid") or server_pid(socket_path))
        try:
            runtime_fs = os.path.join(os.path.dirname(socket_path), "fs")
            mountpoint = os.path.realpath(export["mountpoint"])
            if os.path.dirname(mountpoint) != os.path.realpath(runtime_fs):
                raise BenchError(f"the export's mountpoint {mountpoint} is not in {runtime_fs}")
            if not os.path.isdir(mountpoint):
                raise BenchError(f"the export's mountpoint {mountpoint} is not a directory")
            backing = os.path.join(Layout(os.path.join(tmp, "home")).named, VOLUME_NAME)
            if not os.path.isdir(backing):
                raise BenchError(f"the volume's directory {backing} does not exist")
            yield Target("boxvol", mountpoint, backing, pid)
        finally:
            try:
                client.request("DELETE", f"/v1/exports/{export['id']}")
            except BoxvolError as exc:  # e.g. the daemon is already gone; it is stopped next
                sys.stderr.write(f"fuse: removing export {export['id']} failed: {exc}\n")


def check_same_disk(targets: Sequence[Target]) -> str:
    """Refuse targets whose data would land on different devices; describe the one disk."""
    seen = {t.name: findmnt(t.backing) for t in targets}
    devices = {device for device, _ in seen.values()}
    if len(devices) != 1:
        detail = "; ".join(f"{name}: {where}" for name, (_, where) in seen.items())
        raise BenchError(f"the targets' data is not on one device: {detail}")
    for t in targets:
        if t.pid is not None:
            fstype = dict(mounts()).get(_mount_of(t.root), "")
            if not fstype.startswith("fuse"):
                raise BenchError(f"{t.name}: {t.root} is not on a FUSE mount ({fstype!r})")
    return next(iter(seen.values()))[1]


def _mount_of(path: str) -> str:
    """The mountpoint of the filesystem ``path`` lies on (longest matching prefix)."""
    best = "/"
    for point, _ in mounts():
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            best = point
    return best


# -- the source tree -----------------------------------------------------------------------


def _in_tree(relative: str) -> bool:
    parts = relative.split(os.sep)
    return not (
        "__pycache__" in parts
        or parts[0] in ("site-packages", "lib-dynload")
        or parts[0].startswith("config-")
    )


def source_tarball(cache_dir: str) -> tuple[str, int]:
    """An uncompressed tarball of this interpreter's pure-Python stdlib (no site-packages,
    byte-code, extension modules or build config), made once; its path and file count.

    Entries are sorted and their owner and times fixed, so the same Python version always
    gives the same bytes. Uncompressed, so the unpack times the filesystem, not gzip.
    """
    version = ".".join(str(v) for v in sys.version_info[:3])
    path = os.path.join(cache_dir, f"cpython-{version}-stdlib.tar")
    if not os.path.exists(path):
        stdlib = sysconfig.get_paths()["stdlib"]
        progress(f"making {path} from {stdlib}")
        members: list[str] = []
        for dirpath, dirnames, filenames in os.walk(stdlib):
            dirnames.sort()
            for name in [*dirnames, *filenames]:
                relative = os.path.relpath(os.path.join(dirpath, name), stdlib)
                if _in_tree(relative):
                    members.append(relative)
        members.sort()
        os.makedirs(cache_dir, exist_ok=True)

        def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = 1_700_000_000
            return info

        with tarfile.open(path + ".tmp", "w", format=tarfile.PAX_FORMAT) as archive:
            for relative in members:
                archive.add(
                    os.path.join(stdlib, relative),
                    arcname=os.path.join("stdlib", relative),
                    recursive=False,
                    filter=normalise,
                )
        os.replace(path + ".tmp", path)
    with tarfile.open(path) as archive:
        files = sum(1 for m in archive if not m.isdir())
    return path, files


# -- fio -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FioRun:
    """What one fio job did: bytes moved, I/Os issued, seconds (fio's own job runtime)."""

    bytes: int
    ios: int
    seconds: float


def fio(path: str, rw: str, *, block: str, size_mib: int, extra: Sequence[str] = ()) -> FioRun:
    """Run one fio job on ``path``: synchronous pread/pwrite (psync) through the page
    cache (direct=0), no fadvise(DONTNEED) before the job (invalidate=0: warm must stay
    warm), no fallocate (not every FUSE server has it)."""
    argv = [
        "fio",
        "--output-format=json",
        "--name=bench",
        f"--filename={path.replace(':', chr(92) + ':')}",
        f"--rw={rw}",
        f"--bs={block}",
        f"--size={size_mib}M",
        "--ioengine=psync",
        "--direct=0",
        "--invalidate=0",
        "--fallocate=none",
        *extra,
    ]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"fio {rw} on {path} did not finish in {TOOL_TIMEOUT:.0f}s") from None
    if done.returncode != 0:
        raise BenchError(f"fio {rw} on {path} failed (status {done.returncode}):\n{done.stderr}")
    try:  # fio may print warnings before the JSON document
        report = json.loads(done.stdout[done.stdout.index("{") :])
        job = report["jobs"][0]
        side = job["write" if "write" in rw else "read"]
        run = FioRun(int(side["io_bytes"]), int(side["total_ios"]), int(side["runtime"]) / 1000)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise BenchError(f"cannot read fio's report ({exc!r}):\n{done.stdout[:2000]}") from None
    if job.get("error"):
        raise BenchError(f"fio {rw} on {path} reported error {job['error']}")
    if run.seconds <= 0 or run.ios == 0:
        raise BenchError(f"fio {rw} on {path} did no measurable I/O")
    return run


def write_file(target: Target, name: str, size_mib: int) -> None:
    """Lay a file out through the target (not timed), on disk when it returns."""
    fio(os.path.join(target.root, name), "write", block="1M", size_mib=size_mib)
    sync_file(os.path.join(target.backing, name))


def read_through(path: str) -> None:
    """Read a whole file once (not timed), so the caches it fills are warm."""
    with open(path, "rb", buffering=0) as f:
        while f.read(MIB):
            pass


# -- workloads -----------------------------------------------------------------------------

Workload = Callable[["Context", Target], dict[str, Sample]]


@dataclasses.dataclass(frozen=True)
class Context:
    """What every workload needs besides its target."""

    config: Config
    tarball: str
    tree_files: int


def seqwrite(ctx: Context, target: Target) -> dict[str, Sample]:
    """fio: write the file in 1 MiB blocks, fsync at the end (fio's end_fsync).

    Then fsync the backing file itself and count that time too: a FUSE server that does
    not pass fsync on (pyfuse3's example has no fsync handler, and the kernel takes ENOSYS
    as success) would otherwise be timed without its disk writes.
    """
    name = "seq.dat"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(target.root, name))
    os.sync()
    with Watch(target.pid) as watch:
        run = fio(
            os.path.join(target.root, name),
            "write",
            block="1M",
            size_mib=ctx.config.size_mib,
            extra=["--end_fsync=1"],
        )
        seconds = run.seconds + sync_file(os.path.join(target.backing, name))
    return {"seqwrite": Sample(run.bytes / seconds / MB, watch.cpu)}


def seqread(ctx: Context, target: Target) -> dict[str, Sample]:
    """fio: read the file in 1 MiB blocks after dropping caches, then again (warm)."""
    path = os.path.join(target.root, "seq.dat")
    if not _has_size(path, ctx.config.size_mib):
        write_file(target, "seq.dat", ctx.config.size_mib)
    out: dict[str, Sample] = {}
    for key in ("seqread-cold", "seqread-warm"):
        if key.endswith("cold"):
            drop_caches()
        with Watch(target.pid) as watch:
            run = fio(path, "read", block="1M", size_mib=ctx.config.size_mib)
        out[key] = Sample(run.bytes / run.seconds / MB, watch.cpu)
    os.unlink(path)
    return out


def randread(ctx: Context, target: Target) -> dict[str, Sample]:
    """fio: 4 KiB random reads of a file. Cold: after dropping caches, a quarter of the
    file's blocks, each once (fio's random map), in the same order on every target
    (randrepeat). Warm: after one whole read of the file, ``--seconds`` of reads."""
    size = ctx.config.rand_mib
    path = os.path.join(target.root, "rand.dat")
    if not _has_size(path, size):
        write_file(target, "rand.dat", size)
    out: dict[str, Sample] = {}
    drop_caches()
    with Watch(target.pid) as watch:
        run = fio(
            path, "randread", block="4k", size_mib=size, extra=[f"--io_size={max(size // 4, 1)}M"]
        )
    out["randread-cold"] = Sample(run.ios / run.seconds, watch.cpu)
    read_through(path)
    with Watch(target.pid) as watch:
        run = fio(
            path,
            "randread",
            block="4k",
            size_mib=size,
            extra=["--time_based", f"--runtime={ctx.config.seconds}"],
        )
    out["randread-warm"] = Sample(run.ios / run.seconds, watch.cpu)
    os.unlink(path)
    return out


def meta(ctx: Context, target: Target) -> dict[str, Sample]:
    """Python: create (empty, O_EXCL), stat (warm, after one untimed pass), list
    (``os.listdir``, ``LIST_REPEATS`` times), stat cold, unlink; all in one directory.

    The creates, like the unpack, start right after drop_caches. Without it they are
    timed against whatever the targets before them deleted: ext4 will not hand out an
    inode freed in the last few seconds while its inode-table block is still cached, and
    checks each such inode in turn (``recently_deleted`` in ``find_inode_bit``, 34% of a
    slowed unpack's samples in perf). After a few create-and-delete rounds a native unpack
    took 1.4 s instead of 0.09 s, all of it system time, so native's figure depended on
    which target ran before it. Dropping the caches resets that, for every target alike.
    """
    n = ctx.config.files
    directory = os.path.join(target.root, "meta")
    if os.path.exists(directory):
        shutil.rmtree(directory)
    os.mkdir(directory)
    paths = [os.path.join(directory, f"f{i:06d}") for i in range(n)]
    out: dict[str, Sample] = {}

    def timed(key: str, op: Callable[[str], object], count: int = n) -> None:
        with Watch(target.pid) as watch:
            for path in paths:
                op(path)
        out[key] = Sample(count / watch.wall, watch.cpu)

    drop_caches()  # see meta's docstring
    timed("create", _create_empty)
    for path in paths:
        os.stat(path)
    timed("stat-warm", os.stat)
    with Watch(target.pid) as watch:
        for _ in range(LIST_REPEATS):
            if len(os.listdir(directory)) != n:
                raise BenchError(f"{target.name}: listing {directory} did not show {n} files")
    out["list"] = Sample(n * LIST_REPEATS / watch.wall, watch.cpu)
    drop_caches()
    timed("stat-cold", os.stat)
    os.sync()
    timed("unlink", os.unlink)
    os.rmdir(directory)
    return out


def untar(ctx: Context, target: Target) -> dict[str, Sample]:
    """``tar -xf`` the source tree into an empty directory; its wall-clock seconds.

    Starts after drop_caches (see ``meta`` for why); the tarball is then read once, so
    only the writes are timed. Nothing is fsynced (an unpack does not); the next workload
    writes back what is left dirty before it starts.
    """
    directory = os.path.join(target.root, "untar")
    if os.path.exists(directory):
        shutil.rmtree(directory)
    os.mkdir(directory)
    drop_caches()  # see meta's docstring
    read_through(ctx.tarball)
    with Watch(target.pid) as watch:
        _tar_x(ctx.tarball, directory)
    shutil.rmtree(directory)
    return {"untar": Sample(watch.wall, watch.cpu)}


def _tar_x(tarball: str, directory: str) -> None:
    try:
        done = subprocess.run(
            ["tar", "-xf", tarball, "-C", directory],
            check=False,
            capture_output=True,
            text=True,
            timeout=TOOL_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"tar -x into {directory} did not finish in {TOOL_TIMEOUT:.0f}s") from None
    if done.returncode != 0:
        raise BenchError(f"tar -x into {directory} failed:\n{done.stderr[-2000:]}")


def _create_empty(path: str) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))


def _has_size(path: str, size_mib: int) -> bool:
    try:
        return os.stat(path).st_size == size_mib * MIB
    except FileNotFoundError:
        return False


WORKLOAD_FUNCTIONS: dict[str, Workload] = {
    "seqwrite": seqwrite,
    "seqread": seqread,
    "randread": randread,
    "meta": meta,
    "untar": untar,
}


# -- the benchmark -------------------------------------------------------------------------


@dataclasses.dataclass
class Report:
    """Everything one run measured, and what it ran on."""

    config: Config
    disk: str = ""
    tree_files: int = 0
    example: str = ""
    results: Results = dataclasses.field(default_factory=dict)


def run_benchmark(config: Config, report: Report) -> None:
    """Set every target up (all before measuring, so a missing piece fails early), run
    each workload on each target in turn, and take everything down again."""
    if os.geteuid() != 0:
        raise BenchError("run as root: cold runs drop the kernel's caches, and FUSE mounts")
    for tool in ("fio", "fusermount3", "findmnt", "fincore", "tar"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed (make setup installs what is needed)")
    tarball, report.tree_files = source_tarball(config.cache_dir)
    script = example_script(config.cache_dir) if "example" in config.targets else ""
    if script:
        report.example = f"pyfuse3 {importlib.metadata.version('pyfuse3')} {script}"
    os.makedirs(config.parent, exist_ok=True)
    tmp = os.path.realpath(tempfile.mkdtemp(prefix="boxvol-fuse-", dir=config.parent))
    stack = contextlib.ExitStack()
    try:
        stack.callback(remove_workdir, tmp)
        targets: list[Target] = [native_target(tmp)]
        check_drop_caches(targets[0].root)
        if "boxvol" in config.targets:
            progress("starting boxvold and exporting a volume")
            targets.append(stack.enter_context(boxvol_target(tmp)))
        if "example" in config.targets:
            progress("mounting pyfuse3's passthroughfs.py")
            targets.append(stack.enter_context(example_target(tmp, script)))
        report.disk = check_same_disk(targets)
        ctx = Context(config, tarball, report.tree_files)
        for workload in config.workloads:
            if workload == "scale":  # its own daemon and report (measure_scale)
                continue
            for rep in range(config.repeat):
                # Every other repetition in reverse order, so no target always runs right
                # after the same other one (whose writeback or evictions it would inherit).
                for target in targets if rep % 2 == 0 else targets[::-1]:
                    progress(f"{workload} on {target.name} ({rep + 1}/{config.repeat})")
                    try:
                        samples = WORKLOAD_FUNCTIONS[workload](ctx, target)
                    except OSError as exc:  # e.g. ENOTCONN: the FUSE server died
                        raise BenchError(f"{workload} on {target.name}: {exc}") from exc
                    for key, sample in samples.items():
                        report.results.setdefault(key, {}).setdefault(target.name, []).append(
                            sample
                        )
    finally:
        with deferred_signals():
            stack.close()


# -- the report ----------------------------------------------------------------------------


def _ratio(value: float, base: float) -> float:
    return value / base if base > 0 else float("nan")


def _figure(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def format_report(report: Report) -> str:
    """The tables this benchmark prints."""
    config = report.config
    fuse_targets = [t for t in TARGETS[1:] if t in config.targets]
    out: list[str] = [
        f"boxvol FUSE data path vs a native directory, one run, one disk: {report.disk}",
        f"each figure is the median of {config.repeat} repetition"
        f"{'' if config.repeat == 1 else 's'}, the targets taking turns",
        "fio --ioengine=psync --direct=0 --invalidate=0 (writes: --end_fsync=1 plus an fsync "
        "of the backing file); cold = after drop_caches",
    ]
    if "example" in config.targets:
        out.append(f"example = {report.example}")
    out.append(
        "ratio = target / native (for the unpack: its time / native's time, lower is better); "
        "CPU s = user+system seconds of the FUSE server process during the workload"
    )
    out.append("")
    header = f"{'workload':<34}{'unit':<10}{'native':>10}"
    for name in fuse_targets:
        header += f"{name:>11}{'ratio':>8}{'CPU s':>8}"
    out.append(header)
    out.append("-" * len(header))
    all_rows = rows(config, report.tree_files)
    for row in all_rows:
        if row.key not in report.results:
            continue
        measured = {name: median_sample(s) for name, s in report.results[row.key].items()}
        native = measured.get("native")
        line = f"{row.label:<34}{row.unit:<10}"
        line += f"{_figure(native.value):>10}" if native else f"{'-':>10}"
        for name in fuse_targets:
            sample = measured.get(name)
            if sample is None:
                line += f"{'-':>11}{'-':>8}{'-':>8}"
                continue
            shown = f"{_ratio(sample.value, native.value):.2f}x" if native else "-"
            cpu = f"{sample.cpu:.2f}" if sample.cpu is not None else "-"
            line += f"{_figure(sample.value):>11}{shown:>8}{cpu:>8}"
        out.append(line)
    noisy = [
        f"{row.key} on {name} {max(v) / min(v):.1f}x"
        for row in all_rows
        for name, samples in report.results.get(row.key, {}).items()
        if len(v := [s.value for s in samples]) > 1 and min(v) > 0 and max(v) / min(v) > NOISY
    ]
    if noisy:
        out.append(
            f"noisy (slowest and fastest repetition more than {NOISY}x apart; the host is "
            f"busy, compare with care or run again): {', '.join(noisy)}"
        )
    out.append("")
    by_key = {row.key: row for row in all_rows}
    target_header = f"{'target (for boxvol; the example for reference)':<48}"
    for name in fuse_targets:
        target_header += f"{name:>16}"
    out.append(target_header)
    out.append("-" * len(target_header))
    for goal in GOALS:
        line = f"{goal.label:<48}"
        measured = {name: median_sample(s) for name, s in report.results.get(goal.row, {}).items()}
        for name in fuse_targets:
            sample, base = measured.get(name), measured.get(goal.baseline)
            if name == goal.baseline:
                verdict = "-"
            elif sample is None or base is None:
                verdict = "not measured"
            else:
                ratio = _ratio(sample.value, base.value)
                ok = goal.met(ratio, by_key[goal.row])
                verdict = f"{ratio:.2f}x {'PASS' if ok else 'FAIL'}"
            line += f"{verdict:>16}"
        out.append(line)
    return "\n".join(out)


# -- command line --------------------------------------------------------------------------


def _choices(allowed: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        chosen = {item.strip() for item in text.split(",") if item.strip()}
        unknown = chosen - set(allowed)
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(
                f"choose from {','.join(allowed)} (comma-separated), not {text!r}"
            )
        return tuple(item for item in allowed if item in chosen)

    return parse


def build_parser() -> argparse.ArgumentParser:
    """Options of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument(
        "--size-mib", type=positive_int, default=256, help="sequential file size (MiB)"
    )
    parser.add_argument(
        "--rand-mib", type=positive_int, default=64, help="random-read file size (MiB)"
    )
    parser.add_argument("--files", type=positive_int, default=5000, help="files for create/stat/…")
    parser.add_argument(
        "--seconds", type=positive_int, default=5, help="duration of the warm random reads"
    )
    parser.add_argument(
        "--repeat",
        type=positive_int,
        default=3,
        help="runs of each workload on each target; the report shows the median",
    )
    parser.add_argument(
        "--only",
        type=_choices(WORKLOADS),
        default=WORKLOADS,
        metavar="WORKLOAD[,…]",
        help=f"run only these workloads: {','.join(WORKLOADS)}",
    )
    parser.add_argument(
        "--targets",
        type=_choices(TARGETS),
        default=TARGETS,
        metavar="TARGET[,…]",
        help=f"targets to measure (native is always one): {','.join(TARGETS)}",
    )
    parser.add_argument(
        "--dir",
        default=DEFAULT_PARENT,
        help=f"where the run's temporary directory goes (default {DEFAULT_PARENT})",
    )
    parser.add_argument(
        "--cache-dir",
        default=DEFAULT_CACHE,
        help="where pyfuse3's sdist and the source tarball are kept between runs",
    )
    return parser


# -- scale: one server process per export ---------------------------------------------

SCALE_EXPORTS = 100
LATENCY_EXPORTS = 20
PARALLEL_FILES = 2000
API_PROBES = 1000


def _pss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    raise BenchError(f"no Pss in /proc/{pid}/smaps_rollup")


def _creates_per_second(directories: Sequence[str], files: int) -> float:
    """Create ``files`` empty files in each directory, one process per directory at once;
    all the files created per second of wall-clock time."""
    script = (
        "import os, sys\n"
        "d = sys.argv[1]\n"
        "for i in range(int(sys.argv[2])):\n"
        "    os.close(os.open(os.path.join(d, f'f{i}'), os.O_CREAT | os.O_WRONLY, 0o644))\n"
    )
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", script, d, str(files)]) for d in directories]
    for proc in procs:
        if proc.wait(TOOL_TIMEOUT) != 0:
            raise BenchError("a create process failed")
    return len(directories) * files / (time.perf_counter() - start)


def _api_p95(client: Client) -> float:
    """p95 of ``GET /v1/health`` in ms: an answer whose size does not grow with the
    exports, so what changes is only what boxvold's loop has to do besides."""
    latencies = []
    for _ in range(API_PROBES):
        start = time.perf_counter()
        client.health()
        latencies.append(time.perf_counter() - start)
    latencies.sort()
    return latencies[int(0.95 * (len(latencies) - 1))] * 1000


def measure_scale(tmp: str) -> list[tuple[str, str, str, bool]]:
    """The per-export-process rows of issue 10: (label, measured, target, met)."""
    with running_daemon(tmp) as socket_path:
        client = Client(socket_path, timeout=120.0)
        api_before = _api_p95(client)
        progress("scale: export create to mounted")
        latencies = []
        exports = []
        for index in range(LATENCY_EXPORTS):
            client.create_volume(f"scale-{index:03d}")
            start = time.perf_counter()
            exports.append(create_export(client, f"scale-{index:03d}"))
            latencies.append(time.perf_counter() - start)
            if not os.path.ismount(exports[-1]["mountpoint"]):
                raise BenchError(f"export {exports[-1]['id']} answered before it was mounted")
        create_p50 = statistics.median(latencies) * 1000
        pss = statistics.median(_pss_mib(int(e["server"]["pid"])) for e in exports)
        progress("scale: two exports creating files at once")
        alone = _creates_per_second([exports[0]["mountpoint"]], PARALLEL_FILES)
        pair = _creates_per_second(
            [os.path.join(exports[1]["mountpoint"]), os.path.join(exports[2]["mountpoint"])],
            PARALLEL_FILES,
        )
        progress(f"scale: {SCALE_EXPORTS} exports at once")
        for index in range(LATENCY_EXPORTS, SCALE_EXPORTS):
            client.create_volume(f"scale-{index:03d}")
            exports.append(create_export(client, f"scale-{index:03d}"))
        serving = sum(1 for e in exports if os.listdir(e["mountpoint"]) is not None)
        api_after = _api_p95(client)
        for export in exports:
            client.request("DELETE", f"/v1/exports/{export['id']}")
    api_ratio = api_after / api_before if api_before > 0 else float("inf")
    return [
        (
            "export create to mounted, p50",
            f"{create_p50:.0f} ms",
            "<= 300 ms",
            create_p50 <= 300,
        ),
        ("memory per export server (PSS)", f"{pss:.1f} MiB", "<= 20 MiB", pss <= 20),
        (
            "two exports, parallel creates",
            f"{pair / alone:.2f}x one alone ({pair:.0f} vs {alone:.0f}/s)",
            ">= 1.6x",
            pair / alone >= 1.6,
        ),
        (
            f"{SCALE_EXPORTS} exports at once",
            f"{serving} serve; API p95 {api_after:.1f} vs {api_before:.1f} ms ({api_ratio:.2f}x)",
            "all serve, p95 within 1.2x",
            serving == SCALE_EXPORTS and api_ratio <= 1.2,
        ),
    ]


def format_scale(rows: Sequence[tuple[str, str, str, bool]]) -> str:
    """The scale rows as a table, each beside its target."""
    header = f"{'per-export servers':<34}{'measured':<44}{'target':<28}result"
    lines = [header, "-" * len(header)]
    for label, measured, target, met in rows:
        lines.append(f"{label:<34}{measured:<44}{target:<28}{'PASS' if met else 'FAIL'}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its report; 0 unless the run itself failed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if "native" not in args.targets:
        parser.error("--targets must include native: every ratio is against it")
    interrupt_on_sigterm()
    config = Config(
        size_mib=args.size_mib,
        rand_mib=args.rand_mib,
        files=args.files,
        seconds=args.seconds,
        targets=args.targets,
        workloads=args.only,
        repeat=args.repeat,
        parent=os.path.abspath(args.dir),
        cache_dir=os.path.abspath(args.cache_dir),
    )
    report = Report(config)
    scale: list[tuple[str, str, str, bool]] = []
    try:
        run_benchmark(config, report)
        if "boxvol" in config.targets and "scale" in config.workloads:
            with tempfile.TemporaryDirectory(prefix="boxvol-fuse-scale-", dir=config.parent) as tmp:
                scale = measure_scale(tmp)
    except KeyboardInterrupt:
        sys.stderr.write("fuse: interrupted\n")
        return 130
    except (BenchError, BoxvolError, RuntimeError, OSError) as exc:
        sys.stderr.write(f"fuse: the benchmark failed: {exc}\n")
        return 1
    print(format_report(report))
    if scale:
        print()
        print(format_scale(scale))
    return 0


if __name__ == "__main__":
    sys.exit(main())
