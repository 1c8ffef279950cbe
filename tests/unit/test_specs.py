"""The -v spec parser."""

from __future__ import annotations

import pytest

from volumed.errors import HostPathRefused, InvalidArgument
from volumed.specs import VolumeSpec, parse_spec, parse_specs


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/data", VolumeSpec(None, "/data", read_only=False)),
        ("/data:ro", VolumeSpec(None, "/data", read_only=True)),
        ("/data:rw", VolumeSpec(None, "/data", read_only=False)),
        ("db:/var/lib/db", VolumeSpec("db", "/var/lib/db", read_only=False)),
        ("db:/var/lib/db:ro", VolumeSpec("db", "/var/lib/db", read_only=True)),
        ("db:/srv//x/", VolumeSpec("db", "/srv/x", read_only=False)),
    ],
)
def test_accepted_forms(text: str, expected: VolumeSpec) -> None:
    spec = parse_spec(text)
    assert spec == expected
    assert spec.anonymous is (expected.name is None)


@pytest.mark.parametrize(
    "text", ["/host:/guest", "/host:/guest:ro", "./rel:/g", "~/x:/g", "a/b:/g"]
)
def test_host_binds_get_the_migration_message(text: str) -> None:
    with pytest.raises(HostPathRefused) as caught:
        parse_spec(text)
    message = caught.value.message
    assert "host bind mounts are not supported" in message
    assert "NAME:/" in message  # shows the named form
    assert "an anonymous one, '/" in message


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("data", "not absolute"),
        ("data:ro", "not absolute"),
        ("myvol:data", "not absolute"),
        (":/app", "empty part"),
        ("/data:", "empty part"),
        ("", "empty part"),
        ("/data:rx", "unknown option"),
        ("db:/data:rox", "unknown option"),
        ("a:/b:ro:x", "too many"),
        ("/a:/b:ro:rw", "too many"),
        ("/", "root"),
        ("/g:ro:rw", "one option"),
        ("db:/", "root"),
        ("db:/a/../b", "'..'"),
        ("bad name:/g", "not a volume name"),
        ("-x:/g", "not a volume name"),
    ],
)
def test_refused_specs_say_why(text: str, why: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_spec(text)
    assert why in caught.value.message
    assert not isinstance(caught.value, HostPathRefused)


def test_relative_guest_path_with_mode_suggests_the_absolute_form() -> None:
    with pytest.raises(InvalidArgument, match=r"e\.g\. '/data:ro'"):
        parse_spec("data:ro")


def test_a_list_is_validated_whole() -> None:
    with pytest.raises(HostPathRefused):
        parse_specs(["a:/a", "/b", "/host:/c"])
    with pytest.raises(InvalidArgument, match="both mount at '/a'"):
        parse_specs(["x:/a", "/a:ro"])
    assert [str(s) for s in parse_specs(["x:/a:ro", "/b"])] == ["x:/a:ro", "/b"]
