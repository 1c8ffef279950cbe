"""CLI start-up benchmark: whole ``boxvol`` processes against ``podman volume``, side by side.

A CLI call is dominated by process start-up (interpreter, imports) rather than by the work
it asks for, so this times whole processes with hyperfine (``-N``: no shell in between):
``boxvol create NAME`` vs ``podman volume create NAME`` and ``boxvol ls`` vs
``podman volume ls``, in one run, on the same machine, so the ratio means something where
absolute milliseconds would not. Before each timed create a ``--prepare`` step removes
the volume, so every create really creates.

``boxvol`` talks to a throw-away boxvold started here (``BOXVOL_SOCKET`` points at it);
podman uses the host's own storage, and every podman volume made here is removed at the
end. Byte-code is compiled first (the environment may set PYTHONDONTWRITEBYTECODE, and a
CLI run without cached byte-code measures the compiler, not the CLI).

Target: boxvol/podman <= 2.0 on the mean. Exit code 0 whether or not it is met (1 only if
the run itself failed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence

from bench.control_plane import BIN, interrupt_on_sigterm, positive_int, running_daemon
from volumed.client import Client
from volumed.errors import BoxvolError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_RATIO = 2.0

#: (name shown in the report, argv to time, argv hyperfine runs before each timed run)
Command = tuple[str, list[str], list[str] | None]


@dataclasses.dataclass(frozen=True)
class Timing:
    """hyperfine's summary of one command, in milliseconds."""

    mean: float
    stddev: float
    median: float
    runs: int


@dataclasses.dataclass(frozen=True)
class Pair:
    """One boxvol command timed against its podman counterpart."""

    label: str
    boxvol: Timing
    podman: Timing

    @property
    def ratio(self) -> float:
        """boxvol's mean over podman's."""
        return self.boxvol.mean / self.podman.mean


class BenchError(Exception):
    """The benchmark itself could not run (a tool missing or failing)."""


def compile_bytecode() -> None:
    """Write the project's .pyc files, as an installed package would have them."""
    done = subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "volumed", "cli", "vmdriver"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"compileall failed:\n{done.stdout}{done.stderr}")


def podman(*args: str) -> None:
    """Run one podman command, raising BenchError with its output if it fails."""
    done = subprocess.run(["podman", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"podman {' '.join(args)} failed: {done.stderr.strip()}")


def hyperfine(
    label: str,
    commands: Sequence[Command],
    *,
    warmup: int,
    runs: int,
    env: dict[str, str],
    json_path: str,
) -> Pair:
    """Time ``(name, command, prepare)`` triples in one hyperfine run (boxvol first).

    Give a prepare command for every command or for none (hyperfine's rule).
    """
    argv = [
        "hyperfine",
        "-N",
        "--style",
        "none",
        "--warmup",
        str(warmup),
        "--runs",
        str(runs),
        "--export-json",
        json_path,
    ]
    for _, _, prepare in commands:  # hyperfine pairs the n-th --prepare with the n-th command
        if prepare is not None:
            argv += ["--prepare", shlex.join(prepare)]
    for name, _, _ in commands:
        argv += ["--command-name", name]
    argv += [shlex.join(command) for _, command, _ in commands]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(
            f"hyperfine failed for {label} (status {done.returncode}):\n{done.stdout}{done.stderr}"
        )
    with open(json_path, encoding="utf-8") as f:
        exported = json.load(f)
    timings = [_timing(result) for result in exported["results"]]
    return Pair(label, timings[0], timings[1])


def _timing(result: dict[str, object]) -> Timing:
    def ms(key: str) -> float:
        value = result[key]
        return float(value) * 1000.0 if isinstance(value, int | float) else float("nan")

    times = result.get("times")
    return Timing(
        mean=ms("mean"),
        stddev=ms("stddev"),
        median=ms("median"),
        runs=len(times) if isinstance(times, list) else 0,
    )


def run_benchmark(args: argparse.Namespace) -> list[Pair]:
    """Start a boxvold, time both command pairs, and remove every podman volume made."""
    boxvol = os.path.join(BIN, "boxvol")
    prefix = f"boxvol-bench-{os.getpid()}"
    name = f"{prefix}-create"
    ls_names = [f"{prefix}-ls-{i:03d}" for i in range(args.ls_volumes)]
    made: list[str] = []
    pairs: list[Pair] = []
    with tempfile.TemporaryDirectory(prefix="boxvol-bench-") as tmp:
        try:
            with running_daemon(tmp) as socket_path:
                env = dict(os.environ, BOXVOL_SOCKET=socket_path)
                client = Client(socket_path)
                # The same few volumes on both sides, so each ls has rows to print.
                for ls_name in ls_names:
                    client.create_volume(ls_name)
                    podman("volume", "create", ls_name)
                    made.append(ls_name)
                made.append(name)

                def timed(label: str, commands: Sequence[Command]) -> Pair:
                    return hyperfine(
                        label,
                        commands,
                        warmup=args.warmup,
                        runs=args.runs,
                        env=env,
                        json_path=os.path.join(tmp, f"{label}.json"),
                    )

                remove_boxvol = (
                    f"{shlex.quote(boxvol)} rm -f {shlex.quote(name)} >/dev/null 2>&1 || true"
                )
                create: list[Command] = [
                    ("boxvol create", [boxvol, "create", name], ["sh", "-c", remove_boxvol]),
                    (
                        "podman volume create",
                        ["podman", "volume", "create", name],
                        ["podman", "volume", "rm", "-f", name],
                    ),
                ]
                pairs.append(timed("create", create))
                ls: list[Command] = [
                    ("boxvol ls", [boxvol, "ls"], None),
                    ("podman volume ls", ["podman", "volume", "ls"], None),
                ]
                pairs.append(timed("ls", ls))
        finally:
            if made:
                subprocess.run(
                    ["podman", "volume", "rm", "-f", *made], capture_output=True, check=False
                )
    return pairs


def format_report(pairs: Sequence[Pair], args: argparse.Namespace) -> str:
    """The table this benchmark prints."""
    out = [
        "boxvol CLI start-up vs podman: whole processes, hyperfine -N, "
        f"{args.warmup} warm-up + {args.runs} timed runs each; mean ± stddev",
        "",
    ]
    header = (
        f"{'command':<9}{'boxvol ms':>18}{'podman ms':>18}"
        f"{'boxvol/podman':>15}{'target':>9}  result"
    )
    out.append(header)
    out.append("-" * len(header))
    for pair in pairs:
        ok = pair.ratio <= TARGET_RATIO
        out.append(
            f"{pair.label:<9}{_mean(pair.boxvol):>18}{_mean(pair.podman):>18}"
            f"{pair.ratio:>15.2f}{'<= ' + format(TARGET_RATIO, '.1f'):>9}  "
            f"{'PASS' if ok else 'FAIL'}"
        )
    return "\n".join(out)


def _mean(timing: Timing) -> str:
    return f"{timing.mean:.1f} ± {timing.stddev:.1f}"


def build_parser() -> argparse.ArgumentParser:
    """Options of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--runs", type=positive_int, default=30, help="timed runs per command")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per command first")
    parser.add_argument(
        "--ls-volumes", type=int, default=10, help="volumes each side lists (besides the one made)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its report; 0 unless the run itself failed."""
    args = build_parser().parse_args(argv)
    missing = [tool for tool in ("hyperfine", "podman") if shutil.which(tool) is None]
    if missing:
        sys.stderr.write(f"cli_startup: {' and '.join(missing)} not found; run 'make setup'\n")
        return 1
    interrupt_on_sigterm()
    try:
        compile_bytecode()
        pairs = run_benchmark(args)
    except KeyboardInterrupt:
        sys.stderr.write("cli_startup: interrupted\n")
        return 130
    except (BenchError, BoxvolError, RuntimeError, OSError) as exc:
        sys.stderr.write(f"cli_startup: the benchmark failed: {exc}\n")
        return 1
    print(format_report(pairs, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
