"""Storage benchmark: what a size cap costs. A real boxvold (throw-away home) serves a sized
volume (its own ext4 image, loop-mounted) and a plain one; in the same run:

- sequential write of 48 MiB (fsync at the end) into each, at the volume itself and through
  a FUSE export of each: the sized volume's ratio to the plain one, target >= 0.9x
  ("writes at native speed");
- a runaway writer filling a 64 MiB sized volume until ENOSPC: the time until the refusal,
  against writing the same number of bytes into the plain volume, target <= 1.2x (the cap
  refuses at native speed, with no slow-down as it approaches);
- create-to-usable of a sized volume (mkfs + mount) against a plain one, reported (no
  target: it is paid once).

Medians of 3. A benchmark reports, it does not test: the exit code is 0 whether or not a
target is met.
"""

from __future__ import annotations

import argparse
import errno
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

from bench.control_plane import interrupt_on_sigterm, running_daemon
from volumed.client import Client

CHUNK = 1 << 20
WRITE_MIB = 48
CAP_MIB = 64
WRITE_TARGET = 0.9
ENOSPC_TARGET = 1.2
RUNS = 3


def write_file(path: str, mib: int) -> float:
    """Seconds to write ``mib`` MiB sequentially and fsync."""
    data = b"\xa5" * CHUNK
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(mib):
            os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - started
    os.unlink(path)
    return elapsed


def fill_until_enospc(path: str) -> tuple[float, int]:
    """Seconds until the filesystem refuses, and the bytes it took."""
    data = b"\x5a" * CHUNK
    written = 0
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            try:
                written += os.write(fd, data)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        try:
            os.fsync(fd)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - started
    os.unlink(path)
    return elapsed, written


def median(fn: Callable[..., float], *args: object) -> float:
    """The median of RUNS calls of ``fn(*args)``."""
    return statistics.median(fn(*args) for _ in range(RUNS))


def report(name: str, ratio: float, target: str, ok: bool, detail: str) -> None:
    print(f"{name:<42} {ratio:6.2f}x  target {target:<8} {'PASS' if ok else 'MISS'}  {detail}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print each row beside its target."""
    argparse.ArgumentParser(prog="python -m bench.storage", description=__doc__).parse_args(argv)
    interrupt_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        os.environ.setdefault("BOXVOL_RESERVE_SIZE", "1M")
        with running_daemon(tmp) as socket_path:
            client = Client(socket_path)
            home = os.path.join(tmp, "home", "volumes", "named")
            started = time.perf_counter()
            client.create_volume("plain")
            plain_create = time.perf_counter() - started
            started = time.perf_counter()
            client.create_volume("sized", size_bytes=CAP_MIB << 20)
            sized_create = time.perf_counter() - started
            views = {name: client.create_export(name)["mountpoint"] for name in ("plain", "sized")}
            try:
                for where, paths in (
                    ("at the volume", {n: os.path.join(home, n) for n in ("plain", "sized")}),
                    ("through a FUSE export", views),
                ):
                    plain = median(write_file, os.path.join(paths["plain"], "w"), WRITE_MIB)
                    sized = median(write_file, os.path.join(paths["sized"], "w"), WRITE_MIB)
                    ratio = plain / sized  # throughput of sized relative to plain
                    report(
                        f"seq write {WRITE_MIB} MiB {where}",
                        ratio,
                        f">= {WRITE_TARGET}",
                        ratio >= WRITE_TARGET,
                        f"sized {WRITE_MIB / sized:.0f} MiB/s, plain {WRITE_MIB / plain:.0f} MiB/s",
                    )
                fills = [
                    fill_until_enospc(os.path.join(home, "sized", "runaway")) for _ in range(RUNS)
                ]
                fill_time = statistics.median(t for t, _ in fills)
                took = int(statistics.median(b for _, b in fills)) // CHUNK
                baseline = median(write_file, os.path.join(home, "plain", "w"), took)
                ratio = fill_time / baseline
                report(
                    f"runaway writer to ENOSPC ({took} MiB)",
                    ratio,
                    f"<= {ENOSPC_TARGET}",
                    ratio <= ENOSPC_TARGET,
                    f"{fill_time * 1000:.0f} ms vs {baseline * 1000:.0f} ms for the same bytes",
                )
            finally:
                for export in client.list_exports():
                    client.remove_export(export["id"])
                client.remove_volume("sized")
            print(
                f"{'create to usable (reported)':<42} {sized_create / plain_create:6.2f}x  "
                f"sized {sized_create * 1000:.0f} ms, plain {plain_create * 1000:.0f} ms"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
