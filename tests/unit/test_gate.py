"""The gate: only a real directory directly under a managed root is a volume directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from volumed.errors import OutsideManagedRoots
from volumed.gate import check_volume_path, volume_directory
from volumed.locations import Layout
from volumed.model import Volume

ULID = "01HZX4J3M8ZKQ6W9V2T7N5R1BC"


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    layout = Layout(str(tmp_path / "home"))
    os.makedirs(layout.named)
    os.makedirs(layout.anonymous)
    return layout


def named(name: str) -> Volume:
    return Volume(id=ULID, kind="named", created_at="", name=name)


def anonymous(vid: str = ULID) -> Volume:
    return Volume(id=vid, kind="anonymous", created_at="")


def assert_refused(layout: Layout, volume: Volume, why: str) -> None:
    with pytest.raises(OutsideManagedRoots) as caught:
        volume_directory(layout, volume)
    message = caught.value.message
    assert why in message
    assert layout.named in message
    assert layout.anonymous in message


def test_accepts_real_volume_directories(layout: Layout) -> None:
    os.mkdir(os.path.join(layout.named, "data"))
    os.mkdir(os.path.join(layout.anonymous, ULID))
    assert volume_directory(layout, named("data")) == os.path.join(layout.named, "data")
    assert volume_directory(layout, anonymous()) == os.path.join(layout.anonymous, ULID)


def test_home_behind_a_symlink_is_canonicalised(tmp_path: Path, layout: Layout) -> None:
    os.mkdir(os.path.join(layout.named, "data"))
    os.symlink(layout.home, tmp_path / "alias")
    via_alias = Layout(str(tmp_path / "alias"))
    assert volume_directory(via_alias, named("data")) == os.path.join(layout.named, "data")


def test_refuses_missing_and_files(layout: Layout) -> None:
    assert_refused(layout, named("nothing"), "does not exist")
    Path(layout.named, "file").write_text("x")
    assert_refused(layout, named("file"), "not a directory")


def test_refuses_symlink_escape(tmp_path: Path, layout: Layout) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, os.path.join(layout.named, "evil"))
    assert_refused(layout, named("evil"), f"resolves to {outside}")
    os.symlink("/etc", os.path.join(layout.anonymous, ULID))
    assert_refused(layout, anonymous(), "resolves to /etc")


def test_refuses_symlink_to_another_volume(layout: Layout) -> None:
    os.mkdir(os.path.join(layout.named, "real"))
    os.symlink("real", os.path.join(layout.named, "alias"))
    assert_refused(layout, named("alias"), "resolves to")


def test_refuses_roots_descendants_and_bad_keys(layout: Layout) -> None:
    os.makedirs(os.path.join(layout.named, "a", "b"))
    for key in ("", ".", "..", "a/b", "../named"):
        assert_refused(layout, named(key), "not a valid volume name")
    assert_refused(layout, anonymous("not-an-id"), "not a valid volume name or id")
    # kind and key must agree: a named record cannot point into the anonymous root
    os.mkdir(os.path.join(layout.anonymous, ULID))
    assert_refused(layout, named(ULID), "not a valid volume name")


def test_check_volume_path(tmp_path: Path, layout: Layout) -> None:
    os.makedirs(os.path.join(layout.named, "a", "b"))
    assert check_volume_path(layout, os.path.join(layout.named, "a")) == os.path.join(
        layout.named, "a"
    )
    for path in (
        layout.named,
        layout.anonymous,
        layout.volumes,
        os.path.join(layout.named, "a", "b"),
        os.path.join(layout.named, "a", ".."),
        "/etc",
    ):
        with pytest.raises(OutsideManagedRoots):
            check_volume_path(layout, path)
    os.symlink("/etc", os.path.join(layout.named, "link"))
    with pytest.raises(OutsideManagedRoots, match="resolves to /etc"):
        check_volume_path(layout, os.path.join(layout.named, "link"))
