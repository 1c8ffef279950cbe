"""The set-id rules as pure functions of modes and credentials."""

from __future__ import annotations

import dataclasses

from volumed.fs.setid import chmod_mode, killed_mode, new_file_mode, without_set_id


@dataclasses.dataclass
class Who:
    """Credentials that count how often group membership was asked (it may cost I/O)."""

    privileged: bool = False
    groups: frozenset[int] = frozenset({100})
    asked: int = 0

    def in_group(self, gid: int) -> bool:
        self.asked += 1
        return gid in self.groups


def test_chmod_keeps_setgid_only_in_a_group_of_the_caller() -> None:
    assert chmod_mode(0o2755, 200, Who()) == 0o755
    assert chmod_mode(0o2755, 100, Who()) == 0o2755
    assert chmod_mode(0o2755, 200, Who(privileged=True)) == 0o2755
    # setuid and sticky are the owner's to set; the kernel checked ownership already.
    assert chmod_mode(0o5755, 200, Who()) == 0o5755
    assert chmod_mode(0o6644, 200, Who()) == 0o4644


def test_group_membership_is_asked_only_when_setgid_is_at_stake() -> None:
    who = Who()
    chmod_mode(0o4755, 200, who)
    new_file_mode(0o2644, 200, who)  # no group execute: mode_strip_sgid leaves it
    chmod_mode(0o2755, 200, Who(privileged=True))
    assert who.asked == 0


def test_new_files_keep_setgid_with_group_execute_only_in_a_group_of_the_caller() -> None:
    assert new_file_mode(0o2755, 200, Who()) == 0o755
    assert new_file_mode(0o2755, 100, Who()) == 0o2755
    assert new_file_mode(0o2644, 200, Who()) == 0o2644
    assert new_file_mode(0o4755, 200, Who()) == 0o4755


def test_a_write_kills_setuid_and_executable_setgid() -> None:
    assert killed_mode(0o6755) == 0o755
    assert killed_mode(0o4700) == 0o700
    assert killed_mode(0o2745) == 0o2745  # not group-executable: a locking mark, kept
    assert killed_mode(0o1777) == 0o1777


def test_without_set_id_keeps_the_rest() -> None:
    assert without_set_id(0o7777) == 0o1777
    assert without_set_id(0o40000 | 0o2775) == 0o40000 | 0o775
