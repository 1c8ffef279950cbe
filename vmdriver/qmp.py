"""A small QMP client on trio: the QEMU Machine Protocol over a unix socket.

QEMU's maintained client, ``qemu.qmp``, is asyncio-only, and boxvol's async code is trio; a
bridge would run a second event loop in a thread for a protocol of four rules. So this module
speaks it itself (docs/backends.md says so):

1. on connecting, QEMU sends a greeting (``{"QMP": {...}}``);
2. the client sends ``qmp_capabilities`` and from then on may send commands;
3. each command carries an ``id``; its answer (``return`` or ``error``) carries it back;
4. events (``{"event": NAME, "data": ...}``) arrive at any time, between answers.

Messages are JSON objects, one per line. A reader task routes answers to the command waiting
for them and events to a channel the caller reads. QEMU serves one QMP client per socket at a
time: a second client is left unanswered in the listen backlog, so the greeting has a
deadline and its absence is reported as a busy monitor.

Only the connection is here; what boxvol asks of QEMU is ``vmdriver.backends.qmp``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

import trio

from vmdriver.driver import HypervisorError, HypervisorUnavailable
from vmdriver.processes import ProcessInstance, peer_instance

log = logging.getLogger(__name__)

#: How long QEMU gets to greet a new client (it greets at once unless another client holds
#: the monitor).
GREETING_TIMEOUT = 5.0
#: How long one command may take (device_add and friends answer in milliseconds).
COMMAND_TIMEOUT = 30.0
#: The longest message accepted (query-pci on a large machine is tens of KiB).
MAX_MESSAGE_BYTES = 8 << 20
#: Events kept for a caller that has not read them yet; older ones are dropped (logged).
EVENT_BUFFER = 1024


class QmpCommandError(HypervisorError):
    """QEMU answered a command with an error (``error.class``, ``error.desc``)."""

    code = "qmp_error"

    def __init__(self, message: str, error_class: str) -> None:
        super().__init__(message)
        self.error_class = error_class


class QmpConnection:
    """One open QMP session; use ``QmpConnection.open`` (an async context manager)."""

    def __init__(self, stream: trio.SocketStream, path: str, instance: ProcessInstance) -> None:
        self.path = path
        #: The QEMU process on the other end (from the socket's peer credentials).
        self.instance = instance
        self._stream = stream
        self._buffer = b""
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._send_lock = trio.Lock()
        self._events_in, self._events = trio.open_memory_channel[dict[str, Any]](EVENT_BUFFER)
        self._closed = False
        #: Set when QEMU closed the connection (it ended, or dropped us).
        self.eof = trio.Event()

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, path: str, *, greeting_timeout: float = GREETING_TIMEOUT
    ) -> AsyncIterator[QmpConnection]:
        """Connect to the QMP socket at ``path``, negotiate, and yield the session; it is
        closed on leaving the block."""
        try:
            stream = await trio.open_unix_socket(path)
        except OSError as exc:
            raise HypervisorUnavailable(
                f"cannot connect to QMP at {path}: {exc.strerror or exc}; is QEMU running with "
                f"-qmp unix:{path},server=on,wait=off?"
            ) from None
        try:
            instance = peer_instance(stream.socket)
            connection = cls(stream, path, instance)
            with trio.move_on_after(greeting_timeout) as waited:
                greeting = await connection._read_message()
            if waited.cancelled_caught:
                raise HypervisorUnavailable(
                    f"QEMU (pid {instance.pid}) did not greet on {path} within "
                    f"{greeting_timeout:g} s: another client holds this QMP monitor (QEMU serves "
                    "one at a time); give QEMU a second -qmp socket for boxvol"
                )
            if greeting is None or "QMP" not in greeting:
                raise HypervisorError(f"{path} does not speak QMP (its first message: {greeting})")
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(connection._read_loop)
                    try:
                        await connection.execute("qmp_capabilities")
                        yield connection
                    finally:
                        nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                # The caller's error, raised inside the block, comes out grouped with nothing
                # else (the reader was cancelled): hand it on as itself.
                if len(group.exceptions) == 1:
                    raise group.exceptions[0] from None
                raise
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float = math.inf
    ) -> Any:
        """Run ``command`` and return its ``return`` value; raises QmpCommandError with
        QEMU's error class and description, HypervisorUnavailable if QEMU goes away."""
        command_id = next(self._ids)
        message: dict[str, Any] = {"execute": command, "id": command_id}
        if arguments:
            message["arguments"] = arguments
        answer_in, answer_out = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[command_id] = answer_in
        try:
            async with self._send_lock:
                await self._send(message)
            with trio.fail_after(min(timeout, COMMAND_TIMEOUT)):
                try:
                    answer = await answer_out.receive()
                except trio.EndOfChannel:
                    raise self._gone(f"during {command}") from None
        except trio.TooSlowError:
            raise HypervisorError(
                f"QEMU did not answer {command} within {min(timeout, COMMAND_TIMEOUT):g} s"
            ) from None
        finally:
            self._waiting.pop(command_id, None)
        if "error" in answer:
            error = answer["error"]
            error_class = str(error.get("class", "GenericError"))
            raise QmpCommandError(
                f"QEMU refused {command}: {error.get('desc', error)} ({error_class})", error_class
            )
        return answer.get("return")

    async def next_event(self) -> dict[str, Any]:
        """The next event QEMU sent; raises HypervisorUnavailable once QEMU has gone."""
        try:
            return await self._events.receive()
        except trio.EndOfChannel:
            raise self._gone("while waiting for events") from None

    def _gone(self, when: str) -> HypervisorUnavailable:
        return HypervisorUnavailable(
            f"QEMU (pid {self.instance.pid}) closed its QMP connection {self.path} {when}"
        )

    async def _send(self, message: dict[str, Any]) -> None:
        try:
            await self._stream.send_all(json.dumps(message).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise self._gone("while boxvol was writing to it") from None

    async def _read_message(self) -> dict[str, Any] | None:
        """The next JSON message, or None at the end of the stream."""
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_MESSAGE_BYTES:
                raise HypervisorError(
                    f"QMP message over {MAX_MESSAGE_BYTES} bytes from {self.path}"
                )
            try:
                data = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                return None
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            message = json.loads(line)
        except ValueError:
            raise HypervisorError(f"QEMU sent a line that is not JSON on {self.path}") from None
        if not isinstance(message, dict):
            raise HypervisorError(f"QEMU sent a JSON value that is not an object on {self.path}")
        return message

    async def _read_loop(self) -> None:
        """Route answers to their commands and events to the channel, until EOF."""
        try:
            while (message := await self._read_message()) is not None:
                if "event" in message:
                    try:
                        self._events_in.send_nowait(message)
                    except trio.WouldBlock:
                        log.warning("qmp %s: event buffer full, dropped %s", self.path, message)
                    continue
                command_id = message.get("id")
                waiter = None
                if isinstance(command_id, int):
                    waiter = self._waiting.pop(command_id, None)
                if waiter is None:
                    log.warning("qmp %s: an answer nobody waits for: %s", self.path, message)
                    continue
                waiter.send_nowait(message)
        finally:
            self.eof.set()
            self._events_in.close()
            for waiter in self._waiting.values():
                waiter.close()
