"""virtio-fs data-path benchmark: ``via=direct`` against ``via=fuse``, inside one real guest.

Starts a throw-away boxvold (home and runtime dir in a 0755 temporary directory under /tmp,
so QEMU, running as libvirt-qemu, can reach its vhost-user sockets), creates three named
volumes and boots ONE TCG test guest (guest/build.py) through libvirtd, with each volume
attached by vmdriver as a user would (``prepare``, then ``attach --config``):

- ``vbench-direct`` at ``/direct``, ``via=direct`` (virtiofsd on the volume itself);
- ``vbench-fuse`` at ``/fuse``, ``via=fuse`` (virtiofsd on the export's FUSE view);
- ``vbench-ctl`` at ``/ctl``, read-only: holds the guest's script (the kernel command line
  has no room for it), read once at boot and not measured.

Inside the guest, for each share in turn (the order alternates between repetitions, all in
the same boot), the script measures: write ``--write-mib`` MiB with ``dd bs=1M conv=fsync``;
read it back with ``dd`` after dropping the guest's caches; create ``--files`` empty files
(``: > f`` in a shell loop: no fork per file); stat them after dropping the guest's caches
(the shell's builtin ``[ -e f ]``, so every one is a LOOKUP through virtio-fs); remove them
(one ``rm -r``). It prints ``BENCH via=V op=OP rep=N seconds=S`` lines on its console; the
host parses them and prints, per operation, the median seconds of ``direct`` and ``fuse``
and the ratio fuse/direct, their sum, and the issue's target (``fuse`` at most 1.3x
``direct`` on the sum) with PASS/FAIL.

A benchmark reports, it does not test: the exit code is 0 whether or not the target is met
(1 if the run itself failed, 130 if interrupted). The domain, the exports (and their
virtiofsd), the volumes, boxvold and the temporary directory are gone when it returns, also
on an error, Ctrl-C or SIGTERM. Needs root (qemu:///system, virtiofsd). See bench/VIRTIOFS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import libvirt

from bench.control_plane import interrupt_on_sigterm, positive_int, running_daemon
from guest.build import build_guest, default_out_dir
from guest.domain import ensure_libvirt, guest_domain_xml
from guest.processes import processes_naming
from vmdriver.backends.libvirt import LibvirtDriver, ensure_event_loop
from volumed.client import Client
from volumed.errors import BoxvolError
from volumed.exports import Via
from volumed.locations import Layout

URI = "qemu:///system"
DOMAIN_PREFIX = "boxvol-vbench-"
VOLUMES = {"direct": "vbench-direct", "fuse": "vbench-fuse"}
CTL_VOLUME = "vbench-ctl"
VIAS: tuple[Via, ...] = ("direct", "fuse")
OPS = ("write", "read", "create", "stat", "remove")
MARKER = "BOXVOL-GUEST: "
TARGET = 1.3
_BENCH_LINE = re.compile(r"BENCH via=(\w+) op=(\w+) rep=(\d+) seconds=(\d+\.\d+)")

#: The guest's script; ``{mib}``, ``{files}`` and ``{repeat}`` are filled in. busybox ash.
GUEST_SCRIPT = r"""
M={mib}; N={files}; R={repeat}
fail() {{ echo "BENCH-ERROR $*"; exit 1; }}
drop() {{ sync; echo 3 > /proc/sys/vm/drop_caches || fail drop_caches; }}
t=$(date +%N 2>/dev/null)
case "$t" in
  ''|*N*) echo "BENCH-CLOCK uptime"
    now() {{
      read u rest < /proc/uptime; s=${{u%.*}}; c=${{u#*.}}
      echo $(( s * 1000000000 + (1$c - 100) * 10000000 ))
    }} ;;
  *) echo "BENCH-CLOCK date"; now() {{ date +%s%N; }} ;;
esac
emit() {{
  d=$(( $5 - $4 ))
  printf 'BENCH via=%s op=%s rep=%s seconds=%d.%06d\n' "$1" "$2" "$3" \
    $((d / 1000000000)) $(( (d % 1000000000) / 1000 ))
}}
run() {{
  v=$1; b=$2/bench; r=$3
  rm -rf "$b"; mkdir -p "$b/f" || fail "mkdir $b"
  drop
  t0=$(now)
  dd if=/dev/zero of="$b/big" bs=1M count=$M conv=fsync 2>/dev/null || fail "write $v"
  t1=$(now)
  emit "$v" write "$r" "$t0" "$t1"
  drop
  t0=$(now); dd if="$b/big" of=/dev/null bs=1M 2>/dev/null || fail "read $v"; t1=$(now)
  emit "$v" read "$r" "$t0" "$t1"
  rm -f "$b/big"; sync
  t0=$(now); i=0
  while [ $i -lt $N ]; do : > "$b/f/$i" || fail "create $v $i"; i=$((i + 1)); done
  t1=$(now); emit "$v" create "$r" "$t0" "$t1"
  drop
  t0=$(now); i=0
  while [ $i -lt $N ]; do [ -e "$b/f/$i" ] || fail "stat $v $i"; i=$((i + 1)); done
  t1=$(now); emit "$v" stat "$r" "$t0" "$t1"
  t0=$(now); rm -r "$b/f" || fail "remove $v"; t1=$(now)
  emit "$v" remove "$r" "$t0" "$t1"
  rm -rf "$b"
}}
r=1
while [ $r -le $R ]; do
  if [ $((r % 2)) = 1 ]; then run direct /direct $r; run fuse /fuse $r
  else run fuse /fuse $r; run direct /direct $r; fi
  r=$((r + 1))
done
echo BENCH-DONE
"""


class BenchError(Exception):
    """The benchmark itself could not run."""


@dataclasses.dataclass(frozen=True)
class Config:
    write_mib: int
    files: int
    repeat: int
    timeout: float
    keep_console: str | None


def progress(message: str) -> None:
    """One line of progress on stderr (stdout carries only the report)."""
    sys.stderr.write(f"virtiofs: {message}\n")
    sys.stderr.flush()


# -- libvirt and the guest -------------------------------------------------------------------


def ensure_libvirt_for_bench() -> None:
    """libvirtd and virtlogd up, with libvirt's event loop registered first."""
    ensure_event_loop()  # before any connection; it also silences libvirt's stderr
    try:
        ensure_libvirt(URI, say=progress)
    except TimeoutError as exc:
        raise BenchError(str(exc)) from None


def add_cmdline_word(conn: Any, name: str, word: str) -> None:
    """Append ``word`` to the persistent definition's kernel command line."""
    dom = conn.lookupByName(name)
    root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    cmdline = root.find("./os/cmdline")
    if cmdline is None:
        raise BenchError(f"{name} has no <cmdline>")
    cmdline.text = f"{cmdline.text or ''} {word}".strip()
    conn.defineXML(ET.tostring(root, encoding="unicode"))


def read_console(path: Path) -> str:
    try:
        return path.read_text(errors="replace").replace("\r", "")
    except FileNotFoundError:
        return ""


def run_guest(conn: Any, name: str, console_log: Path, timeout: float) -> tuple[str, float]:
    """Boot the domain, echo its BENCH lines to stderr as they come, wait for it to power
    off; the console text and the wall seconds."""
    started = time.monotonic()
    dom = conn.lookupByName(name)
    dom.create()
    shown = 0
    while True:
        lines = [ln for ln in read_console(console_log).splitlines() if "BENCH" in ln]
        for line in lines[shown:]:
            progress(f"guest: {line.strip()}")
        shown = len(lines)
        if not dom.isActive():
            break
        if time.monotonic() - started > timeout:
            tail = "\n".join(read_console(console_log).splitlines()[-30:])
            raise BenchError(f"{name} still running after {timeout:.0f} s; console:\n{tail}")
        time.sleep(0.5)
    return read_console(console_log), time.monotonic() - started


# -- clean-up --------------------------------------------------------------------------------


def remove_domain(name: str) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        conn = libvirt.open(URI)
        try:
            dom = conn.lookupByName(name)
            with contextlib.suppress(libvirt.libvirtError):
                if dom.isActive():
                    dom.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefine()
        finally:
            conn.close()


def remove_exports_and_volumes(socket_path: str) -> None:
    """Delete every export (boxvold stops its virtiofsd) and the benchmark's volumes."""
    client = Client(socket_path, timeout=30)
    with contextlib.suppress(BoxvolError):
        for export in client.list_exports():
            with contextlib.suppress(BoxvolError):
                client.remove_export(export["id"])
    for volume in (*VOLUMES.values(), CTL_VOLUME):
        with contextlib.suppress(BoxvolError):
            client.remove_volume(volume, force=True)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """No second Ctrl-C or SIGTERM may cut the clean-up short."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def sweep(scratch: str, domain: str) -> None:
    """Kill whatever still serves our directories or runs our domain, unmount, remove."""
    for pid in processes_naming(scratch, f"guest={domain},"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    points: list[str] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            if len(fields) > 4:
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                if point == scratch or point.startswith(f"{scratch}/"):
                    points.append(point)
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    shutil.rmtree(scratch, ignore_errors=True)
    if os.path.exists(scratch):
        progress(f"could not remove {scratch}")


# -- the run ---------------------------------------------------------------------------------


def measure(config: Config) -> tuple[dict[str, dict[str, list[float]]], str, float]:
    """Boot the guest and run the workloads; per op, per via, the seconds of each rep."""
    ensure_libvirt_for_bench()
    image = build_guest(default_out_dir())
    scratch = tempfile.mkdtemp(prefix=DOMAIN_PREFIX, dir="/tmp")
    os.chmod(scratch, 0o755)
    runtime = os.path.join(scratch, "run")
    os.mkdir(runtime, 0o755)
    os.chmod(runtime, 0o755)
    name = f"{DOMAIN_PREFIX}{secrets.token_hex(4)}"
    console_log = Path(scratch) / f"{name}.console.log"
    guest_timeout = int(config.timeout)
    try:
        with running_daemon(scratch) as socket_path:
            try:
                client = Client(socket_path, timeout=60)
                for volume in (*VOLUMES.values(), CTL_VOLUME):
                    client.create_volume(volume, labels={"purpose": "bench-virtiofs"})
                script = GUEST_SCRIPT.format(
                    mib=config.write_mib, files=config.files, repeat=config.repeat
                )
                ctl_dir = Path(Layout(os.path.join(scratch, "home")).named) / CTL_VOLUME
                (ctl_dir / "run.sh").write_text(script)
                conn = libvirt.open(URI)
                try:
                    conn.defineXML(
                        guest_domain_xml(
                            name, image, console_log, script=None, timeout=guest_timeout
                        )
                    )
                    with LibvirtDriver(client, URI) as driver:
                        driver.prepare(name)
                        for via in VIAS:
                            driver.attach(name, [f"{VOLUMES[via]}:/{via}"], via=via)
                        [ctl] = driver.attach(name, [f"{CTL_VOLUME}:/ctl:ro"])
                    add_cmdline_word(conn, name, f"boxvol.script={ctl.tag}:run.sh")
                    progress(
                        f"booting {name} (TCG): {config.repeat} x ({config.write_mib} MiB, "
                        f"{config.files} files) on each share"
                    )
                    console, seconds = run_guest(conn, name, console_log, config.timeout + 60)
                finally:
                    conn.close()
                if config.keep_console:
                    shutil.copyfile(console_log, config.keep_console)
            finally:
                with signals_held():
                    remove_domain(name)
                    remove_exports_and_volumes(socket_path)
    finally:
        with signals_held():
            remove_domain(name)
            sweep(scratch, name)
    return parse_console(console, config), console, seconds


def parse_console(console: str, config: Config) -> dict[str, dict[str, list[float]]]:
    """The BENCH lines, checked complete: op -> via -> seconds per repetition."""
    lines = console.splitlines()
    errors = [ln for ln in lines if "BENCH-ERROR" in ln or f"{MARKER}error:" in ln]
    if errors or not any("BENCH-DONE" in ln for ln in lines):
        tail = "\n".join(lines[-30:])
        raise BenchError(f"the guest did not finish its workloads: {errors}\n{tail}")
    results: dict[str, dict[str, list[float]]] = {op: {v: [] for v in VIAS} for op in OPS}
    for line in lines:
        match = _BENCH_LINE.search(line)
        if match:
            via, op, _rep, seconds = match.groups()
            results[op][via].append(float(seconds))
    for op in OPS:
        for via in VIAS:
            if len(results[op][via]) != config.repeat:
                raise BenchError(
                    f"{op} on {via}: {len(results[op][via])} results, not {config.repeat}"
                )
    return results


# -- the report ------------------------------------------------------------------------------


def format_report(
    results: dict[str, dict[str, list[float]]], config: Config, clock: str, seconds: float
) -> str:
    labels = {
        "write": f"write {config.write_mib} MiB + fsync",
        "read": f"read {config.write_mib} MiB, guest caches dropped",
        "create": f"create {config.files} files",
        "stat": f"stat {config.files} files, guest caches dropped",
        "remove": f"remove {config.files} files",
    }
    width = max(len(v) for v in labels.values()) + 2
    runs = {op: {v: " ".join(f"{x:.2f}" for x in results[op][v]) for v in VIAS} for op in OPS}
    runs_width = max(len(runs[op]["direct"]) for op in OPS) + 3
    out = [
        f"virtio-fs in one TCG guest: direct vs fuse, median of {config.repeat} "
        f"(order alternating), guest clock {clock}, domain ran {seconds:.0f} s",
        "",
        f"{'operation':<{width}}{'direct s':>10}{'fuse s':>10}{'fuse/direct':>13}"
        f"   {'direct runs':<{runs_width}}fuse runs",
    ]
    sums = {v: 0.0 for v in VIAS}
    for op in OPS:
        med = {v: statistics.median(results[op][v]) for v in VIAS}
        for v in VIAS:
            sums[v] += med[v]
        out.append(
            f"{labels[op]:<{width}}{med['direct']:>10.2f}{med['fuse']:>10.2f}"
            f"{_ratio(med['fuse'], med['direct']):>13}   "
            f"{runs[op]['direct']:<{runs_width}}{runs[op]['fuse']}"
        )
    ratio = sums["fuse"] / sums["direct"] if sums["direct"] > 0 else float("inf")
    out.append(
        f"{'sum of medians':<{width}}{sums['direct']:>10.2f}{sums['fuse']:>10.2f}"
        f"{_ratio(sums['fuse'], sums['direct']):>13}"
    )
    out += [
        "",
        "target:",
        f"  fuse at most {TARGET}x direct on the sum: {ratio:.2f}x "
        f"{'PASS' if ratio <= TARGET else 'FAIL'}",
    ]
    return "\n".join(out)


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base > 0 else "-"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/virtiofs.py",
        description="virtio-fs via=direct against via=fuse, measured inside one TCG guest.",
    )
    parser.add_argument("--write-mib", type=positive_int, default=64, help="file size (64)")
    parser.add_argument("--files", type=positive_int, default=1000, help="files (1000)")
    parser.add_argument("--repeat", type=positive_int, default=3, help="repetitions (3)")
    parser.add_argument(
        "--timeout", type=positive_int, default=3600, help="guest time limit, seconds (3600)"
    )
    parser.add_argument("--keep-console", metavar="FILE", help="copy the guest console here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0:
        progress("run as root (qemu:///system, virtiofsd, drop_caches)")
        return 1
    config = Config(args.write_mib, args.files, args.repeat, float(args.timeout), args.keep_console)
    interrupt_on_sigterm()
    try:
        results, console, seconds = measure(config)
    except KeyboardInterrupt:
        progress("interrupted; cleaned up")
        return 130
    except (
        BenchError,
        BoxvolError,
        libvirt.libvirtError,
        OSError,
        subprocess.SubprocessError,
    ) as exc:
        progress(f"failed: {type(exc).__name__}: {exc}")
        return 1
    clock = "date +%s%N" if "BENCH-CLOCK date" in console else "/proc/uptime (10 ms)"
    print(format_report(results, config, clock, seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
