"""The kernel's process shell: owns the ROUTER and PUB sockets and the clock, feeds the Router.

The ROUTER socket's file descriptor is watched directly by the event loop (``add_reader``) and
drained without blocking, so a message costs one ``recv_multipart`` and one Router call: no
future per message.  ZeroMQ's descriptor is edge-triggered, so every callback drains until the
socket reports no more input, and timer callbacks drain too (a send may consume the edge).

With ``server_keys`` both sockets are CURVE servers and a ZAP handler (kernel.auth) checks every
handshake; each message's principal is read from its ``User-Id`` frame property (the ZAP user
id of the connection it came on) and handed to the router with the message.  Without, every peer
is ``local`` (an ipc:// kernel whose runtime directory is private, or an insecure tcp:// one).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

import zmq

from kernel import auth, codec
from kernel.aio import recv_frames, send_frames
from kernel import protocol as P
from kernel.mmi import Management
from kernel.router import Admission, Router

log = logging.getLogger("reca.kernel")

#: Messages handled per readiness callback before yielding to timers and other callbacks.
_BATCH = P.RECV_BATCH
#: How often the key directory is checked for changes (revocations), seconds.
_RELOAD_INTERVAL = 0.25
_NOBLOCK = int(zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)


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
        server_keys: auth.ServerKeys | None = None,
        principals: auth.Principals | None = None,
    ) -> None:
        self.context = context or zmq.Context()
        self._own_context = context is None
        self.principals = principals
        self.zap = None
        if server_keys is not None:
            if principals is None:
                raise ValueError("CURVE needs the kernel's principals")
            from kernel.zap import ZapHandler

            self.zap = ZapHandler(self.context, principals)
            self.zap.start()
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_MESSAGE_SIZE)
        sock.setsockopt(zmq.SNDHWM, P.ROUTER_HWM)
        sock.setsockopt(zmq.RCVHWM, P.ROUTER_HWM)
        pub = self.context.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.SNDHWM, P.PUB_HWM)
        if server_keys is not None:
            auth.curve_server(sock, server_keys, auth.ZAP_DOMAIN_ROUTER)
            auth.curve_server(pub, server_keys, auth.ZAP_DOMAIN_CONTROL)
        try:
            sock.bind(endpoint)
            pub.bind(control)
        except zmq.ZMQError:
            sock.close(0)
            pub.close(0)
            if self.zap is not None:
                self.zap.stop()
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
            extra_stats=self._stats_with(extra_stats),
            publish=self._publish,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._stopped: asyncio.Event | None = None
        self._next_reload = 0.0

    def _stats_with(self, extra: Callable[[], dict] | None) -> Callable[[], dict]:
        def stats() -> dict:
            out = dict(extra()) if extra is not None else {}
            out["auth"] = {"curve": self.zap is not None,
                           "principals": len(self.principals) if self.principals is not None else 0,
                           "zap_refused": self.zap.refused if self.zap is not None else 0}
            return out
        return stats

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

    def _recv_authenticated(self) -> tuple[list[bytes], auth.Principal]:
        """One message and its principal (role REVOKED: a key the kernel no longer knows)."""
        sock = self.sock
        parts = [sock.recv(_NOBLOCK)]  # the routing id (made by the ROUTER: carries no metadata)
        first = sock.recv(0, copy=False)
        parts.append(first.bytes)
        while sock.getsockopt(_RCVMORE):
            parts.append(sock.recv(0))
        assert self.principals is not None
        name = str(first.get(auth.USER_ID) or "")
        return parts, self.principals.by_name(name) or auth.Principal(name, auth.REVOKED)

    def _on_readable(self) -> None:
        if self._drain():
            self._arm()

    def _drain(self) -> bool:
        """Route what the ROUTER socket holds (at most one batch; the rest on the next turn).
        False once the socket is closed."""
        sock = self.sock
        on_message = self.router.on_message
        clock = time.monotonic
        curve = self.zap is not None
        for _ in range(_BATCH):
            try:
                if curve:
                    frames, principal = self._recv_authenticated()
                else:
                    frames, principal = recv_frames(sock), auth.LOCAL_OPERATOR
            except zmq.Again:
                break
            except zmq.ZMQError as exc:
                if exc.errno == zmq.ENOTSOCK:
                    return False
                raise
            try:
                on_message(frames, clock(), principal)
            except Exception:  # a routing bug must not take the kernel down
                self.router.counters["internal_errors"] += 1
                log.exception("internal error handling a message from %r", frames[:1])
        else:
            # Batch full: more may be waiting; let timers run, then continue.
            assert self._loop is not None
            self._loop.call_soon(self._on_readable)
        return True

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
        # Input first: messages that waited while this process was not scheduled prove their
        # senders alive, and the liveness sweep must see them before it judges (uvloop runs due
        # timers before polling for I/O).
        if not self._drain():
            return
        now = time.monotonic()
        principals = self.principals
        if principals is not None and now >= self._next_reload:
            # A key removed from the key directory is revoked: its workers are dropped and its
            # messages refused from now on (the ZAP handler refuses its new connections).
            self._next_reload = now + _RELOAD_INTERVAL
            if principals.reload():
                self.router.revoke(lambda name: principals.by_name(name) is not None, now)
        try:
            self.router.tick(now)
        except Exception:
            self.router.counters["internal_errors"] += 1
            log.exception("internal error in the kernel tick")
        self._on_readable()

    # -- lifecycle --------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Route until :meth:`stop` is called (or the task is cancelled)."""
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        fd = self.sock.fileno()
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
        if self.zap is not None:
            self.zap.stop()
        if self._own_context:
            self.context.term()
