"""Name, id and label rules."""

from __future__ import annotations

import pytest

from volumed.errors import InvalidArgument
from volumed.names import (
    NAME_RULE,
    check_labels,
    check_name,
    is_id_prefix,
    is_volume_id,
    parse_label,
)

ULID = "01HZX4J3M8ZKQ6W9V2T7N5R1BC"


@pytest.mark.parametrize(
    "name", ["a", "A", "0", "data", "my-vol", "my_vol", "v1.2", "a" * 64, "x-", "x..y"]
)
def test_valid_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "..",
        ".",
        ".hidden",
        "-dash",
        "_under",
        "a/b",
        "a\\b",
        "with space",
        "tab\there",
        "new\nline",
        "nul\0",
        "del\x7f",
        "a" * 65,
        "é",
        "vol:ro",
        ULID,
        ULID.lower(),
    ],
)
def test_invalid_names_state_the_rule(name: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_name(name)
    assert NAME_RULE in caught.value.message
    assert repr(name) in caught.value.message


def test_ulid_shapes() -> None:
    assert is_volume_id(ULID)
    assert is_volume_id(ULID.lower())
    assert not is_volume_id(ULID[:-1])
    assert not is_volume_id("81HZX4J3M8ZKQ6W9V2T7N5R1BC")  # timestamp overflow
    assert not is_volume_id("01HZX4J3M8ZKQ6W9V2T7N5R1BU")  # U is not Crockford


def test_id_prefix_needs_four_characters() -> None:
    assert is_id_prefix("01HZ")
    assert not is_id_prefix("01H")
    assert not is_id_prefix("01H!")


def test_labels() -> None:
    assert check_labels({"team": "db", "a.b/c-d_e": ""}) == {"team": "db", "a.b/c-d_e": ""}
    assert parse_label("team=db=x") == ("team", "db=x")
    assert parse_label("flag") == ("flag", "")
    for bad in ({"": "x"}, {"-a": "x"}, {"a b": "x"}, {"k": "line\nbreak"}, {"k" * 129: ""}):
        with pytest.raises(InvalidArgument, match="label"):
            check_labels(bad)
    with pytest.raises(InvalidArgument, match="too many labels"):
        check_labels({f"k{i}": "" for i in range(65)})
