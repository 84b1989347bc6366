"""asyncio readiness for plain (synchronous) ZeroMQ sockets.

reca's processes drive ordinary ``zmq.Socket`` objects from an asyncio loop: the socket's
file descriptor is registered once with ``loop.add_reader`` and messages are received with
``NOBLOCK``.  This costs no future per message (unlike ``zmq.asyncio``) and works the same on
asyncio's and uvloop's loops.  ZeroMQ's descriptor is edge-triggered, so :meth:`Readable.wait`
always checks ``ZMQ_EVENTS`` before sleeping, and anything that sends on the socket should call
:meth:`Readable.poke` so that input whose edge the send consumed is not missed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import zmq


class Readable:
    """Await input on a synchronous ZeroMQ socket from asyncio."""

    def __init__(self, sock: zmq.Socket, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.sock = sock
        self._loop = loop or asyncio.get_running_loop()
        self._event = asyncio.Event()
        self._fd = sock.fileno()
        self._loop.add_reader(self._fd, self._event.set)

    def poke(self) -> None:
        """Make the next :meth:`wait` re-check the socket (call after sending on it)."""
        self._event.set()

    def ready(self) -> bool:
        return readable(self.sock)

    async def wait(self, timeout: float | None = None) -> bool:
        """True when a message can be received without blocking; False after ``timeout`` s."""
        if self.ready():
            return True
        self._event.clear()
        if self.ready():
            return True
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except asyncio.TimeoutError:
            return self.ready()
        return self.ready()

    @property
    def event(self) -> asyncio.Event:
        """Set whenever the descriptor signalled (or :meth:`poke` was called)."""
        return self._event

    def close(self) -> None:
        try:
            self._loop.remove_reader(self._fd)
        except (ValueError, OSError):
            pass


def readable(sock: zmq.Socket) -> bool:
    """Whether a message can be received from ``sock`` now (``ZMQ_EVENTS`` has POLLIN)."""
    events: Any = sock.get(_EVENTS)  # an int for this option (typing.cast would be a call per look)
    return bool(events & _POLLIN)


# Plain-int flags: pyzmq's enum flags cost an Enum operation per frame on its Python path.
_NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_SNDMORE = int(zmq.SNDMORE)


#: Frames up to this size are copied into libzmq; larger ones are sent without a copy (a small
#: frame sent zero-copy costs a zmq.Frame and a free callback: ~35% more per message, measured).
_COPY_MAX = 65536


try:  # the compiled socket's own send: pyzmq's Python wrapper around it (keyword handling for
    # routing ids and groups no reca socket uses) cost twice the send itself, measured
    from zmq.backend import Socket as _Compiled

    _raw_send: Any = _Compiled.send if issubclass(zmq.Socket, _Compiled) else None
except ImportError:  # pragma: no cover - another pyzmq backend
    _raw_send = None


def send_frames(sock: zmq.Socket, frames: list, nonblocking: bool = True) -> None:
    """``send_multipart`` without per-frame enum arithmetic (same semantics, same errors; an empty
    list sends nothing).  Every frame but the last goes with SNDMORE, the last without: no
    per-frame test of its position."""
    if not frames:
        return
    base = _NOBLOCK if nonblocking else 0
    more = base | _SNDMORE
    last = frames[-1]
    if _raw_send is not None and type(sock) is zmq.Socket:
        send = _raw_send
        for frame in frames[:-1]:
            send(sock, frame, more, len(frame) <= _COPY_MAX)
        send(sock, last, base, len(last) <= _COPY_MAX)
        return
    for frame in frames[:-1]:
        sock.send(frame, more, copy=len(frame) <= _COPY_MAX)
    sock.send(last, base, copy=len(last) <= _COPY_MAX)


def recv_frames(sock: zmq.Socket) -> list[bytes]:
    """``recv_multipart(NOBLOCK)``; raises ``zmq.Again`` when empty.  Each frame is received as a
    ``zmq.Frame`` and its ``more`` flag read from it: pyzmq's ``getsockopt(RCVMORE)`` per frame
    cost more than the frame's copy (measured on a 5-frame message: 4.0-5.2 us against 6.5-7.0 us
    for ``recv`` + ``getsockopt`` and for ``recv_multipart``)."""
    recv = sock.recv
    frame = recv(_NOBLOCK, False)  # (flags, copy=False)
    parts = [frame.bytes]
    append = parts.append
    while frame.more:
        frame = recv(0, False)
        append(frame.bytes)
    return parts
