"""cli.transfer: the copy between a file and the worker's pipe, and its progress bar."""

from __future__ import annotations

import io
import os

from cli.transfer import Copy, Progress


def test_copy_moves_everything_and_closes_its_pipe_end() -> None:
    data = os.urandom(1000)
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    bar = io.StringIO()
    copy = Copy(src_r, dst_w, pipe_end=dst_w, total=len(data), progress=bar)
    copy.start()
    os.write(src_w, data)
    os.close(src_w)
    received = b""
    while chunk := os.read(dst_r, 1 << 16):  # EOF only once the copy closed dst_w
        received += chunk
    copy.join()
    os.close(src_r)
    os.close(dst_r)
    assert received == data
    assert copy.error is None and copy.copied == 1000
    assert bar.getvalue().endswith("\n")
    assert "\r" in bar.getvalue()


def test_a_broken_pipe_stops_the_copy_with_its_error() -> None:
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    os.close(dst_r)
    copy = Copy(src_r, dst_w, pipe_end=dst_w)
    copy.start()
    os.write(src_w, b"x")
    copy.join()
    os.close(src_w)
    os.close(src_r)
    assert isinstance(copy.error, BrokenPipeError)


def test_progress_never_claims_done_before_the_end() -> None:
    out = io.StringIO()
    bar = Progress(out, total=100)
    bar.update(150)  # an estimate that was low
    assert " 99%" in out.getvalue()
    bar.finish(150)
    assert "100%" in out.getvalue().rsplit("\r", 1)[-1]
    unknown = io.StringIO()
    Progress(unknown, total=None).finish(2048)
    assert unknown.getvalue().startswith("\r2.0K")
