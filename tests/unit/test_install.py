"""boxvol-install into a tree of its own: the units (programs where it links them), the
group, an example config never overwritten, the links; no host command runs."""

from __future__ import annotations

import os
from pathlib import Path

from volumed.install import SCRIPTS, UNITS, install, main


def test_it_writes_units_group_config_and_links(tmp_path: Path) -> None:
    scripts = tmp_path / "venv" / "bin"
    written = install(tmp_path / "root", bin_dir="/opt/bin", scripts_dir=scripts)
    root = tmp_path / "root"
    for unit in UNITS:
        text = (root / "etc/systemd/system" / unit).read_text()
        assert "/usr/local/bin/" not in text
    service = (root / "etc/systemd/system/boxvold.service").read_text()
    assert "ExecStart=/opt/bin/boxvold" in service
    assert (root / "usr/lib/sysusers.d/boxvol.conf").read_text().splitlines()[-1] == "g boxvol -"
    for script in SCRIPTS:
        link = root / "opt/bin" / script
        assert os.readlink(link) == str(scripts / script)
    assert root / "etc/boxvol/boxvold.toml" in written


def test_an_existing_config_is_kept(tmp_path: Path) -> None:
    config = tmp_path / "etc/boxvol/boxvold.toml"
    config.parent.mkdir(parents=True)
    config.write_text("log_level = 'DEBUG'\n")
    assert main(["--root", str(tmp_path)]) == 0
    assert config.read_text() == "log_level = 'DEBUG'\n"
    assert (tmp_path / "etc/systemd/system/boxvold.socket").exists()
