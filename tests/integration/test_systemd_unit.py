"""The systemd units (boxvold, and the VM watcher ordered after it): systemd itself accepts
them, and each sandbox stays as tight as measured.

Runs the real ``systemd-analyze`` (Debian package ``systemd``, installed by ``make setup``);
systemd need not be PID 1 for ``verify`` or ``security --offline=yes``. Never skipped: a
missing ``systemd-analyze`` is a failure of the machine's setup.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from volumed import locations

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "boxvold.service"
WATCH_UNIT = REPO / "systemd" / "boxvol-vmwatch.service"
SOCKET_UNIT = REPO / "systemd" / "boxvold.socket"
VENV_BIN = REPO / ".venv" / "bin"
BOXVOLD = VENV_BIN / "boxvold"

#: ``systemd-analyze security --offline=yes`` measured 3.2 for boxvold (with its mounts
#: visible to the host: volumed/host_namespace.py) and 0.5 for the VM watcher (systemd 252,
#: Debian 12); the issue asks for 4.5 or lower. A change that loosens a sandbox beyond this
#: must raise its number here, on purpose.
MAX_EXPOSURE = {UNIT.name: 3.3, WATCH_UNIT.name: 0.6}


def _systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    assert tool is not None, (
        "systemd-analyze is missing: 'make setup' installs it (Debian package systemd)"
    )
    # Plain, untranslated output without colours or a pager, whatever the caller's terminal.
    env = {**os.environ, "LC_ALL": "C.UTF-8", "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""}
    return subprocess.run(
        [tool, *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=env,
        check=False,
        timeout=120,
    )


def _unit_for_this_checkout(directory: Path, unit: Path = UNIT) -> Path:
    """A copy of the unit whose ExecStart runs this checkout's console script (same
    arguments), so verify can check that the command exists and is executable."""
    text = unit.read_text()
    [command] = _directives(text)["ExecStart"]
    program, _, arguments = command.partition(" ")
    script = VENV_BIN / Path(program).name
    assert os.access(script, os.X_OK), f"{script} is missing: run 'make setup'"
    text, count = re.subn(
        r"^ExecStart=.*$",
        f"ExecStart={script} {arguments}".rstrip(),
        text,
        flags=re.MULTILINE,
    )
    assert count == 1, f"{unit} should have exactly one ExecStart= line, found {count}"
    copy = directory / unit.name
    copy.write_text(text)
    return copy


def _directives(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file, every value of each key in order."""
    found: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    # All in one directory, verified together: Requires=/After= on boxvold.service and
    # boxvold.socket resolve to the real units.
    units = [_unit_for_this_checkout(tmp_path, unit) for unit in (UNIT, WATCH_UNIT)]
    units.append(tmp_path / SOCKET_UNIT.name)
    units[-1].write_text(SOCKET_UNIT.read_text())
    result = _systemd_analyze("verify", *map(str, units))
    output = result.stdout + result.stderr
    complaints = [line for line in output.splitlines() if "boxvol" in line]
    assert result.returncode == 0, output
    assert complaints == [], output


@pytest.mark.parametrize("unit", [UNIT, WATCH_UNIT], ids=lambda u: u.name)
def test_security_exposure_stays_within_the_measured_level(tmp_path: Path, unit: Path) -> None:
    copy = _unit_for_this_checkout(tmp_path, unit)
    result = _systemd_analyze("security", "--offline=yes", "--no-pager", str(copy))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    match = re.search(
        rf"Overall exposure level for {re.escape(unit.name)}: (\d+(?:\.\d+)?)", output
    )
    assert match is not None, f"no overall exposure level in:\n{output}"
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE[unit.name], (
        f"{unit.name}'s exposure rose to {exposure} (at most {MAX_EXPOSURE[unit.name]}):\n{output}"
    )


def test_unit_directories_are_the_daemons_defaults_as_root() -> None:
    directives = _directives(UNIT.read_text())
    assert directives["Type"] == ["notify"]
    assert os.path.join("/var/lib", directives["StateDirectory"][0]) == locations.SYSTEM_HOME
    assert os.path.join("/run", directives["RuntimeDirectory"][0]) == locations.SYSTEM_RUNTIME_DIR
    assert directives["StateDirectoryMode"] == ["0700"]
    assert directives["RuntimeDirectoryMode"] == ["0755"]
    assert directives["RuntimeDirectoryPreserve"] == ["yes"]


def test_watcher_unit_runs_the_watcher_after_its_daemons() -> None:
    directives = _directives(WATCH_UNIT.read_text())
    [command] = directives["ExecStart"]
    assert command.split()[1:] == ["vm", "watch"]
    assert directives["Requires"] == ["boxvold.service"]
    after = " ".join(directives["After"]).split()
    assert "boxvold.service" in after and "libvirtd.service" in after
    assert directives["Restart"] == ["on-failure"]
    # No capability at all: connecting to root's own sockets needs none.
    assert directives["CapabilityBoundingSet"] == [""]


def test_the_socket_is_roots_and_the_groups_and_feeds_boxvold() -> None:
    directives = _directives(SOCKET_UNIT.read_text())
    assert directives["ListenStream"] == [
        os.path.join(locations.SYSTEM_RUNTIME_DIR, locations.SOCKET_NAME)
    ]
    assert (directives["SocketUser"], directives["SocketGroup"]) == (["root"], ["boxvol"])
    assert directives["SocketMode"] == ["0660"]
    assert directives["Accept"] == ["no"]
    service = _directives(UNIT.read_text())
    assert "boxvold.socket" in service["Requires"] and service["KillMode"] == ["process"]


def test_the_open_file_limit_fits_the_connection_bound() -> None:
    from volumed.daemon import RESERVED_FDS
    from volumed.http_server import ServerLimits

    [limit] = _directives(UNIT.read_text())["LimitNOFILE"]
    assert int(limit) >= ServerLimits().max_connections + RESERVED_FDS
