"""Parsing the kernel's mount tables (``volumed.mounts``): pure, from captured text."""

from __future__ import annotations

import subprocess
import sys

import pytest

from volumed.mounts import (
    MountEntry,
    fdinfo_mount_id,
    find_mount,
    mounts_below,
    parse_mountinfo,
    unescape,
)

FDINFO = "pos:\t0\nflags:\t012100000\nmnt_id:\t412\nino:\t131\n"

# Captured on a host with a bind mount over a volume directory whose path has a space, one
# with optional fields (shared:, master:) and one without any.
MOUNTINFO = (
    "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
    "27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard\n"
    "412 27 254:0 /srv/host\\040data /var/lib/boxvol/volumes/named/data rw,relatime "
    "shared:1 master:7 - ext4 /dev/vda rw,discard\n"
    "413 412 0:55 / /var/lib/boxvol/volumes/named/data/sub rw - tmpfs tmp\\134fs rw\n"
    "414 27 0:56 / /var/lib/boxvol/volumes/named/database rw - tmpfs tmpfs rw\n"
)


def test_fdinfo_mount_id() -> None:
    assert fdinfo_mount_id(FDINFO) == 412
    with pytest.raises(ValueError, match="no mnt_id"):
        fdinfo_mount_id("pos:\t0\nflags:\t0100000\n")


def test_unescape() -> None:
    assert unescape("/a\\040b\\011c\\012d\\134e") == "/a b\tc\nd\\e"
    assert unescape("/plain") == "/plain"


def test_parse_mountinfo() -> None:
    entries = parse_mountinfo(MOUNTINFO + "garbage line\n\n")
    assert [e.mount_id for e in entries] == [22, 27, 412, 413, 414]
    bind = entries[2]
    assert bind == MountEntry(
        mount_id=412,
        parent_id=27,
        root="/srv/host data",
        mount_point="/var/lib/boxvol/volumes/named/data",
        fs_type="ext4",
        source="/dev/vda",
    )
    assert entries[3].source == "tmp\\fs"


def test_describe_names_what_is_mounted() -> None:
    entries = parse_mountinfo(MOUNTINFO)
    described = {i: e.describe() for i in (412, 414) if (e := find_mount(entries, i))}
    assert described == {
        412: "/dev/vda[/srv/host data] (ext4, mount id 412)",  # a bind mount: its source dir
        414: "tmpfs (tmpfs, mount id 414)",
    }
    assert find_mount(entries, 999) is None


def test_mounts_below_is_strictly_inside() -> None:
    entries = parse_mountinfo(MOUNTINFO)
    below = mounts_below(entries, "/var/lib/boxvol/volumes/named/data")
    # Not the mount on the directory itself, not a sibling that shares the prefix.
    assert [e.mount_id for e in below] == [413]
    assert mounts_below(entries, "/var/lib/boxvol/volumes/named/data/") == below
    assert mounts_below(entries, "/var/lib/boxvol/volumes/named/database") == []


def test_mounts_module_is_pure() -> None:
    code = "import sys, volumed.mounts; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    assert {m for m in loaded if m.startswith("volumed")} == {"volumed", "volumed.mounts"}
    assert not loaded & {"trio", "pyfuse3", "libvirt", "sqlite3"}
