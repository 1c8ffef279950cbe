"""``boxvol-install``: put boxvol's systemd units, its group and its settings in place.

After ``pip install`` into a virtual environment (docs/operator.md), one command makes the
host ready: the console scripts linked into ``/usr/local/bin`` (where the units expect
them), ``boxvold.service``, ``boxvold.socket`` and ``boxvol-vmwatch.service`` in
``/etc/systemd/system``, the ``boxvol`` group (``sysusers.d``; the API socket is
``root:boxvol 0660``), an example ``/etc/boxvol/boxvold.toml`` (never overwritten), then
``systemctl daemon-reload``. It enables and starts nothing: the operator does, with
``systemctl enable --now boxvold.socket``. ``--root`` installs into another tree (an image
being built, a test) and then runs no host command.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

#: The units and what they are installed as.
UNITS = ("boxvold.service", "boxvold.socket", "boxvol-vmwatch.service")
SCRIPTS = ("boxvol", "boxvold")
SYSUSERS = Path("usr/lib/sysusers.d/boxvol.conf")
UNIT_DIR = Path("etc/systemd/system")
CONFIG = Path("etc/boxvol/boxvold.toml")
DEFAULT_BIN_DIR = "/usr/local/bin"


def source_dir() -> Path:
    """Where the unit files are: inside the installed package (a wheel), or the checkout's
    ``systemd/`` (an editable install)."""
    packaged = Path(__file__).resolve().parent / "_systemd"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "systemd"


def unit_text(text: str, bin_dir: str) -> str:
    """A unit's text with its programs at ``bin_dir`` (the units name /usr/local/bin)."""
    return text.replace(f"{DEFAULT_BIN_DIR}/", bin_dir.rstrip("/") + "/")


def install(root: Path, *, bin_dir: str, scripts_dir: Path) -> list[Path]:
    """Write everything under ``root``; the paths written."""
    source = source_dir()
    written: list[Path] = []

    def put(relative: Path, content: str, mode: int = 0o644) -> None:
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".new")
        partial.write_text(content)
        partial.chmod(mode)
        partial.replace(target)
        written.append(target)

    for unit in UNITS:
        put(UNIT_DIR / unit, unit_text((source / unit).read_text(), bin_dir))
    put(SYSUSERS, (source / "boxvol.sysusers").read_text())
    if not (root / CONFIG).exists():
        put(CONFIG, (source / "boxvold.toml").read_text())
    links = root / bin_dir.lstrip("/")
    links.mkdir(parents=True, exist_ok=True)
    for script in SCRIPTS:
        link = links / script
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(scripts_dir / script)
        written.append(link)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``boxvol-install``."""
    parser = argparse.ArgumentParser(
        prog="boxvol-install",
        description="Install boxvol's systemd units, group and settings (then: "
        "systemctl enable --now boxvold.socket).",
    )
    parser.add_argument("--root", default="/", help="install into this tree (default /)")
    parser.add_argument(
        "--bin-dir",
        default=DEFAULT_BIN_DIR,
        help="where boxvol and boxvold are linked (default /usr/local/bin)",
    )
    args = parser.parse_args(argv)
    root = Path(args.root)
    if root == Path("/") and os.geteuid() != 0:
        sys.stderr.write("boxvol-install: error: run it as root (it writes /etc and /usr)\n")
        return 1
    scripts_dir = Path(sys.executable).parent
    for path in install(root, bin_dir=args.bin_dir, scripts_dir=scripts_dir):
        print(f"installed {path}")
    if root == Path("/"):
        for command in (
            ["systemd-sysusers", str(Path("/") / SYSUSERS)],
            ["systemctl", "daemon-reload"],
        ):
            if shutil.which(command[0]) is None or not Path("/run/systemd/system").is_dir():
                print(f"skipped: {' '.join(command)} (systemd is not running here)")
                continue
            subprocess.run(command, check=True)
    print("next: systemctl enable --now boxvold.socket  (and boxvol-vmwatch with libvirt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
