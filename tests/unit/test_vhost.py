"""Telling from /proc/net/unix whether a VMM is connected to a vhost-user socket."""

from __future__ import annotations

from volumed.vhost import connected_at

SOCKET = "/run/boxvol/vhost/01EXPORT.sock"
TABLE = f"""\
Num       RefCount Protocol Flags    Type St Inode Path
00000000491b3b2a: 00000002 00000000 00010000 0001 01 671920 {SOCKET}
0000000011111111: 00000003 00000000 00000000 0001 03 671999
0000000022222222: 00000002 00000000 00010000 0001 01 680000 /run/libvirt/libvirt-sock
0000000033333333: 00000003 00000000 00000000 0001 03 680001 /run/libvirt/libvirt-sock
"""


def test_a_listener_alone_is_not_a_connection() -> None:
    assert not connected_at(TABLE, SOCKET)


def test_an_accepted_connection_carries_the_listeners_path() -> None:
    accepted = f"0000000044444444: 00000003 00000000 00000000 0001 03 671930 {SOCKET}\n"
    assert connected_at(TABLE + accepted, SOCKET)
    assert not connected_at(TABLE + accepted, SOCKET + ".other")


def test_paths_with_spaces_and_short_lines() -> None:
    spaced = "/tmp/a b/x.sock"
    accepted = f"0000000055555555: 00000003 00000000 00000000 0001 03 1 {spaced}\n"
    assert connected_at(TABLE + accepted + "garbage\n", spaced)
