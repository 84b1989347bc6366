"""The kernel's process shell: owns the ROUTER and PUB sockets and the clock, feeds the Router.

The ROUTER socket's file descriptor is watched directly by the event loop (``add_reader``) and
drained without blocking, so a message costs one ``recv_multipart`` and one Router call: no
future per message.  ZeroMQ's descriptor is edge-triggered, so every callback drains until the
socket reports no more input, and timer callbacks drain too (a send may consume the edge).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

import zmq

from kernel import codec
from kernel.aio import recv_frames, send_frames
from kernel import protocol as P
from kernel.mmi import Management
from kernel.router import Admission, Router

log = logging.getLogger("reca.kernel")

#: Messages handled per readiness callback before yielding to timers and other callbacks.
_BATCH = P.RECV_BATCH


class KernelServer:
    """Binds ``endpoint`` (ROUTER, MDP/0.2) and ``control`` (PUB) and routes until stopped."""

    def __init__(
        self,
        endpoint: str,
        control: str,
        *,
        heartbeat_interval: float = P.HEARTBEAT_INTERVAL,
        liveness: int = P.LIVENESS,
        unavailable_wait: float = P.UNAVAILABLE_WAIT,
        admission: Admission | None = None,
        management: Management | None = None,
        extra_stats: Callable[[], dict] | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        self.context = context or zmq.Context()
        self._own_context = context is None
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_MESSAGE_SIZE)
        sock.setsockopt(zmq.SNDHWM, P.ROUTER_HWM)
        sock.setsockopt(zmq.RCVHWM, P.ROUTER_HWM)
        pub = self.context.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.SNDHWM, P.PUB_HWM)
        try:
            sock.bind(endpoint)
            pub.bind(control)
        except zmq.ZMQError:
            sock.close(0)
            pub.close(0)
            raise
        self.sock = sock
        self.pub = pub
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.control = pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.router = Router(
            self._send,
            heartbeat_interval=heartbeat_interval,
            liveness=liveness,
            unavailable_wait=unavailable_wait,
            admission=admission,
            management=management,
            extra_stats=extra_stats,
            publish=self._publish,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._stopped: asyncio.Event | None = None

    # -- I/O --------------------------------------------------------------------------------------

    def _send(self, frames: list[Any]) -> bool | None:
        try:
            send_frames(self.sock, frames)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return False
            if exc.errno == zmq.EAGAIN:
                self.router.counters["send_would_block"] += 1
                log.error("send to %r would block; message dropped", frames[0])
                return None
            raise
        return True

    def _publish(self, topic: bytes, message: dict) -> None:
        try:
            self.pub.send_multipart([topic, codec.pack(message)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # PUB drops on HWM by design; count it
            self.router.counters["publish_dropped"] += 1
            log.error("control publish on %r failed: %s", topic, exc)

    def _on_readable(self) -> None:
        sock = self.sock
        on_message = self.router.on_message
        clock = time.monotonic
        for _ in range(_BATCH):
            try:
                frames = recv_frames(sock)
            except zmq.Again:
                break
            except zmq.ZMQError as exc:
                if exc.errno == zmq.ENOTSOCK:
                    return
                raise
            try:
                on_message(frames, clock())
            except Exception:  # a routing bug must not take the kernel down
                self.router.counters["internal_errors"] += 1
                log.exception("internal error handling a message from %r", frames[:1])
        else:
            # Batch full: more may be waiting; let timers run, then continue.
            assert self._loop is not None
            self._loop.call_soon(self._on_readable)
        self._arm()

    def _arm(self) -> None:
        wake = self.router.next_wakeup()
        if self._timer is not None and self._timer_at <= wake:
            return
        if self._timer is not None:
            self._timer.cancel()
        assert self._loop is not None
        self._timer_at = wake
        self._timer = self._loop.call_later(max(0.0, wake - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        try:
            self.router.tick(time.monotonic())
        except Exception:
            self.router.counters["internal_errors"] += 1
            log.exception("internal error in the kernel tick")
        self._on_readable()

    # -- lifecycle --------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Route until :meth:`stop` is called (or the task is cancelled)."""
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        fd = self.sock.getsockopt(zmq.FD)
        self._loop.add_reader(fd, self._on_readable)
        self._on_readable()
        try:
            await self._stopped.wait()
        finally:
            self._loop.remove_reader(fd)
            if self._timer is not None:
                self._timer.cancel()
            self.close()

    def stop(self) -> None:
        if self._stopped is not None:
            self._stopped.set()

    def close(self) -> None:
        self.sock.close(0)
        self.pub.close(0)
        if self._own_context:
            self.context.term()
