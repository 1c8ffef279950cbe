"""Specs resolve to volumes through the real daemon: named ones stably, anonymous ones fresh."""

from __future__ import annotations

import pytest

from tests.helpers import Daemon
from volumed.client import ensure_spec_volumes
from volumed.errors import InvalidArgument
from volumed.specs import parse_specs


def test_named_specs_are_stable_and_anonymous_ones_fresh(daemon: Daemon) -> None:
    client = daemon.client()
    specs = parse_specs(["db:/var/lib/db", "/scratch", "db2:/x:ro"])
    first = ensure_spec_volumes(client, specs, consumer="vm:one")
    second = ensure_spec_volumes(client, specs, consumer="vm:two")
    assert first[0]["id"] == second[0]["id"]
    assert first[2]["id"] == second[2]["id"]
    assert first[1]["id"] != second[1]["id"]
    assert first[1]["kind"] == "anonymous"
    assert first[1]["consumer"] == "vm:one"
    assert len(client.list_volumes()) == 4


def test_a_bad_spec_at_the_end_creates_nothing(daemon: Daemon) -> None:
    with pytest.raises(InvalidArgument):
        ensure_spec_volumes(daemon.client(), parse_specs(["a:/a", "/b", "relative"]))
    assert daemon.client().list_volumes() == []


def test_failure_midway_removes_the_anonymous_volumes_it_made(daemon: Daemon) -> None:
    client = daemon.client()
    # The daemon refuses the create itself: nothing is left.
    specs = parse_specs(["new:/n", "/a", "/b"])
    with pytest.raises(InvalidArgument, match="consumer"):
        ensure_spec_volumes(client, specs[1:2], consumer="x" * 300)
    assert client.list_volumes() == []

    # The third create fails after a named and an anonymous one were made: both go again.
    class FailSecond:
        def __init__(self) -> None:
            self.calls = 0

        def __getattr__(self, name: str) -> object:
            return getattr(client, name)

        def create_volume(self, *args: object, **kwargs: object) -> dict[str, object]:
            self.calls += 1
            if self.calls == 3:
                raise InvalidArgument("injected failure")
            return client.create_volume(*args, **kwargs)  # type: ignore[arg-type]

    with pytest.raises(InvalidArgument, match="injected"):
        ensure_spec_volumes(FailSecond(), specs)  # type: ignore[arg-type]
    assert client.list_volumes() == []
