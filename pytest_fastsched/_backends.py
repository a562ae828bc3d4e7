"""PostgreSQL backends kept from one event loop to the next, for the test engine.

asyncpg's connections belong to the event loop that opened them, and pytest-asyncio gives each
test a loop of its own by default, so each test connects again, and each new connection costs
the server a new backend process (about 1.7 ms: most of a test's rollback isolation). A
:class:`BackendKeeper` keeps the server's side of a connection, its backend, across loops, the
way a connection pooler in session mode does:

- the test engine's asyncpg connects to a socket of the keeper instead of the server's
  (:meth:`BackendKeeper.redirect`, from the engine's ``do_connect`` event, on the running
  loop); the keeper answers its startup with what the backend said when it was opened, and
  from then on passes the bytes unchanged between the two sockets, in callbacks of that loop;
- when the client closes, or its loop ends, a backend left between two statements is reset as
  a pooler resets it (``ROLLBACK`` if a transaction is open, then ``DISCARD ALL``: prepared
  statements, settings, temporary tables, advisory locks, ``LISTEN``) and serves the next
  connection with the same startup parameters; a backend left in the middle of a statement
  is closed, as is one that fails its reset;
- a cancel request (a statement timeout, a cancelled task) reaches the keeper's socket of its
  connection and is passed on to the server, for the same backend;
- a backend that needs a password, or refuses the startup, is never kept: the client talks
  to it through the keeper as it would directly.

The keeper serves only the plugin's own server (trust authentication on a private unix
socket). The seal maps the keeper's sockets back to that server (:func:`real_address`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pytest_fastsched import _postgres

DIR_PREFIX = "fastsched-pg-"
"""The keepers' socket directories in the temporary directory, followed by the owner's pid."""
STARTUP_TIMEOUT = 10.0
"""Seconds the keeper waits for a client's startup, or a backend's answer to it."""
KEPT_PER_KIND = 8
"""Idle backends kept for each set of startup parameters; more are closed."""

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102
_AUTHENTICATION_OK = b"R\x00\x00\x00\x08\x00\x00\x00\x00"
_TERMINATE = b"X\x00\x00\x00\x04"
_KIND_READY, _KIND_ERROR, _KIND_TERMINATE = ord("Z"), ord("E"), ord("X")
_IDLE = ord("I")
_ANSWERED_BY_READY = frozenset(b"QSF")
"""Client messages each answered by one ReadyForQuery: a simple query, a Sync, a function call."""

_TIMED_OUT = "the keeper's startup timed out"

_doors: dict[str, tuple[str, int]] = {}
"""The keepers' socket directories, and the server address each stands for."""


def real_address(host: str, port: int) -> tuple[str, int]:
    """The server behind ``host`` and ``port`` when they are a keeper's socket, else themselves."""
    return _doors.get(host, (host, port))


class BackendKeeper:
    """The backends of one server kept across event loops, for the test engine of a process.

    ``server_directory`` and ``server_port`` locate the server's unix socket.
    """

    def __init__(self, server_directory: Path, server_port: int) -> None:
        self._server = str(server_directory / f".s.PGSQL.{server_port}")
        _remove_stale_directories()
        prefix = f"{DIR_PREFIX}{os.getpid()}-"
        self.directory = os.path.realpath(tempfile.mkdtemp(prefix=prefix))
        self.passwords = False
        """The server asked a password: connections go to it directly from then on."""
        _doors[self.directory] = (os.path.realpath(server_directory), server_port)
        self._next_port = 0
        self._free_doors: list[_Door] = []
        self._idle: dict[bytes, list[_Backend]] = {}
        self._sessions: set[_Session] = set()
        self._opening: set[asyncio.Task[None]] = set()
        self.opened = 0
        """Backends opened so far (a new one is a new server process)."""

    def redirect(self, parameters: dict[str, Any]) -> None:
        """Point asyncpg's connect ``parameters`` at a socket of this keeper, served on the
        running loop (a ``do_connect`` event listener of the test engine)."""
        if self.passwords:
            return
        loop = asyncio.get_running_loop()
        self._reclaim_closed_loops()
        door = self._free_doors.pop() if self._free_doors else self._new_door()
        task = loop.create_task(self._serve(loop, door))
        timer = loop.call_later(STARTUP_TIMEOUT, functools.partial(task.cancel, _TIMED_OUT))
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)
        task.add_done_callback(lambda _: timer.cancel())
        parameters["host"] = self.directory
        parameters["port"] = door.port

    def _new_door(self) -> _Door:
        self._next_port += 1
        path = os.path.join(self.directory, f".s.PGSQL.{self._next_port}")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            listener.listen(4)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        return _Door(listener, self._next_port)

    def free(self, door: _Door) -> None:
        """``door``'s connection ended: the door serves the next one (binding a new socket
        costs a file)."""
        while True:  # a cancel request left unanswered belongs to the connection that ended
            try:
                door.listener.accept()[0].close()
            except OSError:
                break
        self._free_doors.append(door)

    async def _serve(self, loop: asyncio.AbstractEventLoop, door: _Door) -> None:
        client: socket.socket | None = None
        backend: _Backend | None = None
        try:
            accepted, _ = await loop.sock_accept(door.listener)
            client = accepted
            accepted.setblocking(False)
            startup = await self._startup(loop, accepted)
            if startup is not None:
                backend = await self._backend_for(loop, startup)
                await loop.sock_sendall(accepted, backend.hello)
        except (Exception, asyncio.CancelledError) as error:
            backend = None
            if client is not None and (
                not isinstance(error, asyncio.CancelledError) or error.args == (_TIMED_OUT,)
            ):  # the client sees it as the server's refusal
                with contextlib.suppress(OSError):
                    client.send(_fatal(f"{self._server}: {_reason(error)}"))
            if isinstance(error, asyncio.CancelledError):
                raise
        finally:
            if backend is None:
                if client is not None:
                    client.close()
                self.free(door)
        if backend is not None:
            assert client is not None
            session = _Session(self, loop, client, door, backend)
            self._sessions.add(session)
            session.start()

    async def _startup(
        self, loop: asyncio.AbstractEventLoop, client: socket.socket
    ) -> bytes | None:
        """The client's startup packet, after refusing encryption; ``None`` for a cancel
        request (passed on to the server) or a client that left."""
        while True:
            packet = await _read_packet(loop, client)
            if packet is None:
                return None
            code = int.from_bytes(packet[4:8], "big")
            if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                await loop.sock_sendall(client, b"N")
                continue
            if code == _CANCEL_REQUEST:
                self.cancel(packet)
                return None
            return packet

    async def _backend_for(self, loop: asyncio.AbstractEventLoop, startup: bytes) -> _Backend:
        """An idle backend opened with ``startup``, reset, or a new one."""
        idle = self._idle.get(startup, [])
        while idle:
            backend = idle.pop()
            if await backend.settle(loop):
                return backend
            backend.close()
        return await self._open(loop, startup)

    async def _open(self, loop: asyncio.AbstractEventLoop, startup: bytes) -> _Backend:
        """A new backend; kept after its client only if it was ready at once (no password
        asked, no error)."""
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            server.connect(self._server)  # a local socket: at once, or refused at once
            server.setblocking(False)
            await loop.sock_sendall(server, startup)
            frames = _Frames()
            hello = b""
            while frames.ready == 0 and not frames.failed:
                data = await loop.sock_recv(server, 65536)
                if not data:
                    break
                hello += data
                frames.feed(data)
                if len(hello) >= len(_AUTHENTICATION_OK) and not hello.startswith(
                    _AUTHENTICATION_OK
                ):
                    break  # a password is asked: the client answers, through the session
        except BaseException:
            server.close()
            raise
        self.opened += 1
        self.passwords = self.passwords or not hello.startswith(_AUTHENTICATION_OK)
        ready = hello.startswith(_AUTHENTICATION_OK) and frames.ready == 1 and not frames.failed
        keep = ready and frames.at_boundary and frames.status == _IDLE
        return _Backend(server, startup if keep else None, hello)

    def cancel(self, packet: bytes) -> None:
        """Pass a client's cancel request on to the server, which answers none."""
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as server:
            server.settimeout(1.0)
            server.connect(self._server)
            server.sendall(packet)

    def put_back(self, backend: _Backend, frames: _Frames, client_frames: _Frames) -> None:
        """A session's backend after its client left: reset and kept, or closed."""
        between = frames.at_boundary and client_frames.at_boundary
        answered = frames.ready == client_frames.ready
        kept = self._idle.setdefault(backend.startup or b"", [])
        if (
            backend.startup is None
            or not (between and answered)
            or len(kept) >= KEPT_PER_KIND
            or not backend.begin_reset(frames.status)
        ):
            backend.close()
            return
        kept.append(backend)

    def end_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """``loop`` ends: its sessions end, their backends are kept or closed."""
        for task in [task for task in self._opening if task.get_loop() is loop]:
            task.cancel()
        for session in [session for session in self._sessions if session.loop is loop]:
            session.end()

    def _reclaim_closed_loops(self) -> None:
        # A loop closed without ending its share (no shutdown_asyncgens) left its sessions.
        for session in [session for session in self._sessions if session.loop.is_closed()]:
            session.end()

    def forget(self, session: _Session) -> None:
        """``session`` ended."""
        self._sessions.discard(session)

    def close(self) -> None:
        """End every session and close every backend; the keeper's sockets are removed."""
        for session in list(self._sessions):
            session.end()
        for door in self._free_doors:
            door.listener.close()
        self._free_doors.clear()
        for backends in self._idle.values():
            for backend in backends:
                backend.close()
        self._idle.clear()
        _doors.pop(self.directory, None)
        shutil.rmtree(self.directory, ignore_errors=True)

    def idle(self) -> Mapping[bytes, list[_Backend]]:
        """The idle backends, by startup packet."""
        return self._idle


class _Door:
    """A socket of the keeper that clients connect to: asyncpg's ``port`` names it."""

    def __init__(self, listener: socket.socket, port: int) -> None:
        self.listener = listener
        self.port = port


class _Backend:
    """One server backend: its socket, the startup it was opened with (``None``: not to be
    kept) and the messages it answered that startup with."""

    def __init__(self, sock: socket.socket, startup: bytes | None, hello: bytes) -> None:
        self.sock = sock
        self.startup = startup
        self.hello = hello
        self._answers_due = 0

    def begin_reset(self, status: int) -> bool:
        """Send the reset queries (answered when the backend is next taken); False if the
        socket refused them."""
        statements = ["DISCARD ALL"] if status == _IDLE else ["ROLLBACK", "DISCARD ALL"]
        queries = b"".join(_query(statement) for statement in statements)
        try:
            sent = self.sock.send(queries)
        except OSError:
            return False
        self._answers_due = len(statements)
        return sent == len(queries)

    async def settle(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Read the reset's answers; True when the backend is idle and clean."""
        frames = _Frames()
        try:
            while frames.ready < self._answers_due:  # answered by now, as a rule
                data = await loop.sock_recv(self.sock, 65536)
                if not data:
                    return False
                frames.feed(data)
        except OSError:
            return False
        return frames.at_boundary and not frames.failed and frames.status == _IDLE

    def close(self) -> None:
        """Say goodbye to the server and close the socket."""
        with contextlib.suppress(OSError):
            self.sock.send(_TERMINATE)
        self.sock.close()


class _Session:
    """A client connection and its backend, their bytes passed in callbacks of ``loop``."""

    def __init__(
        self,
        keeper: BackendKeeper,
        loop: asyncio.AbstractEventLoop,
        client: socket.socket,
        door: _Door,
        backend: _Backend,
    ) -> None:
        self.keeper = keeper
        self.loop = loop
        self.client = client
        self.door = door
        self.listener = door.listener
        self.backend = backend
        self.client_frames = _Frames(held=True)
        self.frames = _Frames()
        self._to_client = bytearray()
        self._to_backend = bytearray()
        self._ended = False

    def start(self) -> None:
        """Pass bytes both ways; accept cancel requests on the client's socket."""
        self.loop.add_reader(self.client.fileno(), self._from_client)
        self.loop.add_reader(self.backend.sock.fileno(), self._from_backend)
        self.loop.add_reader(self.listener.fileno(), self._accept_cancel)

    def _from_client(self) -> None:
        data = _receive(self.client)
        if data is None:
            return
        if not data:
            self.end()
            return
        forward = self.client_frames.feed(data)
        if forward:
            self._send(self.backend.sock, self._to_backend, forward)
        if self.client_frames.terminated:
            self.end()

    def _from_backend(self) -> None:
        data = _receive(self.backend.sock)
        if data is None:
            return
        if not data:  # the server ended the backend: the client sees the connection lost
            self._lost(self.backend.sock)
            return
        self.frames.feed(data)
        self._send(self.client, self._to_client, data)

    def _send(self, sock: socket.socket, pending: bytearray, data: bytes) -> None:
        if not pending:
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._lost(sock)
                return
            data = data[sent:]
            if not data:
                return
            self.loop.add_writer(sock.fileno(), self._flush, sock, pending)
        pending += data

    def _flush(self, sock: socket.socket, pending: bytearray) -> None:
        try:
            sent = sock.send(pending)
        except BlockingIOError:
            return
        except OSError:
            self._lost(sock)
            return
        del pending[:sent]
        if not pending:
            self.loop.remove_writer(sock.fileno())

    def _lost(self, sock: socket.socket) -> None:
        if sock is self.backend.sock:
            self.backend.startup = None
        self.end()

    def _accept_cancel(self) -> None:
        try:
            caller, _ = self.listener.accept()
        except OSError:
            return
        caller.setblocking(False)
        self.loop.add_reader(caller.fileno(), self._read_cancel, caller, bytearray())

    def _read_cancel(self, caller: socket.socket, packet: bytearray) -> None:
        data = _receive(caller)
        if data is None:
            return
        packet += data
        if data and len(packet) < 16:
            return
        self.loop.remove_reader(caller.fileno())
        caller.close()
        if len(packet) == 16 and int.from_bytes(packet[4:8], "big") == _CANCEL_REQUEST:
            self.keeper.cancel(bytes(packet))

    def end(self) -> None:
        """The client left, or its loop ends: stop passing bytes; keep or close the backend."""
        if self._ended:
            return
        self._ended = True
        if not self.loop.is_closed():
            for sock in (self.client, self.backend.sock, self.listener):
                self.loop.remove_reader(sock.fileno())
                self.loop.remove_writer(sock.fileno())
        self.client.close()
        self.keeper.forget(self)
        self.keeper.free(self.door)
        if self._to_backend:
            self.backend.startup = None
        self.keeper.put_back(self.backend, self.frames, self.client_frames)


class _Frames:
    """Message boundaries of one direction of the protocol (after the startup), followed as
    the bytes pass: the ReadyForQuery messages and their transaction status (server to
    client), or the messages each answered by one (client to server).

    ``held``: the client's direction, whose bytes are passed on only up to the last whole
    message header, so that its ``Terminate`` never reaches a backend that is kept.
    """

    __slots__ = ("_carry", "_held", "_skip", "failed", "ready", "status", "terminated")

    def __init__(self, *, held: bool = False) -> None:
        self._carry = b""
        self._skip = 0
        self._held = held
        self.ready = 0
        """ReadyForQuery messages (server) or messages answered by one (client) so far."""
        self.status = _IDLE
        """The transaction status of the last ReadyForQuery: I, T or E."""
        self.failed = False
        """An ErrorResponse came."""
        self.terminated = False
        """The client sent Terminate."""

    @property
    def at_boundary(self) -> bool:
        """Between two messages, nothing held back."""
        return not self._carry and not self._skip

    def feed(self, data: bytes) -> bytes:
        """Follow ``data``; the bytes to pass on: all of them, unless held."""
        if self.terminated:
            return b""
        buffer = self._carry + data if self._carry else data
        self._carry = b""
        position = self._skip
        end = len(buffer)
        while position < end:
            kind = buffer[position]
            if self._held and kind == _KIND_TERMINATE:
                self.terminated = True
                self._skip = 0
                return buffer[:position]
            if end - position < (6 if kind == _KIND_READY else 5):
                self._carry = buffer[position:]
                break
            if self._held:
                self.ready += kind in _ANSWERED_BY_READY
            elif kind == _KIND_READY:
                self.ready += 1
                self.status = buffer[position + 5]
            elif kind == _KIND_ERROR:
                self.failed = True
            position += 1 + int.from_bytes(buffer[position + 1 : position + 5], "big")
        self._skip = max(0, position - end)
        if not self._held:
            return data
        return buffer[: end - len(self._carry)]


def _remove_stale_directories() -> None:
    """Remove the socket directories of keepers whose process is gone (killed runs)."""
    for directory in Path(tempfile.gettempdir()).glob(f"{DIR_PREFIX}*"):
        pid = directory.name.removeprefix(DIR_PREFIX).split("-")[0]
        if pid.isdigit() and not _postgres.pid_alive(int(pid)):
            shutil.rmtree(directory, ignore_errors=True)


def _reason(error: BaseException) -> str:
    if isinstance(error, asyncio.CancelledError):
        return f"no answer to the startup within {STARTUP_TIMEOUT:g} s"
    return f"{type(error).__name__}: {error}"


def _fatal(message: str) -> bytes:
    """A FATAL ErrorResponse (SQLSTATE 08006, connection failure) saying ``message``."""
    fields = b"".join(
        code + text.encode() + b"\x00"
        for code, text in ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", "08006"), (b"M", message))
    )
    body = fields + b"\x00"
    return b"E" + struct.pack("!i", len(body) + 4) + body


def _query(sql: str) -> bytes:
    body = sql.encode() + b"\x00"
    return b"Q" + struct.pack("!i", len(body) + 4) + body


async def _read_packet(loop: asyncio.AbstractEventLoop, client: socket.socket) -> bytes | None:
    """One length-prefixed startup-phase packet, or ``None`` if the client left."""
    data = b""
    while len(data) < 4 or len(data) < int.from_bytes(data[:4], "big"):
        chunk = await loop.sock_recv(client, 8192)
        if not chunk:
            return None
        data += chunk
    return data


def _receive(sock: socket.socket) -> bytes | None:
    """What ``sock`` has; ``b""`` when it is closed, ``None`` when nothing is there yet."""
    try:
        return sock.recv(262144)
    except BlockingIOError:
        return None
    except OSError:
        return b""
