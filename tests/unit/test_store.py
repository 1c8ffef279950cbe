"""The volume store on a real directory and a real SQLite registry."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from volumed.errors import (
    AlreadyExists,
    AmbiguousReference,
    Conflict,
    HostPathRefused,
    InUse,
    InvalidArgument,
    NotFound,
    StorageError,
)
from volumed.model import ListFilter
from volumed.store import VolumeStore


@pytest.fixture
def store(home: Path) -> Iterator[VolumeStore]:
    store = VolumeStore.open(str(home))
    yield store
    store.close()


def entries(path: str) -> list[str]:
    return sorted(os.listdir(path))


def assert_consistent(store: VolumeStore) -> None:
    """Registry rows and directories match one to one; nothing is left in the trash."""
    rows = store.registry.all()
    assert entries(store.layout.named) == sorted(v.key for v in rows if v.kind == "named")
    assert entries(store.layout.anonymous) == sorted(v.key for v in rows if v.kind == "anonymous")
    assert entries(store.layout.trash) == []


def test_layout_is_private(store: VolumeStore) -> None:
    for path in (store.layout.home, store.layout.named, store.layout.anonymous):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700


def test_create_named_and_anonymous(store: VolumeStore) -> None:
    old_umask = os.umask(0)
    try:
        named = store.create(name="data", labels={"team": "db"}, size_bytes=64 << 20)
        anon = store.create(consumer="vm:web")
    finally:
        os.umask(old_umask)
    assert named.kind == "named"
    assert named.labels == {"team": "db"}
    assert named.size_bytes == 64 << 20
    assert anon.kind == "anonymous"
    assert anon.name is None
    assert anon.consumer == "vm:web"
    for volume in (named, anon):
        st = os.stat(os.path.join(store.layout.root(volume.kind), volume.key))
        assert stat.S_IMODE(st.st_mode) == 0o700
    assert_consistent(store)


def test_duplicate_name_changes_nothing(store: VolumeStore) -> None:
    first = store.create(name="data")
    with pytest.raises(AlreadyExists, match="'data' already exists"):
        store.create(name="data")
    assert [v.id for v in store.registry.all()] == [first.id]
    assert_consistent(store)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "../escape"},
        {"name": "01HZX4J3M8ZKQ6W9V2T7N5R1BC"},
        {"name": "ok", "labels": {"bad key": "x"}},
        {"name": "ok", "size_bytes": 5},
        {"name": "ok", "inode_limit": 1},
        {"consumer": ""},
    ],
)
def test_invalid_create_leaves_nothing(store: VolumeStore, kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        store.create(**kwargs)  # type: ignore[arg-type]
    assert store.registry.all() == []
    assert_consistent(store)


def test_failure_after_mkdir_rolls_back(
    store: VolumeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_fchmod(fd: int, mode: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fchmod", broken_fchmod)
    with pytest.raises(StorageError, match="No space left"):
        store.create(name="data")
    with pytest.raises(StorageError):
        store.create()
    monkeypatch.undo()
    assert store.registry.all() == []
    assert_consistent(store)
    assert store.create(name="data").name == "data"


def test_orphan_directory_blocks_create_until_reconciled(store: VolumeStore) -> None:
    os.mkdir(os.path.join(store.layout.named, "data"))
    Path(store.layout.named, "data", "keep").write_text("precious")
    with pytest.raises(Conflict, match="without a registry record"):
        store.create(name="data")
    assert store.registry.all() == []
    store.reconcile()
    assert store.resolve("data").labels.get("boxvol.adopted")
    assert Path(store.layout.named, "data", "keep").read_text() == "precious"


def test_resolve(store: VolumeStore) -> None:
    data = store.create(name="data")
    anon = store.create()
    assert store.resolve("data") == data
    assert store.resolve(anon.id) == anon
    assert store.resolve(anon.id.lower()) == anon
    store.remove("data")  # ids made in one millisecond share all but their last characters
    assert store.resolve(anon.id[:20]) == anon
    with pytest.raises(NotFound, match="boxvol ls"):
        store.resolve("nothing")
    with pytest.raises(NotFound):
        store.resolve(anon.id[:3])  # too short to be taken as a prefix
    with pytest.raises(HostPathRefused, match="never by path"):
        store.resolve("/var/lib/boxvol/volumes/named/data")
    with pytest.raises(InvalidArgument):
        store.resolve("")


def test_ambiguous_prefix(store: VolumeStore) -> None:
    a, b = store.create(), store.create()
    common = os.path.commonprefix([a.id, b.id])  # noqa: RUF071 - ids are ASCII
    assert len(common) >= 4  # ids made in one millisecond share a prefix
    with pytest.raises(AmbiguousReference, match="several volume ids"):
        store.resolve(common)


def test_remove(store: VolumeStore) -> None:
    volume = store.create(name="data")
    Path(store.layout.named, "data", "f").write_bytes(b"x" * 10000)
    os.makedirs(os.path.join(store.layout.named, "data", "d", "e"))
    assert store.remove("data") == volume
    assert store.registry.all() == []
    assert_consistent(store)
    with pytest.raises(NotFound):
        store.remove("data")


def test_remove_refuses_in_use_unless_forced(store: VolumeStore) -> None:
    volume = store.create(name="data")
    store.registry.add_export("E1", volume.id, "fuse", "now", {})
    assert store.state("data").in_use
    with pytest.raises(InUse, match="boxvol rm -f data"):
        store.remove("data")
    assert store.resolve("data") == volume
    store.remove("data", force=True)
    assert store.registry.export_counts() == {}
    assert_consistent(store)


def test_remove_with_directory_gone(store: VolumeStore) -> None:
    store.create(name="data")
    os.rmdir(os.path.join(store.layout.named, "data"))
    store.remove("data")
    assert store.registry.all() == []


def test_remove_never_follows_a_planted_symlink(store: VolumeStore, tmp_path: Path) -> None:
    store.create(name="data")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("x")
    os.rmdir(os.path.join(store.layout.named, "data"))
    os.symlink(victim, os.path.join(store.layout.named, "data"))
    with pytest.raises(Exception, match="resolves to"):
        store.remove("data")
    assert (victim / "precious").read_text() == "x"


def test_list_filters(store: VolumeStore) -> None:
    a = store.create(name="alpha", labels={"team": "db", "tier": "1"})
    b = store.create(name="beta", labels={"team": "web"})
    c = store.create()
    store.registry.add_export("E1", b.id, "fuse", "now", {})

    def ids(where: ListFilter) -> list[str]:
        return [s.volume.id for s in store.list_volumes(where)]

    assert ids(ListFilter()) == [a.id, b.id, c.id]
    assert ids(ListFilter(kind="named")) == [a.id, b.id]
    assert ids(ListFilter(kind="anonymous")) == [c.id]
    assert ids(ListFilter(labels=(("team", None),))) == [a.id, b.id]
    assert ids(ListFilter(labels=(("team", "db"),))) == [a.id]
    assert ids(ListFilter(labels=(("team", "db"), ("tier", "2")))) == []
    assert ids(ListFilter(name_contains="et")) == [b.id]
    assert ids(ListFilter(in_use=True)) == [b.id]
    assert ids(ListFilter(in_use=False)) == [a.id, c.id]


def test_prune(store: VolumeStore) -> None:
    named = store.create(name="keep")
    busy_anon = store.create()
    store.registry.add_export("E1", busy_anon.id, "fuse", "now", {})
    idle_anon = store.create()
    Path(store.layout.anonymous, idle_anon.id, "f").write_bytes(b"x" * 8192)
    removed, reclaimed = store.prune()
    assert [v.id for v in removed] == [idle_anon.id]
    assert reclaimed >= 8192
    removed, _ = store.prune(all_volumes=True)
    assert [v.id for v in removed] == [named.id]
    assert [v.id for v in store.registry.all()] == [busy_anon.id]


def test_usage_counts_hard_links_once(store: VolumeStore) -> None:
    volume = store.create(name="data")
    root = Path(store.layout.named, "data")
    (root / "a").write_bytes(b"x" * 65536)
    os.link(root / "a", root / "b")
    (root / "sub").mkdir()
    os.symlink("/etc", root / "sub" / "link")
    os.symlink("/", root / "dirlink")
    usage = store.usage(volume)
    assert usage.inodes == 5  # root, a (=b), sub, link, dirlink
    assert 65536 <= usage.bytes < 2 * 65536 + 4 * 4096


def test_reconcile(store: VolumeStore, tmp_path: Path) -> None:
    lost = store.create(name="lost")
    replaced = store.create(name="replaced")
    os.rmdir(os.path.join(store.layout.named, "lost"))
    os.rmdir(os.path.join(store.layout.named, "replaced"))
    os.symlink("/etc", os.path.join(store.layout.named, "replaced"))
    os.mkdir(os.path.join(store.layout.named, "stray"))
    Path(store.layout.named, "stray", "data").write_text("keep me")
    orphan_id = "01HZX4J3M8ZKQ6W9V2T7N5R1BC"
    os.mkdir(os.path.join(store.layout.anonymous, orphan_id))
    os.mkdir(os.path.join(store.layout.named, ".bad"))
    Path(store.layout.named, ".bad", "x").write_text("keep me too")
    Path(store.layout.anonymous, "notes.txt").write_text("not a volume")
    os.mkdir(os.path.join(store.layout.trash, "01HZX4J3M8ZKQ6W9V2T7N5R1BD"))

    actions = {(a.action, a.key) for a in store.reconcile()}

    assert actions == {
        ("finished-removal", "01HZX4J3M8ZKQ6W9V2T7N5R1BD"),
        ("recreated-empty", "lost"),
        ("recreated-empty", "replaced"),
        ("adopted", "stray"),
        ("adopted", orphan_id),
        ("quarantined", ".bad"),
        ("quarantined", "notes.txt"),
    }
    assert store.resolve("lost") == lost
    assert store.resolve("replaced") == replaced
    assert Path(store.layout.named, "stray", "data").read_text() == "keep me"
    assert store.resolve(orphan_id).kind == "anonymous"
    quarantined = entries(store.layout.quarantine)
    assert len(quarantined) == 3
    assert any(q.startswith("named-.bad-") for q in quarantined)
    kept = [Path(store.layout.quarantine, q, "x") for q in quarantined if ".bad" in q]
    assert kept[0].read_text() == "keep me too"
    assert_consistent(store)
    assert store.reconcile() == []  # a second pass finds nothing


def test_reconcile_restores_an_uncommitted_removal(store: VolumeStore) -> None:
    volume = store.create(name="data")
    Path(store.layout.named, "data", "f").write_text("still mine")
    # A crash after the rename into the trash, before the row was deleted:
    os.rename(os.path.join(store.layout.named, "data"), os.path.join(store.layout.trash, volume.id))
    actions = [(a.action, a.key) for a in store.reconcile()]
    assert actions == [("restored", "data")]
    assert Path(store.layout.named, "data", "f").read_text() == "still mine"
    assert_consistent(store)


def test_reconcile_adopts_with_private_mode_and_refuses_id_aliases(store: VolumeStore) -> None:
    registered = store.create()
    alias = registered.id.lower()
    os.mkdir(os.path.join(store.layout.anonymous, alias))
    Path(store.layout.anonymous, alias, "x").write_text("x")
    os.mkdir(os.path.join(store.layout.named, "loose"), 0o755)
    actions = {(a.action, a.key) for a in store.reconcile()}
    assert actions == {("quarantined", alias), ("adopted", "loose")}
    mode = os.stat(os.path.join(store.layout.named, "loose")).st_mode
    assert stat.S_IMODE(mode) == 0o700
    assert store.resolve(registered.id) == registered
    assert_consistent(store)


def test_a_failed_registry_write_leaves_the_registry_usable(store: VolumeStore) -> None:
    import sqlite3

    with pytest.raises(StorageError, match="refused a write"), store.registry.deleting("x"):
        raise sqlite3.OperationalError("disk I/O error")
    assert store.create(name="after").name == "after"


def test_volume_count_follows_commits_only(home: Path) -> None:
    """health's count is kept in memory: it moves with committed creates and removes, not
    with a refused create, and a reopened store counts what the database holds."""
    store = VolumeStore.open(str(home))
    store.create(name="a")
    store.create()
    with pytest.raises(AlreadyExists):
        store.create(name="a")
    assert store.registry.count() == 2
    store.remove("a")
    assert store.registry.count() == 1
    store.close()
    reopened = VolumeStore.open(str(home))
    try:
        assert reopened.registry.count() == 1
    finally:
        reopened.close()
