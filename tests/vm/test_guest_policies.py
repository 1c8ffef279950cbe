"""Policies a real guest cannot get around: read-only shares (also after ``remount,rw``),
via=fuse exports (writes, read-only, ownership mapping), confinement of guest root to its
share (symlinks, device nodes, ``..``, hard links) and the supervision of a virtiofsd killed
under a running guest. Each test boots a TCG guest through libvirt whose script tries things
and prints markers; the test asserts on its console and on the host."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Daemon, wait_for
from tests.vm.helpers import (
    URI,
    Domains,
    alive,
    qemu_for,
    virtiofsd_running,
    virtiofsd_serving,
    volume_dir,
)
from vmdriver.backends.libvirt import LibvirtDriver
from volumed.client import Client

OWNER = (1234, 2345)


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under ``root`` (not following symlinks): relative path -> (mode, size,
    mtime_ns)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            found[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return found


def listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


# -- 1: a read-only attachment stays read-only, also after remount,rw -----------------------

READ_ONLY = """\
try() { if "$@" 2>/dev/null; then echo ok; else echo refused; fi; }
echo "READ: $(cat /data/seed.txt)"
echo "W1: $(try sh -c 'echo x > /data/w1.txt')"
echo "REMOUNT: $(try mount -o remount,rw /data)"
grep ' /data ' /proc/mounts | sed 's/^/MOUNTS: /'
echo "W2: $(try sh -c 'echo x > /data/w2.txt')"
echo "APPEND: $(try sh -c 'echo x >> /data/seed.txt')"
echo "MKDIR: $(try mkdir /data/d)"
echo "RM: $(try rm -f /data/seed.txt)"
echo "MV: $(try mv /data/seed.txt /data/moved.txt)"
echo "CHMOD: $(try chmod 777 /data/seed.txt)"
echo "LN: $(try ln -s x /data/l)"
echo "FIFO: $(try mkfifo /data/f)"
sync
true
"""


def test_read_only_attachment_survives_remount_rw(
    driver: LibvirtDriver, domains: Domains, boxvold: Daemon, client: Client
) -> None:
    volume = client.create_volume("rovol")
    host = volume_dir(boxvold, volume)
    (host / "seed.txt").write_text("seeded\n")
    before = snapshot(host)

    guest = domains.define(script=READ_ONLY)
    driver.prepare(guest.name)
    [att] = driver.attach(guest.name, ["rovol:/data:ro"])
    assert att.read_only
    export = client.get_export(att.export_id or "")
    print(f"read-only export: via={export.get('via')} mountpoint={export.get('mountpoint')}")

    guest.start()
    seconds = guest.wait_stopped()
    guest.check_done()
    assert "mounted bv-rovol at /data (ro)" in guest.markers()
    assert guest.lines_with("READ: ") == ["seeded"]
    for step in ("W1", "W2", "APPEND", "MKDIR", "RM", "MV", "CHMOD", "LN", "FIFO"):
        assert guest.lines_with(f"{step}: ") == ["refused"], (step, guest.console())
    [remount] = guest.lines_with("REMOUNT: ")
    print(f"remount,rw in the guest: {remount}; /proc/mounts: {guest.lines_with('MOUNTS: ')}")
    assert snapshot(host) == before
    assert (host / "seed.txt").read_text() == "seeded\n"
    print(f"guest: {seconds:.1f} s")


# -- 2: via=fuse: writes land, read-only holds, ownership is mapped -------------------------

VIA_FUSE = """\
try() { if "$@" 2>/dev/null; then echo ok; else echo refused; fi; }
echo "RW: $(try sh -c 'echo fused > /rw/new.txt && mkdir /rw/dir && echo n > /rw/dir/n')"
echo "RW-DEV: $(try mknod /rw/sda b 8 0)"
echo "RO-READ: $(cat /ro/seed.txt)"
echo "RO-W1: $(try sh -c 'echo x > /ro/w1.txt')"
echo "RO-REMOUNT: $(try mount -o remount,rw /ro)"
echo "RO-W2: $(try sh -c 'echo x > /ro/w2.txt')"
echo "RO-RM: $(try rm -f /ro/seed.txt)"
echo "OWN-SEED: $(stat -c %u:%g /own/seed.txt)"
echo "OWN-ROOT: $(stat -c %u:%g /own)"
echo "OWN-W: $(try sh -c 'echo mine > /own/made.txt')"
echo "OWN-MADE: $(stat -c %u:%g /own/made.txt)"
ls -ln /own | sed 's/^/OWN-LS: /'
sync
true
"""


class OwnerClient(Client):
    """boxvold's client that asks for an ownership mapping on every export it creates (the
    driver has no owner option; the API takes ``owner`` with ``via: "fuse"``)."""

    def create_export(self, volume: str, **kwargs: Any) -> dict[str, Any]:
        kwargs.setdefault("owner", OWNER)
        return super().create_export(volume, **kwargs)


def test_via_fuse_writes_read_only_and_owner_mapping(
    driver: LibvirtDriver, domains: Domains, boxvold: Daemon, client: Client
) -> None:
    ro_volume = client.create_volume("fro")
    ro_host = volume_dir(boxvold, ro_volume)
    (ro_host / "seed.txt").write_text("ro seed\n")
    ro_before = snapshot(ro_host)
    own_volume = client.create_volume("fown")
    own_host = volume_dir(boxvold, own_volume)
    (own_host / "seed.txt").write_text("own seed\n")
    os.chown(own_host / "seed.txt", 0, 0)

    guest = domains.define(script=VIA_FUSE)
    driver.prepare(guest.name)
    attached = driver.attach(guest.name, ["frw:/rw", "fro:/ro:ro"], via="fuse")
    with LibvirtDriver(OwnerClient(str(boxvold.socket), timeout=60), URI) as owning:
        attached += owning.attach(guest.name, ["fown:/own"], via="fuse")
    exports = {a.guest_path: client.get_export(a.export_id or "") for a in attached}
    assert {p: e["via"] for p, e in exports.items()} == {
        "/rw": "fuse",
        "/ro": "fuse",
        "/own": "fuse",
    }
    assert exports["/ro"]["read_only"]
    assert exports["/own"]["owner"] == {"uid": OWNER[0], "gid": OWNER[1]}

    guest.start()
    seconds = guest.wait_stopped()
    guest.check_done()
    console = guest.console()
    assert guest.lines_with("RW: ") == ["ok"], console
    rw_host = volume_dir(boxvold, client.get_volume("frw"))
    assert (rw_host / "new.txt").read_text() == "fused\n"
    assert (rw_host / "dir" / "n").read_text() == "n\n"
    assert guest.lines_with("RW-DEV: ") == ["refused"], console
    assert not (rw_host / "sda").exists()

    assert guest.lines_with("RO-READ: ") == ["ro seed"], console
    for step in ("RO-W1", "RO-W2", "RO-RM"):
        assert guest.lines_with(f"{step}: ") == ["refused"], (step, console)
    assert snapshot(ro_host) == ro_before
    print(f"via=fuse read-only: remount,rw in the guest: {guest.lines_with('RO-REMOUNT: ')}")

    mapped = f"{OWNER[0]}:{OWNER[1]}"
    assert guest.lines_with("OWN-SEED: ") == [mapped], console
    assert guest.lines_with("OWN-ROOT: ") == [mapped], console
    assert guest.lines_with("OWN-W: ") == ["ok"], console
    assert guest.lines_with("OWN-MADE: ") == [mapped], console
    ls = guest.lines_with("OWN-LS: ")
    assert any(
        ln.split()[2:4] == [str(OWNER[0]), str(OWNER[1])] for ln in ls if "seed.txt" in ln
    ), ls
    # The backing files keep their own owners; only the view presents the mapping.
    assert (own_host / "seed.txt").stat().st_uid == 0
    assert (own_host / "made.txt").read_text() == "mine\n"
    print(f"made.txt on the host: uid={(own_host / 'made.txt').stat().st_uid}")
    print(f"guest: {seconds:.1f} s")


# -- 3: guest root stays inside its share ----------------------------------------------------

ESCAPE = """\
try() { if "$@" 2>/dev/null; then echo ok; else echo refused; fi; }
cd /data
ln -s /etc/shadow link-to-shadow; ln -s ../../.. up; ln -s SECRET sec
echo "SHADOW: $(cat /data/link-to-shadow 2>&1 | head -c 60)"
echo "TOKEN-READ: $(cat /data/sec 2>&1)"
echo "UP: $(ls /data/up/ | tr '\\n' ' ')"
echo "TOKEN-WRITE: $(try sh -c 'echo pwned > /data/sec')"
echo "TOKEN-GUEST: $(cat SECRET 2>&1)"
echo "MKNOD-B: $(try mknod /data/sda b 8 0)"
echo "MKNOD-C: $(try mknod /data/tty c 4 1)"
echo "FIFO: $(try mkfifo /data/fifo)"
cd /data/../..; echo "CD: $(pwd)"
cd /data/up/..; echo "CD2: $(pwd)"; cd /
echo "DOTDOT: $(ls -a /data/../.. | tr '\\n' ' ')"
echo "HL-ETC: $(try ln /etc/passwd /data/hl-passwd)"
echo "HL-INIT: $(try ln /init /data/hl-init)"
echo "HL-TOKEN: $(try ln SECRET /data/hl-sec)"
echo "HL-LINK: $(try ln /data/sec /data/hl-link)"
echo "PLANT: $(try touch /data/up/planted)"
sync
true
"""


@pytest.fixture
def secret() -> Iterator[tuple[Path, str]]:
    """A host file outside every volume, holding a random token."""
    token = secrets.token_hex(16)
    path = Path(f"/tmp/boxvol-secret-{secrets.token_hex(6)}")
    path.write_text(f"{token}\n")
    path.chmod(0o600)
    try:
        yield path, token
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize("via", ["direct", "fuse"])
def test_guest_root_cannot_reach_host_files(
    via: str,
    driver: LibvirtDriver,
    domains: Domains,
    boxvold: Daemon,
    client: Client,
    secret: tuple[Path, str],
) -> None:
    secret_path, token = secret
    secret_stat = secret_path.stat()
    volume = client.create_volume("jail")
    host = volume_dir(boxvold, volume)
    parent_before = listing(host.parent)
    home_before = {k: v for k, v in snapshot(boxvold.home).items() if "volumes/named/jail" not in k}
    tmp_before = [p for p in listing(Path("/tmp")) if p.startswith("boxvol-secret-")]
    host_shadow = Path("/etc/shadow").read_text().splitlines()[0]

    guest = domains.define(script=ESCAPE.replace("SECRET", str(secret_path)))
    driver.prepare(guest.name)
    driver.attach(guest.name, ["jail:/data"], via="fuse" if via == "fuse" else "direct")
    guest.start()
    seconds = guest.wait_stopped()
    guest.check_done()
    console = guest.console()

    # Nothing of the host's came back: not its shadow, not the secret.
    assert token not in console
    assert host_shadow not in console
    assert host_shadow.split(":", 1)[0] + ":" not in "".join(guest.lines_with("SHADOW: "))
    [sec] = guest.lines_with("TOKEN-READ: ")
    assert "No such file" in sec, console
    # Writing through the symlink created the file in the guest's own namespace.
    assert guest.lines_with("TOKEN-WRITE: ") == ["ok"], console
    assert guest.lines_with("TOKEN-GUEST: ") == ["pwned"], console
    assert guest.lines_with("MKNOD-B: ") == ["refused"], console
    assert guest.lines_with("MKNOD-C: ") == ["refused"], console
    assert guest.lines_with("FIFO: ") == ["ok"], console
    assert guest.lines_with("CD: ") == ["/"], console
    for step in ("HL-ETC", "HL-INIT", "HL-TOKEN"):
        assert guest.lines_with(f"{step}: ") == ["refused"], (step, console)
    print(f"via={via}: {guest.lines_with('UP: ')} {guest.lines_with('DOTDOT: ')}")
    print(f"via={via}: HL-LINK {guest.lines_with('HL-LINK: ')}")
    print(f"via={via}: PLANT {guest.lines_with('PLANT: ')} CD2 {guest.lines_with('CD2: ')}")

    # On the host: the secret untouched, no device node, the symlinks are plain data.
    after = secret_path.stat()
    assert secret_path.read_text() == f"{token}\n"
    assert (after.st_mtime_ns, after.st_nlink, after.st_ino, after.st_size) == (
        secret_stat.st_mtime_ns,
        1,
        secret_stat.st_ino,
        secret_stat.st_size,
    )
    for dirpath, dirnames, filenames in os.walk(host):
        for name in dirnames + filenames:
            st = (Path(dirpath) / name).lstat()
            assert not (stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)), name
            assert st.st_ino != secret_stat.st_ino or st.st_dev != secret_stat.st_dev, name
    assert not (host / "sda").exists() and not (host / "tty").exists()
    assert stat.S_ISFIFO((host / "fifo").lstat().st_mode)
    assert os.readlink(host / "link-to-shadow") == "/etc/shadow"
    assert os.readlink(host / "up") == "../../.."
    assert os.readlink(host / "sec") == str(secret_path)
    # Nothing outside the volume changed.
    assert listing(host.parent) == parent_before
    home_after = {k: v for k, v in snapshot(boxvold.home).items() if "volumes/named/jail" not in k}
    assert set(home_after) == set(home_before)
    assert [p for p in listing(Path("/tmp")) if p.startswith("boxvol-secret-")] == tmp_before
    assert not Path("/planted").exists()
    print(f"via={via} guest: {seconds:.1f} s; volume: {listing(host)}")


# -- 4: virtiofsd killed under a running guest ----------------------------------------------

WAITER = """\
echo ready > /data/before.txt && sync
echo "STEP: mounted"
while [ ! -e /data/go ]; do sleep 0.2; done
echo "STEP: go"
"""


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_killed_virtiofsd_is_reported_and_rearmed(
    driver: LibvirtDriver, domains: Domains, boxvold: Daemon, client: Client
) -> None:
    guest = domains.define(script=WAITER, timeout=0)
    driver.prepare(guest.name)
    [att] = driver.attach(guest.name, ["victim:/data"])
    export_id = att.export_id or ""
    guest.start()
    guest.wait_console("STEP: mounted")
    host = volume_dir(boxvold, client.get_volume("victim"))
    assert (host / "before.txt").read_text() == "ready\n"

    export = client.get_export(export_id)
    old_pid = export["virtiofsd"]["pid"]
    assert export["virtiofsd"]["restarts"] == 0 and virtiofsd_running(export)
    sandboxed = children(old_pid)  # QEMU 7.2's virtiofsd serves from a child in namespaces
    log_offset = boxvold.log_offset()
    os.kill(old_pid, signal.SIGKILL)

    def rearmed() -> dict[str, Any] | None:
        current = client.get_export(export_id)
        info = current["virtiofsd"]
        if info["restarts"] >= 1 and info["pid"] and info["pid"] != old_pid:
            return current
        return None

    current = wait_for("a re-armed virtiofsd", rearmed)
    info = current["virtiofsd"]
    assert info["restarts"] == 1 and info["last_exit"] is not None, info
    assert alive(info["pid"]) and virtiofsd_running(current)
    print(
        f"killed {old_pid} (children {sandboxed}); "
        f"re-armed {info['pid']}, last_exit={info['last_exit']}"
    )
    logged = boxvold.log_since(log_offset)
    assert "virtiofsd crashed" in logged and export_id in logged, logged
    wait_for("the killed virtiofsd's children to go", lambda: not any(alive(p) for p in sandboxed))
    assert not alive(old_pid)

    # The guest's I/O on the dead connection may hang: do not wait on it.
    assert guest.dom.isActive()
    guest.dom.destroy()
    wait_for("QEMU to exit", lambda: not qemu_for(guest.name))
    [detached] = driver.detach(guest.name, ["/data"])
    assert detached.export_id == export_id
    assert client.list_exports() == []
    wait_for(
        "virtiofsd to exit",
        lambda: not virtiofsd_serving(boxvold.home, boxvold.runtime_dir),
    )
    assert not alive(info["pid"])
    assert not qemu_for(guest.name)
    with contextlib.suppress(FileNotFoundError):
        assert "STEP: go" not in guest.console()
