"""The main job, end to end on a throw-away home: start boxvold, create a named and an
anonymous volume, list them, remove them and stop. (A booted guest joins in a later issue.)

Run by ``make demo``; prints every command it runs and what boxvol answered.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(__file__).resolve().parent.parent / ".venv" / "bin"


def step(env: dict[str, str], *args: str) -> str:
    """Run one ``boxvol`` command, show it and its output, and fail the demo if it fails."""
    print(f"$ boxvol {shlex.join(args)}", flush=True)
    result = subprocess.run(
        [str(BIN / "boxvol"), *args], env=env, capture_output=True, text=True, check=False
    )
    sys.stdout.write(result.stdout)
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        raise SystemExit(f"demo failed at: boxvol {shlex.join(args)}")
    return result.stdout


def main() -> int:
    """Run the demo; exit 0 only if every step worked and nothing is left behind."""
    with tempfile.TemporaryDirectory(prefix="boxvol-demo-") as scratch:
        home, runtime = Path(scratch, "home"), Path(scratch, "run")
        env = {k: v for k, v in os.environ.items() if not k.startswith("BOXVOL_")}
        env["BOXVOL_SOCKET"] = str(runtime / "boxvold.sock")
        print(f"$ boxvold --home {home} --runtime-dir {runtime} &", flush=True)
        daemon = subprocess.Popen(
            [str(BIN / "boxvold"), "--home", str(home), "--runtime-dir", str(runtime)],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 30
            while not (runtime / "boxvold.sock").exists():
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("boxvold did not start")
                time.sleep(0.05)
            step(env, "version")
            step(env, "create", "demo-data", "--label", "purpose=demo", "--size", "1G")
            anonymous = step(env, "create", "--consumer", "demo").strip()
            step(env, "ls")
            step(env, "inspect", "demo-data")
            step(env, "df")
            step(env, "rm", "demo-data", anonymous)
            step(env, "ls")
        finally:
            daemon.send_signal(signal.SIGTERM)
            _, log = daemon.communicate(timeout=30)
        print("--- boxvold log ---")
        sys.stdout.write(log)
        if daemon.returncode != 0:
            raise SystemExit(f"boxvold exited with status {daemon.returncode}")
    print("demo finished: boxvold stopped, throw-away home removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
