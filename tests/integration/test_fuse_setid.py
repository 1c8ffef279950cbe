"""setuid and setgid bits through real exports, set by an unprivileged user.

boxvold runs as root, and an owner-mapped export keeps the backing files root's while it
presents them as another uid/gid: any set-id bit stored through it makes a root-owned
setuid or setgid object, which every plain export and guest of the volume then sees. So
these tests look at what reached the backing store, through a second, plain export.
"""

from __future__ import annotations

import errno
import os
import stat

import pytest

from tests.helpers import Daemon
from tests.integration.fuse_helpers import Export, run_as

NOBODY = (65534, 65534)
USER = (4242, 4242)
SET_ID = stat.S_ISUID | stat.S_ISGID

#: As nobody, through the owner-mapped export at argv[1]: every way of asking for a set-id
#: bit a plain user has. Each one succeeds (a stripped bit is silent, as the kernel's is).
_ASK_FOR_SET_ID = """
import os, shutil, stat, sys
d = sys.argv[1]
shutil.copy('/bin/id', d + '/id-suid')
os.chmod(d + '/id-suid', 0o4755)
shutil.copy('/bin/id', d + '/id-sgid')
os.chmod(d + '/id-sgid', 0o2755)
os.mkdir(d + '/dir')
os.chmod(d + '/dir', 0o2777)
os.chmod(d, 0o2777)
os.close(os.open(d + '/created', os.O_CREAT | os.O_WRONLY, 0o6755))
os.mknod(d + '/node', stat.S_IFREG | 0o6755)
os.mkdir(d + '/team/sub')
"""


def _set_id_bits(path: os.PathLike[str] | str) -> int:
    return os.lstat(path).st_mode & SET_ID


def test_owner_mapped_export_never_stores_set_id_bits(daemon: Daemon) -> None:
    plain = Export(daemon, "data", cache="none")  # what is stored now, not what was cached
    # A setgid directory made through a plain export: a directory made in it through the
    # mapping must not inherit the bit either.
    (plain.path / "team").mkdir()
    os.chmod(plain.path / "team", 0o2777)
    mapped = Export(daemon, "data", owner=NOBODY)
    run_as(*NOBODY, _ASK_FOR_SET_ID, str(mapped.path), umask=0)
    names = ["", "id-suid", "id-sgid", "dir", "created", "node", "team/sub"]
    for name in names:
        assert _set_id_bits(plain.path / name) == 0, f"stored set-id bits on {name!r}"
        assert _set_id_bits(plain.backing / name) == 0, name
        assert _set_id_bits(mapped.path / name) == 0, name
    # The rest of each mode is kept: only the set-id bits go.
    assert stat.S_IMODE(os.stat(plain.path / "id-suid").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(plain.path / "dir").st_mode) == 0o777
    # Root asking through the mapping gets no more: its files there are root's too.
    os.chmod(mapped.path / "id-suid", 0o4755)
    assert _set_id_bits(plain.backing / "id-suid") == 0


def test_chown_through_a_mapping_clears_set_id_bits(daemon: Daemon) -> None:
    plain = Export(daemon, "data")
    (plain.path / "tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(plain.path / "tool", 0o6755)
    mapped = Export(daemon, "data", owner=NOBODY)
    os.chown(mapped.path / "tool", *NOBODY)  # to the presented owner: a chown all the same
    assert _set_id_bits(plain.backing / "tool") == 0


def test_read_only_mapped_export_refuses_chmod(daemon: Daemon) -> None:
    plain = Export(daemon, "data")
    (plain.path / "f").write_text("x")
    ro = Export(daemon, "data", owner=NOBODY, read_only=True)
    code = "import os, sys; os.chmod(sys.argv[1], 0o4755)"
    with pytest.raises(AssertionError, match="Read-only file system"):
        run_as(*NOBODY, code, str(ro.path / "f"))
    assert stat.S_IMODE(os.stat(plain.backing / "f").st_mode) == 0o644
    with pytest.raises(OSError) as caught:
        os.chmod(ro.path / "f", 0o4755)
    assert caught.value.errno == errno.EROFS


def test_every_write_of_an_unprivileged_open_clears_setuid(daemon: Daemon) -> None:
    export = Export(daemon, "data")
    os.chmod(export.path, 0o755)  # the volume root is 0700; let the user in
    mine = export.path / "mine"
    mine.write_bytes(b"#!/bin/sh\n")
    os.chown(mine, *USER)
    # The owner keeps a file open for writing, makes it setuid, and writes again: that
    # write clears the bit, as on ext4, though the open had written before.
    code = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)
os.write(fd, b'echo one\\n')
os.chmod(sys.argv[1], 0o4755)
print(oct(os.stat(sys.argv[1]).st_mode & 0o7777))
os.write(fd, b'echo two\\n')
os.close(fd)
"""
    assert run_as(*USER, code, str(mine)).strip() == "0o4755"
    assert stat.S_IMODE(os.stat(export.backing / "mine").st_mode) == 0o755
    # Truncating at open clears it too.
    os.chmod(mine, 0o4777)
    os.chown(mine, 0, 0)
    run_as(
        *USER, "import os, sys; os.close(os.open(sys.argv[1], os.O_WRONLY | os.O_TRUNC))", str(mine)
    )
    assert stat.S_IMODE(os.stat(export.backing / "mine").st_mode) == 0o777


def test_chmod_keeps_setgid_only_for_a_group_of_the_caller(daemon: Daemon) -> None:
    export = Export(daemon, "data")
    os.chmod(export.path, 0o755)
    code = "import os, sys; os.chmod(sys.argv[1], 0o2755)"
    for name, group in (("foreign", 777), ("own", USER[1]), ("supplementary", 778)):
        (export.path / name).write_text("")
        os.chown(export.path / name, USER[0], group)
    run_as(*USER, code, str(export.path / "foreign"), groups=(778,))
    run_as(*USER, code, str(export.path / "own"), groups=(778,))
    run_as(*USER, code, str(export.path / "supplementary"), groups=(778,))
    modes = {
        name: stat.S_IMODE(os.stat(export.backing / name).st_mode)
        for name in ("foreign", "own", "supplementary")
    }
    assert modes == {"foreign": 0o755, "own": 0o2755, "supplementary": 0o2755}
