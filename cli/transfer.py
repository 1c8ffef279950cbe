"""The client's half of ``boxvol archive`` and ``boxvol restore``: copying between a file (or
stdin/stdout) and the pipe whose other end boxvold hands to its archive worker.

The copy runs in a thread while the main thread waits for the API's answer; the data never
passes through boxvold. The thread closes its pipe end when it stops, so the worker sees the
end of the archive (restore) or a broken pipe (archive, when the output fails). On a
terminal, stderr shows a progress bar. Imported only by those two commands: the threading
import costs the other commands' start-up nothing.
"""

from __future__ import annotations

import os
import threading
import time

TYPE_CHECKING = False  # as in cli.main: typing is not imported on the CLI's path
if TYPE_CHECKING:
    from typing import TextIO

CHUNK = 1 << 16
#: Seconds between two redraws of the progress bar.
REDRAW = 0.1


class Copy:
    """Copies ``src`` to ``dst`` until the end of ``src`` in a daemon thread, then closes
    ``pipe_end`` (one of the two: the pipe shared with the worker).

    A copy that is never joined (the request failed, or Ctrl-C) dies with the process, and
    with it the pipe: the worker then sees a broken pipe or a cut-short archive and fails,
    changing nothing."""

    def __init__(
        self,
        src: int,
        dst: int,
        *,
        pipe_end: int,
        total: int | None = None,
        progress: TextIO | None = None,
    ) -> None:
        self.src, self.dst, self.pipe_end = src, dst, pipe_end
        self.copied = 0
        #: Why the copy stopped before the end of ``src``, if it did.
        self.error: OSError | None = None
        self._bar = Progress(progress, total) if progress is not None else None
        self._thread = threading.Thread(target=self._run, name="boxvol-copy", daemon=True)

    def start(self) -> None:
        """Start copying."""
        self._thread.start()

    def join(self) -> None:
        """Wait for the end of the copy (and finish the progress bar)."""
        self._thread.join()
        if self._bar is not None:
            self._bar.finish(self.copied)

    def _run(self) -> None:
        try:
            while data := os.read(self.src, CHUNK):
                view = memoryview(data)
                while view:
                    view = view[os.write(self.dst, view) :]
                self.copied += len(data)
                if self._bar is not None:
                    self._bar.update(self.copied)
        except OSError as exc:
            self.error = exc
        finally:
            os.close(self.pipe_end)


class Progress:
    """A one-line progress bar redrawn in place: bytes so far, of ``total`` if known, and
    the rate."""

    def __init__(self, out: TextIO, total: int | None) -> None:
        self.out = out
        self.total = total
        self.started = time.monotonic()
        self._drawn = 0.0

    def update(self, done: int) -> None:
        """Redraw, at most every REDRAW seconds."""
        now = time.monotonic()
        if now - self._drawn >= REDRAW:
            self._drawn = now
            self._draw(done, now)

    def finish(self, done: int) -> None:
        """The last state, and the end of the line."""
        self._draw(done, time.monotonic(), final=True)
        self.out.write("\n")
        self.out.flush()

    def _draw(self, done: int, now: float, *, final: bool = False) -> None:
        from volumed.sizes import format_size

        rate = done / max(now - self.started, 1e-3)
        if self.total:
            # The total is an estimate (a volume's usage; an archive holds headers and
            # holes too): never past 99 % before the end.
            share = min(done / self.total, 1.0 if final else 0.99)
            filled = int(share * 30)
            line = (
                f"[{'#' * filled}{'.' * (30 - filled)}] {share * 100:3.0f}%  "
                f"{format_size(done)} of ~{format_size(self.total)}"
            )
        else:
            line = format_size(done)
        self.out.write(f"\r{line}  {format_size(int(rate))}/s\x1b[K")
        self.out.flush()
