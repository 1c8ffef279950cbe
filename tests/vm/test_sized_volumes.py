"""Sized volumes in a real guest: the cap is the guest's ``df`` and its ENOSPC, a second sized
volume on the same guest is unaffected, and data and cap survive a guest restart and a
boxvold restart (the image is unmounted at the clean stop and mounted again at the start,
onto the loop device the guest's virtiofsd still holds)."""

from __future__ import annotations

from tests.helpers import Daemon
from tests.vm.helpers import Domains, volume_dir
from vmdriver.backends.libvirt import LibvirtDriver
from volumed.client import Client

#: First boot fills /a past its cap; a later boot (the host leaves ``second-boot`` in /b)
#: reads what the first kept and tries to fill /a again.
FILLS = """\
df -k /a | tail -n 1 | sed 's/^/DF-A: /'
df -k /b | tail -n 1 | sed 's/^/DF-B: /'
if [ -e /b/second-boot ]; then
  echo "KEPT-A: $(cat /a/keep.txt)"
  echo "KEPT-B: $(cat /b/keep.txt)"
  dd if=/dev/zero of=/a/fill2 bs=1M count=100 2>&1 | grep -o 'No space left on device' \\
    | head -n 1 | sed 's/^/DD2: /'
  rm -f /a/fill2
  exit 0
fi
echo kept-a > /a/keep.txt && echo kept-b > /b/keep.txt && sync
dd if=/dev/zero of=/a/fill bs=1M count=100 2>&1 | grep -o 'No space left on device' \\
  | head -n 1 | sed 's/^/DD: /'
ls -l /a/fill | sed 's/^/FILL: /'
rm -f /a/fill && sync
if dd if=/dev/zero of=/b/four bs=1M count=4 2>/dev/null && sync; then echo "WROTE-B: ok"; fi
echo after > /a/after.txt && sync && echo "A-AFTER: ok"
"""


def _df_kib(line: str) -> int:
    """The size column (1K blocks) of a ``df -k`` line."""
    return int(line.split()[1])


def test_caps_hold_in_a_guest_through_guest_and_boxvold_restarts(
    driver: LibvirtDriver, domains: Domains, boxvold: Daemon, client: Client
) -> None:
    client.create_volume("capa", size_bytes=64 << 20)
    client.create_volume("capb", size_bytes=32 << 20)
    guest = domains.define(script=FILLS)
    driver.prepare(guest.name)
    driver.attach(guest.name, ["capa:/a", "capb:/b"])

    guest.start()
    guest.wait_stopped()
    guest.check_done()
    [df_a] = guest.lines_with("DF-A: ")
    [df_b] = guest.lines_with("DF-B: ")
    assert 58 << 10 < _df_kib(df_a) <= 64 << 10, df_a  # about 64M
    assert 28 << 10 < _df_kib(df_b) <= 32 << 10, df_b
    assert guest.lines_with("DD: ") == ["No space left on device"], guest.console()
    assert guest.lines_with("WROTE-B: ") == ["ok"]  # the other sized volume is unaffected
    assert guest.lines_with("A-AFTER: ") == ["ok"]  # and /a works again once freed
    host_a = volume_dir(boxvold, client.get_volume("capa"))
    host_b = volume_dir(boxvold, client.get_volume("capb"))
    assert (host_a / "after.txt").read_text() == "after\n"
    assert client.health()["status"] == "ok"  # boxvold stayed up

    # boxvold restarts cleanly (images unmounted, mounted again), then the guest boots again.
    assert boxvold.stop() == 0
    boxvold.start()
    (host_b / "second-boot").touch()
    guest.start()
    guest.wait_stopped()
    guest.check_done()
    assert guest.lines_with("KEPT-A: ") == ["kept-a"]
    assert guest.lines_with("KEPT-B: ") == ["kept-b"]
    assert guest.lines_with("DD2: ") == ["No space left on device"]  # the cap survived
    [df_a_again] = guest.lines_with("DF-A: ")  # the console log is per boot
    assert _df_kib(df_a_again) == _df_kib(df_a)
    for volume in ("capa", "capb"):
        assert client.get_volume(volume)["usage"]["image"]["size_bytes"] > 28 << 20
