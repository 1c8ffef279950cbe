"""The differential harness itself: it passes on two equal file systems and fails, naming the
seed and the replay command, on a subject that misbehaves in one small way.

Replay a failure of `test_plain_directories_agree` with the command its message prints, e.g.
`BOXVOL_FSDIFF_SEED=5 BOXVOL_FSDIFF_STEPS=1234 pytest tests/fsdiff`.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fsdiff.engine import (
    ARGS,
    DEFAULT_STEPS,
    Fields,
    FsdiffMismatch,
    Op,
    Outcome,
    Tree,
    Value,
    compare_snapshots,
    generate_ops,
    run_differential,
    run_trees,
    seed_from_env,
    steps_from_env,
)

SEED = 20_240_601  # the fixed seed CI runs; override with BOXVOL_FSDIFF_SEED to explore


def _roots(tmp_path: Path) -> tuple[Path, Path]:
    subject, reference = tmp_path / "subject", tmp_path / "reference"
    subject.mkdir(parents=True)
    reference.mkdir(parents=True)
    return subject, reference


# --- it passes ------------------------------------------------------------------------------


def test_plain_directories_agree(tmp_path: Path) -> None:
    """Two plain directories on the same file system never differ (the replay target)."""
    subject, reference = _roots(tmp_path)
    run_differential(subject, reference, seed_from_env(SEED), steps_from_env(DEFAULT_STEPS))


def test_sequence_reaches_every_operation_and_both_outcomes(tmp_path: Path) -> None:
    """The namespace is dense enough that each kind of operation both succeeds and fails, so a
    passing run means something."""
    subject, reference = _roots(tmp_path)
    with Tree(subject) as s, Tree(reference) as r:
        report = run_trees(s, r, SEED, DEFAULT_STEPS)
    kinds = {kind for kind, _ in report.counts}
    assert kinds == set(ARGS)
    for kind in ARGS.keys() - {"umask"}:
        labels = {label for k, label in report.counts if k == kind}
        assert "ok" in labels, kind
        assert labels - {"ok"}, kind
    errnos = {label for _, label in report.counts} - {"ok"}
    assert {"ENOENT", "EEXIST", "ENOTDIR", "EISDIR", "ENOTEMPTY", "ELOOP", "EINVAL"} <= errnos
    assert {"ENAMETOOLONG", "ENODATA", "ERANGE", "EBADF", "EPERM", "ENXIO", "ESPIPE"} <= errnos
    assert report.counts["write", "ok"] > 100
    assert report.counts["link", "ok"] > 10


def test_sequence_is_a_function_of_the_seed() -> None:
    first = list(generate_ops(7, 2000))
    assert first == list(generate_ops(7, 2000))
    assert list(generate_ops(7, 300)) == first[:300]  # a replay with fewer steps is a prefix
    assert list(generate_ops(8, 300)) != first[:300]


def test_seed_and_steps_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BOXVOL_FSDIFF_SEED", raising=False)
    monkeypatch.delenv("BOXVOL_FSDIFF_STEPS", raising=False)
    assert (seed_from_env(3), steps_from_env()) == (3, DEFAULT_STEPS)
    monkeypatch.setenv("BOXVOL_FSDIFF_SEED", "0x10")
    monkeypatch.setenv("BOXVOL_FSDIFF_STEPS", "250")
    assert (seed_from_env(3), steps_from_env()) == (16, 250)


def test_roots_must_start_empty(tmp_path: Path) -> None:
    subject, reference = _roots(tmp_path)
    (subject / "leftover").touch()
    with pytest.raises(ValueError, match="not empty"):
        run_differential(subject, reference, SEED, 10)


# --- it fails -------------------------------------------------------------------------------


class IgnoresCreateMode(Tree):
    """Creates every file 0644 whatever mode was asked for (pyfuse3's example does this)."""

    def op_create(self, op: Op) -> Value:
        return super().op_create(Op(op.kind, path=op.path, flags=op.flags, mode=0o644))


class DoubleUmask(Tree):
    """Applies a second, fixed umask of 022 to new directories."""

    def op_mkdir(self, op: Op) -> Value:
        return super().op_mkdir(Op(op.kind, path=op.path, mode=op.mode & ~0o022))


class CorruptsReads(Tree):
    """Returns the right length but one wrong byte."""

    def op_read(self, op: Op) -> Value:
        data = super().op_read(op)
        if isinstance(data, bytes) and len(data) > 10:
            return data[:10] + bytes([data[10] ^ 1]) + data[11:]
        return data


class WrongRmdirErrno(Tree):
    """Answers EEXIST for a non-empty directory, where Linux file systems answer ENOTEMPTY."""

    def op_rmdir(self, op: Op) -> Value:
        try:
            return super().op_rmdir(op)
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY:
                raise OSError(errno.EEXIST, os.strerror(errno.EEXIST)) from None
            raise


class AppendSharedPerInode(Tree):
    """Forgets O_APPEND on the second of two opens of one file (a server keeping one backing fd
    per inode): the positional write of `append_mixed` appends too."""

    def op_append_mixed(self, op: Op) -> Value:
        with (
            self.opened(op.path, os.O_WRONLY | os.O_APPEND) as appending,
            self.opened(op.path, os.O_WRONLY | os.O_APPEND) as positional,
        ):
            second = os.pwrite(positional, op.data2, op.offset)
            first = os.write(appending, op.data)
            size = os.fstat(positional).st_size
            return Fields.of(appended=first, written_at_offset=second, size=size)


class LosesXattrValue(Tree):
    """Stores user xattrs truncated to 7 bytes."""

    def op_setxattr(self, op: Op) -> Value:
        return super().op_setxattr(
            Op(op.kind, path=op.path, xname=op.xname, data=op.data[:7], flags=op.flags)
        )


class ForgetsExplicitMtimeOnChmod(Tree):
    """Sets mtime to "now" whenever it changes a mode."""

    def op_chmod(self, op: Op) -> Value:
        value = super().op_chmod(op)
        with self.parent(op.path) as (parent, name):
            os.utime(name, dir_fd=parent, follow_symlinks=False)
        return value


class PlantsAFile(Tree):
    """Someone else drops a file into the subject, after operation `at` (counting from 1)."""

    def __init__(self, root: Path, *, at: int) -> None:
        super().__init__(root)
        self.at = at
        self.applied = 0

    def apply(self, op: Op) -> Outcome:
        outcome = super().apply(op)
        self.applied += 1
        if self.applied == self.at:
            fd = os.open(
                "planted", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=self.root_fd
            )
            os.close(fd)
        return outcome


SABOTAGE = [
    pytest.param(IgnoresCreateMode, "create(", "mode 0o100644 (subject)", id="create-mode"),
    pytest.param(DoubleUmask, "mkdir(", "mode", id="double-umask"),
    pytest.param(CorruptsReads, "read(", "first difference at offset 10", id="read-data"),
    pytest.param(WrongRmdirErrno, "rmdir(", "EEXIST (subject) != ENOTEMPTY", id="errno"),
    pytest.param(AppendSharedPerInode, "append_mixed(", "size: ", id="append-per-open"),
    pytest.param(LosesXattrValue, "xattr(", "", id="xattr-value"),
    pytest.param(ForgetsExplicitMtimeOnChmod, "stat(", "mtime_ns", id="mtime"),
]


@pytest.mark.parametrize(("broken", "operation", "difference"), SABOTAGE)
def test_a_broken_subject_is_caught(
    tmp_path: Path, broken: type[Tree], operation: str, difference: str
) -> None:
    subject, reference = _roots(tmp_path)
    caller_umask = os.umask(0o077)
    try:
        with (
            broken(subject) as s,
            Tree(reference) as r,
            pytest.raises(FsdiffMismatch) as caught,
        ):
            run_trees(s, r, SEED, DEFAULT_STEPS, replay="pytest tests/fsdiff -k agree")
        assert os.umask(0o077) == 0o077, "the harness must restore the caller's umask"
    finally:
        os.umask(caller_umask)
    assert isinstance(caught.value, AssertionError)  # what pytest reports as a failure
    lines = str(caught.value).splitlines()
    header = re.fullmatch(
        rf"fsdiff: mismatch at step (\d+) of {DEFAULT_STEPS} \(seed {SEED}\)", lines[0]
    )
    assert header, lines[0]
    step = int(header.group(1))
    assert lines[1].startswith("  operation: ")
    assert operation in lines[1]
    assert lines[2].startswith("  subject:   ")
    assert lines[3].startswith("  reference: ")
    assert lines[2] != lines[3]
    assert any(difference in line for line in lines if line.startswith("  difference: "))
    replay = f"replay: BOXVOL_FSDIFF_SEED={SEED} BOXVOL_FSDIFF_STEPS={step + 1} "
    assert replay + "pytest tests/fsdiff -k agree" in lines
    context = [int(m.group(1)) for line in lines if (m := re.match(r"  (\d+): ", line))]
    assert context == list(range(max(0, step - 20), step))


def test_a_replay_stops_at_the_failing_step(tmp_path: Path) -> None:
    """The printed STEPS value reproduces the failure as the last step of a shorter run."""
    subject, reference = _roots(tmp_path)
    with (
        IgnoresCreateMode(subject) as s,
        Tree(reference) as r,
        pytest.raises(FsdiffMismatch) as first,
    ):
        run_trees(s, r, SEED, DEFAULT_STEPS)
    steps = int(re.findall(r"BOXVOL_FSDIFF_STEPS=(\d+)", str(first.value))[0])
    subject, reference = _roots(tmp_path / "again")
    with (
        IgnoresCreateMode(subject) as s,
        Tree(reference) as r,
        pytest.raises(FsdiffMismatch) as second,
    ):
        run_trees(s, r, SEED, steps)
    assert str(second.value).splitlines()[1:4] == str(first.value).splitlines()[1:4]


@pytest.mark.parametrize("at", [DEFAULT_STEPS // 2, DEFAULT_STEPS])
def test_a_file_planted_in_the_subject_is_caught(tmp_path: Path, at: int) -> None:
    subject, reference = _roots(tmp_path)
    with (
        PlantsAFile(subject, at=at) as s,
        Tree(reference) as r,
        pytest.raises(FsdiffMismatch) as caught,
    ):
        run_trees(s, r, SEED, DEFAULT_STEPS)
    message = str(caught.value)
    assert f"(seed {SEED})" in message
    assert "'planted'" in message
    if at == DEFAULT_STEPS:  # nothing looks at the root after the last step but the final check
        assert message.startswith(f"fsdiff: final trees differ after {DEFAULT_STEPS} steps")
        assert "  'planted': only in subject (file)" in message.splitlines()
        assert f"BOXVOL_FSDIFF_STEPS={DEFAULT_STEPS} pytest tests/fsdiff" in message


# --- the final comparison -------------------------------------------------------------------


def _make_reference(root: Path) -> None:
    (root / "d").mkdir()
    (root / "d" / "f").write_bytes(b"0123456789")
    os.setxattr(root / "d" / "f", "user.k", b"v")
    os.link(root / "d" / "f", root / "g")
    os.symlink("d/f", root / "s")


def _change_content(root: Path) -> None:
    (root / "d" / "f").write_bytes(b"0123X56789")


def _change_mode(root: Path) -> None:
    (root / "d").chmod(0o700)


def _change_xattr(root: Path) -> None:
    os.setxattr(root / "d" / "f", "user.k", b"w")


def _change_target(root: Path) -> None:
    (root / "s").unlink()
    os.symlink("d/F", root / "s")


def _break_link(root: Path) -> None:
    (root / "g").unlink()
    (root / "g").write_bytes(b"0123456789")
    os.setxattr(root / "g", "user.k", b"v")


def _change_type(root: Path) -> None:
    (root / "s").unlink()
    os.mkfifo(root / "s")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_change_content, "'d/f': content differs: 10 vs 10 bytes, first difference at offset 4"),
        (_change_mode, "'d': mode 0o40700 (subject) != 0o40755 (reference)"),
        (_change_xattr, "'g': xattrs {'user.k': b'w'} (subject) != {'user.k': b'v'} (reference)"),
        (_change_target, "'s': symlink target 'd/F' (subject) != 'd/f' (reference)"),
        (_break_link, "'d/f': hard links [] (subject) != ['g'] (reference)"),
        (_change_type, "'s': type fifo (subject) != symlink (reference)"),
    ],
)
def test_final_trees_are_compared_completely(
    tmp_path: Path, change: Callable[[Path], None], expected: str
) -> None:
    subject, reference = _roots(tmp_path)
    umask = os.umask(0o022)
    try:
        _make_reference(subject)
        _make_reference(reference)
        with Tree(subject) as s, Tree(reference) as r:
            assert compare_snapshots(s.snapshot(), r.snapshot(), ()) == []
            change(subject)
            differences = compare_snapshots(s.snapshot(), r.snapshot(), ())
    finally:
        os.umask(umask)
    assert expected in differences, differences
