"""Finding host processes by their command line, as the demo, the benchmarks and the tests
do to wait for or clean up after virtiofsd, QEMU and boxvold."""

from __future__ import annotations

import os
from pathlib import Path


def command_lines(program: str | None = None) -> dict[int, str]:
    """pid -> command line (arguments joined by spaces) of every other process; with
    ``program``, only those whose executable (argv[0]) contains it."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if program is not None and program.encode() not in argv[0]:
            continue
        found[int(entry.name)] = b" ".join(argv).decode(errors="replace").strip()
    return found


def processes_naming(*needles: str, program: str | None = None) -> dict[int, str]:
    """Processes (of ``program``, if given) whose command line contains one of ``needles``."""
    return {
        pid: command
        for pid, command in command_lines(program).items()
        if any(needle in command for needle in needles)
    }
