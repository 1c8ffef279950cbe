"""The per-domain change lock: a lock that cannot be opened is a clear error, and a waiter
names the holder."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmdriver.driver import DomainBusy, VMDriverError
from vmdriver.locks import domain_lock

UUID = "6c1b1c3e-0000-4000-8000-000000000001"


def test_an_unusable_lock_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with (
        pytest.raises(VMDriverError, match="cannot open the change lock of domain web1 at "),
        domain_lock(str(blocker / "vm-locks"), UUID, "web1"),
    ):
        pass


def test_a_waiter_names_the_holder_and_gives_up(tmp_path: Path) -> None:
    with domain_lock(str(tmp_path), UUID, "web1"):
        with (
            pytest.raises(DomainBusy, match=r"domain web1 is being changed by pid \d+: ") as busy,
            domain_lock(str(tmp_path), UUID, "web1", wait=0.1),
        ):
            pass
        assert "try again once it has finished" in busy.value.message
    with domain_lock(str(tmp_path), UUID, "web1", wait=0.1):  # free again
        pass
