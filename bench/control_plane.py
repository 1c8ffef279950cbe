"""Control-plane benchmark: how fast a real boxvold creates, inspects, removes and lists.

Starts a throw-away boxvold (its own home and runtime dir in a temporary directory) and
drives it over its unix socket with ``volumed.client.Client`` from a pool of threads, as
many callers would. Beside it, in the same run, it measures a baseline: the same
operations called directly on ``volumed.store.VolumeStore`` in this process (no HTTP, no
JSON, no thread hops), so the report shows the API's overhead as a ratio rather than as
absolute numbers that only mean something on one machine.

A third part measures responsiveness: ``GET /v1/health`` sampled every 10 ms while another
process runs 20 ``df`` and 1,000 concurrent listings against the same daemon, beside the
same sampling with the daemon idle (the baseline, same run, same daemon).

Targets (on a 2-core host): >= 300 creates/s through the API, a listing of 10,000 volumes
answered in < 200 ms (p95), and ``health`` p99 < 100 ms under that load. A benchmark
reports, it does not test: the exit code is 0 whether or not a target is met (1 only if the
run itself failed).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from volumed.client import Client
from volumed.errors import BoxvolError, DaemonUnavailable
from volumed.locations import SOCKET_NAME
from volumed.store import VolumeStore

#: The venv's bin directory: boxvold and boxvol are the entry points installed there.
BIN = os.path.join(sys.prefix, "bin")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0

CREATE_TARGET_OPS = 300.0
LIST_TARGET_MS = 200.0
HEALTH_TARGET_MS = 100.0
#: How often the responsiveness probe calls ``GET /v1/health``.
HEALTH_INTERVAL = 0.01
#: Samples of the idle daemon's ``health`` (the responsiveness baseline).
HEALTH_BASELINE_SAMPLES = 200


# -- the daemon under test -----------------------------------------------------------------


@contextlib.contextmanager
def running_daemon(tmp: str) -> Iterator[str]:
    """Run a throw-away boxvold with its home and runtime dir under ``tmp``; yield its socket.

    It is stopped with SIGTERM (SIGKILL if it does not stop) whatever happens inside the
    block, Ctrl-C included, so no daemon outlives the benchmark. Its log goes to
    ``tmp/boxvold.log`` (a pipe nobody reads would fill up and stall it).
    """
    home = os.path.join(tmp, "home")
    runtime_dir = os.path.join(tmp, "run")
    socket_path = os.path.join(runtime_dir, SOCKET_NAME)
    log_path = os.path.join(tmp, "boxvold.log")
    command = [os.path.join(BIN, "boxvold"), "--home", home, "--runtime-dir", runtime_dir]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        _wait_until_healthy(proc, socket_path, log_path)
        yield socket_path
    finally:
        _stop(proc)


def interrupt_on_sigterm() -> None:
    """Treat SIGTERM like Ctrl-C, so a benchmark stopped by ``timeout`` or CI still runs
    its clean-up (stopping its boxvold) instead of dying on the spot."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _wait_until_healthy(proc: subprocess.Popen[bytes], socket_path: str, log_path: str) -> None:
    client = Client(socket_path, timeout=2.0)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"boxvold exited with status {proc.returncode} during start-up:\n" + _tail(log_path)
            )
        try:
            client.health()
        except DaemonUnavailable:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"boxvold did not answer GET /v1/health within {START_TIMEOUT:.0f}s:\n"
                    + _tail(log_path)
                ) from None
            time.sleep(0.05)
        else:
            return


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except BaseException:  # e.g. a second Ctrl-C while waiting: still leave nothing behind
        proc.kill()
        proc.wait()
        raise


def _tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


# -- measurements --------------------------------------------------------------------------


def percentile(samples: Sequence[float], pct: float) -> float:
    """The ``pct``-th percentile of ``samples`` (linear interpolation between ranks)."""
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * pct / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclasses.dataclass(frozen=True)
class Phase:
    """One timed phase: its wall-clock time and every operation's latency (seconds)."""

    ops: int
    wall: float
    latencies: list[float]

    @property
    def ops_per_s(self) -> float:
        """Operations completed per second of wall-clock time."""
        return self.ops / self.wall if self.wall > 0 else float("inf")

    def ms(self, pct: float) -> float:
        """Latency percentile in milliseconds."""
        return percentile(self.latencies, pct) * 1000.0


class ApiDriver:
    """Runs one operation per name through a thread pool, one ``Client`` per thread."""

    def __init__(self, socket_path: str, pool: ThreadPoolExecutor) -> None:
        self.socket_path = socket_path
        self.pool = pool
        self._local = threading.local()

    def _client(self) -> Client:
        client: Client | None = getattr(self._local, "client", None)
        if client is None:
            client = Client(self.socket_path, timeout=60.0)
            self._local.client = client
        return client

    def run(self, op: Callable[[Client, str], object], names: Sequence[str]) -> Phase:
        """Apply ``op`` to every name concurrently; raises the first failure."""

        def one(name: str) -> float:
            client = self._client()
            start = time.perf_counter()
            op(client, name)
            return time.perf_counter() - start

        start = time.perf_counter()
        latencies = list(self.pool.map(one, names))
        return Phase(len(names), time.perf_counter() - start, latencies)


def run_inline(op: Callable[[str], object], names: Sequence[str]) -> Phase:
    """Apply ``op`` to every name in this thread, one after another."""
    latencies = []
    start = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        op(name)
        latencies.append(time.perf_counter() - t0)
    return Phase(len(names), time.perf_counter() - start, latencies)


def time_repeated(op: Callable[[], int], repeats: int, expected: int) -> list[float]:
    """Latencies (seconds) of ``repeats`` calls of ``op``, each checked to see ``expected``."""
    latencies = []
    for _ in range(repeats):
        start = time.perf_counter()
        seen = op()
        latencies.append(time.perf_counter() - start)
        if seen != expected:
            raise RuntimeError(f"a listing returned {seen} volumes, expected {expected}")
    return latencies


@dataclasses.dataclass
class Results:
    """Everything one run measured."""

    volumes: int
    list_volumes: int
    list_repeats: int
    workers: int
    api: dict[str, Phase] = dataclasses.field(default_factory=dict)
    base: dict[str, Phase] = dataclasses.field(default_factory=dict)
    api_list: list[float] = dataclasses.field(default_factory=list)
    base_list: list[float] = dataclasses.field(default_factory=list)
    busy_volumes: int = 200
    busy_files: int = 25
    load_dfs: int = 20
    load_lists: int = 1000
    load_rounds: int = 3
    health_idle: list[float] = dataclasses.field(default_factory=list)
    health_loaded: list[float] = dataclasses.field(default_factory=list)
    load_wall: float = 0.0


# -- the benchmark -------------------------------------------------------------------------


def measure_baseline(home: str, names: Sequence[str], results: Results) -> None:
    """Create, inspect and remove ``names`` directly on a VolumeStore in this process."""
    store = VolumeStore.open(home)
    try:
        for name in ("warmup-1", "warmup-2", "warmup-3"):  # first-call costs out of the way
            store.create(name=name)
            store.state(name)
            store.remove(name)
        results.base["create"] = run_inline(lambda name: store.create(name=name), names)
        results.base["inspect"] = run_inline(store.state, names)
        results.base["remove"] = run_inline(store.remove, names)
    finally:
        store.close()


def measure_api(socket_path: str, names: Sequence[str], results: Results) -> None:
    """Create, inspect and remove ``names`` through boxvold, then time large listings."""
    pool = ThreadPoolExecutor(max_workers=results.workers, thread_name_prefix="bench")
    try:
        api = ApiDriver(socket_path, pool)
        api.run(lambda client, _: client.health(), [""] * (results.workers * 4))  # warm-up
        results.api["create"] = api.run(lambda client, name: client.create_volume(name), names)
        results.api["inspect"] = api.run(lambda client, name: client.get_volume(name), names)
        results.api["remove"] = api.run(lambda client, name: client.remove_volume(name), names)

        # Fill the daemon up to the listing size (every volume above was removed again).
        fill = [f"list-{i:06d}" for i in range(results.list_volumes)]
        api.run(lambda client, name: client.create_volume(name), fill)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    client = Client(socket_path, timeout=60.0)
    client.list_volumes()  # warm-up
    results.api_list = time_repeated(
        lambda: len(client.list_volumes()), results.list_repeats, results.list_volumes
    )


def measure_baseline_list(home: str, results: Results) -> None:
    """Time ``VolumeStore.list_volumes`` in-process over the home the daemon filled."""
    store = VolumeStore.open(home)
    try:
        store.list_volumes()  # warm-up
        results.base_list = time_repeated(
            lambda: len(store.list_volumes()), results.list_repeats, results.list_volumes
        )
    finally:
        store.close()


def sample_health(client: Client, until: Callable[[], bool]) -> list[float]:
    """Latencies (seconds) of ``health`` calls, one every ``HEALTH_INTERVAL``, until
    ``until()`` is true."""
    latencies = []
    while not until():
        start = time.perf_counter()
        client.health()
        latencies.append(time.perf_counter() - start)
        time.sleep(HEALTH_INTERVAL)
    return latencies


def _ended(process: multiprocessing.process.BaseProcess) -> bool:
    return not process.is_alive()


def generate_load(socket_path: str, dfs: int, lists: int) -> None:
    """Start ``dfs`` ``df`` calls and ``lists`` listings at once, one thread and connection
    each, and wait for all of them. Runs in a process of its own, so the load's threads do
    not compete with the probe for this process's interpreter."""
    failures: list[BaseException] = []

    def call(op: Callable[[Client], object]) -> None:
        try:
            op(Client(socket_path, timeout=120.0))
        except BaseException as exc:  # reported below, the exit status says it failed
            failures.append(exc)

    threads = [threading.Thread(target=call, args=(Client.disk_usage,)) for _ in range(dfs)]
    threads += [threading.Thread(target=call, args=(Client.list_volumes,)) for _ in range(lists)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        sys.stderr.write(f"control_plane: {len(failures)} load calls failed: {failures[0]!r}\n")
        sys.exit(1)


def measure_responsiveness(socket_path: str, home: str, results: Results) -> None:
    """``health`` latencies with the daemon idle, then while another process loads it
    (``load_rounds`` loads one after another, their samples pooled: one load lasts about
    2 s, too few samples for a p99 of their own)."""
    client = Client(socket_path, timeout=60.0)
    for index in range(results.busy_volumes):
        name = f"busy-{index:04d}"
        client.create_volume(name)
        directory = os.path.join(home, "volumes", "named", name)
        for number in range(results.busy_files):
            with open(os.path.join(directory, f"file-{number:03d}"), "wb") as f:
                f.write(b"x" * 4096)
    client.health()  # warm-up
    samples = iter(range(HEALTH_BASELINE_SAMPLES))
    results.health_idle = sample_health(client, lambda: next(samples, None) is None)

    for _ in range(results.load_rounds):
        load = multiprocessing.get_context("spawn").Process(
            target=generate_load, args=(socket_path, results.load_dfs, results.load_lists)
        )
        start = time.perf_counter()
        load.start()
        try:
            results.health_loaded += sample_health(client, functools.partial(_ended, load))
        finally:
            load.join()
        results.load_wall += time.perf_counter() - start
        if load.exitcode != 0:
            raise RuntimeError(f"the load process failed (exit status {load.exitcode})")


def run_benchmark(results: Results) -> None:
    """Baseline first, then the daemon, then the in-process listing over its (stopped) home,
    then the responsiveness probe on a second daemon."""
    names = [f"bench-{i:06d}" for i in range(results.volumes)]
    with tempfile.TemporaryDirectory(prefix="boxvol-bench-") as tmp:
        measure_baseline(os.path.join(tmp, "baseline-home"), names, results)
        with running_daemon(tmp) as socket_path:
            measure_api(socket_path, names, results)
        measure_baseline_list(os.path.join(tmp, "home"), results)
    with (
        tempfile.TemporaryDirectory(prefix="boxvol-bench-") as tmp,
        running_daemon(tmp) as socket_path,
    ):
        measure_responsiveness(socket_path, os.path.join(tmp, "home"), results)


# -- the report ----------------------------------------------------------------------------


def format_report(results: Results) -> str:
    """The table this benchmark prints."""
    out: list[str] = []
    out.append(
        f"boxvol control plane: {results.volumes} named volumes; API = real boxvold over its "
        f"unix socket, {results.workers} client thread{'' if results.workers == 1 else 's'}; "
        "baseline = VolumeStore in-process, "
        "1 thread"
    )
    out.append("")
    header = f"{'phase':<9}{'metric':<10}{'API':>12}{'baseline':>12}{'API/baseline':>14}"
    out.append(header)
    out.append("-" * len(header))
    for phase in ("create", "inspect", "remove"):
        api, base = results.api[phase], results.base[phase]
        rows: list[tuple[str, float, float, str]] = [
            ("ops/s", api.ops_per_s, base.ops_per_s, "{:.1f}")
        ]
        rows += [(f"p{p} ms", api.ms(p), base.ms(p), "{:.2f}") for p in (50, 95, 99)]
        for metric, api_value, base_value, fmt in rows:
            out.append(
                f"{phase:<9}{metric:<10}{fmt.format(api_value):>12}"
                f"{fmt.format(base_value):>12}{_ratio(api_value, base_value):>14}"
            )
    out.append("")
    out.append(
        f"list {results.list_volumes} volumes, {results.list_repeats} runs "
        "(API: GET /v1/volumes, decoded; baseline: VolumeStore.list_volumes)"
    )
    out.append(header)
    out.append("-" * len(header))
    for label, pct in (("p50 ms", 50.0), ("p95 ms", 95.0), ("max ms", 100.0)):
        api_ms = percentile(results.api_list, pct) * 1000.0
        base_ms = percentile(results.base_list, pct) * 1000.0
        out.append(
            f"{'list':<9}{label:<10}{api_ms:>12.2f}{base_ms:>12.2f}{_ratio(api_ms, base_ms):>14}"
        )
    out.append("")
    out.append(
        f"health every {HEALTH_INTERVAL * 1000:.0f} ms ({results.busy_volumes} volumes of "
        f"{results.busy_files} files); loaded: while another process ran {results.load_dfs} df "
        f"and {results.load_lists} listings at once, {results.load_rounds} times "
        f"({results.load_wall:.1f} s, {len(results.health_loaded)} samples); baseline: the "
        "same daemon idle"
    )
    health_header = f"{'probe':<9}{'metric':<10}{'loaded':>12}{'idle':>12}{'loaded/idle':>14}"
    out.append(health_header)
    out.append("-" * len(health_header))
    for label, pct in (("p50 ms", 50.0), ("p95 ms", 95.0), ("p99 ms", 99.0), ("max ms", 100.0)):
        loaded_ms = percentile(results.health_loaded, pct) * 1000.0
        idle_ms = percentile(results.health_idle, pct) * 1000.0
        out.append(
            f"{'health':<9}{label:<10}{loaded_ms:>12.2f}{idle_ms:>12.2f}"
            f"{_ratio(loaded_ms, idle_ms):>14}"
        )
    out.append("")
    create_ops = results.api["create"].ops_per_s
    list_p95 = percentile(results.api_list, 95.0) * 1000.0
    health_p99 = percentile(results.health_loaded, 99.0) * 1000.0
    targets = [
        (
            f"API creates/s >= {CREATE_TARGET_OPS:.0f}",
            f"{create_ops:.1f}/s",
            create_ops >= CREATE_TARGET_OPS,
        ),
        (
            f"API list of {results.list_volumes} p95 < {LIST_TARGET_MS:.0f} ms",
            f"{list_p95:.1f} ms",
            list_p95 < LIST_TARGET_MS,
        ),
        (
            f"health p99 under load < {HEALTH_TARGET_MS:.0f} ms",
            f"{health_p99:.1f} ms",
            health_p99 < HEALTH_TARGET_MS,
        ),
    ]
    target_header = f"{'target':<40}{'measured':>12}  result"
    out.append(target_header)
    out.append("-" * len(target_header))
    for label, measured, ok in targets:
        out.append(f"{label:<40}{measured:>12}  {'PASS' if ok else 'FAIL'}")
    return "\n".join(out)


def _ratio(api: float, base: float) -> str:
    return f"{api / base:.2f}x" if base > 0 else "-"


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Options of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument(
        "--volumes", type=positive_int, default=1000, help="volumes to create/inspect/remove"
    )
    parser.add_argument(
        "--list-volumes", type=positive_int, default=10000, help="volumes present when listing"
    )
    parser.add_argument("--list-repeats", type=positive_int, default=20, help="listings to time")
    parser.add_argument("--workers", type=positive_int, default=8, help="API client threads")
    parser.add_argument(
        "--busy-volumes", type=positive_int, default=200, help="volumes present under load"
    )
    parser.add_argument(
        "--busy-files", type=positive_int, default=25, help="files in each of those volumes"
    )
    parser.add_argument("--load-dfs", type=positive_int, default=20, help="df calls in the load")
    parser.add_argument(
        "--load-lists", type=positive_int, default=1000, help="concurrent listings in the load"
    )
    parser.add_argument(
        "--load-rounds", type=positive_int, default=3, help="loads, one after another, sampled"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its report; 0 unless the run itself failed."""
    args = build_parser().parse_args(argv)
    interrupt_on_sigterm()
    results = Results(
        volumes=args.volumes,
        list_volumes=args.list_volumes,
        list_repeats=args.list_repeats,
        workers=args.workers,
        busy_volumes=args.busy_volumes,
        busy_files=args.busy_files,
        load_dfs=args.load_dfs,
        load_lists=args.load_lists,
        load_rounds=args.load_rounds,
    )
    try:
        run_benchmark(results)
    except KeyboardInterrupt:
        sys.stderr.write("control_plane: interrupted\n")
        return 130
    except (BoxvolError, RuntimeError, OSError) as exc:
        sys.stderr.write(f"control_plane: the benchmark failed: {exc}\n")
        return 1
    print(format_report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
