"""The service runtime: an MDP/0.2 worker with heartbeats, reconnects and control topics.

A service is a :class:`Service` subclass whose ``handle(ctx, payload)`` coroutine answers one
request; it may stream PARTIAL replies with ``await ctx.partial(x)``, report what it spent with
``ctx.charge(tokens=..., flops=...)`` and offer safe points with ``await ctx.checkpoint()``, where
the kernel's control messages take effect: ``preempt`` pauses there (the caller sees a PARTIAL
with status ``paused``) keeping every local variable of the handler, ``resume`` continues from the
same state, ``cancel`` raises :class:`kernel.errors.Cancelled` in the handler.

:class:`WorkerRuntime` is the process shell: it owns a DEALER socket to the kernel and a SUB
socket on the kernel's control PUB.  It heartbeats the kernel every interval, treats the kernel
as lost after ``liveness`` silent intervals, and reconnects on a fresh socket with exponential
backoff after DISCONNECT or broker loss; requests in flight when the connection is lost are
cancelled (the kernel has already answered them ``worker_died``).

Handlers run on the event loop: a handler that computes for long stretches must call
``await ctx.checkpoint()`` more often than the liveness window, or run its compute in a thread.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import sys
import time
from typing import Any

import zmq


from kernel import auth, codec, errors
from kernel.aio import recv_frames, send_frames
from kernel import protocol as P
from kernel.config import default_control_for, runtime_dir
from kernel.protocol import ENV_CONTROL, ENV_ENDPOINT, ENV_HEARTBEAT, ENV_LIVENESS, ENV_LOG_LEVEL, ENV_PARENT

log = logging.getLogger("reca.service")

_W = P.WorkerCmd


class Context:
    """One request as its handler sees it.

    ``reca`` is False for opaque MDP bodies: ``payload`` is then the list of raw frames and the
    handler's result must be bytes or a list of bytes.
    """

    def __init__(self, runtime: "WorkerRuntime", token: bytes, header: dict | None) -> None:
        self._runtime = runtime
        self.token = token
        self.header = header or {}
        self.reca = header is not None
        self.id = self.header.get(P.H_ID)
        self.job: str | None = self.header.get(P.H_JOB)
        self.priority: int = self.header.get(P.H_PRIORITY, 0)
        #: The budget the kernel granted (already clamped to what the job has left).
        self.granted: dict[str, float] = dict(self.header.get(P.H_GRANTED) or self.header.get(P.H_BUDGET) or {})
        self.spent: dict[str, float] = {}
        self.paused = False
        self._pause_requested = False
        self._resume = asyncio.Event()
        self._cancel_reason: errors.RecaError | None = None
        self.task: asyncio.Task | None = None

    def charge(self, **amounts: float) -> None:
        """Record spending (``tokens=``, ``flops=``, counted resources); reported to the kernel
        in every status frame, which charges it to the job."""
        for kind, amount in amounts.items():
            self.spent[kind] = self.spent.get(kind, 0) + amount

    async def partial(self, payload: Any, status: str = P.STATUS_PARTIAL) -> None:
        """Stream one PARTIAL reply to the caller."""
        await self._runtime._reply(self, False, payload, status)

    async def checkpoint(self) -> None:
        """A safe point: raises if cancelled; if a preempt is pending, acknowledges it (a PARTIAL
        with status ``paused``) and waits here, state intact, until resumed or cancelled."""
        self._runtime.drain_control()  # a preempt published a moment ago takes effect here
        if self._cancel_reason is not None:
            raise self._cancel_reason
        if self._pause_requested:
            self.paused = True
            self._runtime.paused_acks += 1
            await self.partial({"paused_at": time.monotonic()}, P.STATUS_PAUSED)
            await self._resume.wait()
            self.paused = False
            if self._cancel_reason is not None:
                raise self._cancel_reason
            await self.partial({"resumed_at": time.monotonic()}, P.STATUS_RESUMED)
        else:
            await asyncio.sleep(0)

    # -- control, applied by the runtime ---------------------------------------------------------

    def _preempt(self) -> None:
        self._pause_requested = True
        self._resume.clear()

    def _continue(self) -> None:
        self._pause_requested = False
        self._resume.set()

    def _cancel(self, reason: errors.RecaError) -> None:
        self._cancel_reason = reason
        self._resume.set()


class Service:
    """Base class of reca services.  Subclasses set ``name`` and implement ``handle``."""

    #: The MDP service name this worker registers for.
    name: str = ""
    #: Requests this worker may hold at once (declared to the kernel in READY).
    capacity: int = 1

    async def setup(self) -> None:
        """Called once before the worker registers (open stores, load models)."""

    async def teardown(self) -> None:
        """Called once on shutdown."""

    async def handle(self, ctx: Context, payload: Any) -> Any:
        raise NotImplementedError

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Extra command-line options of ``python -m services.<name>``."""

    def configure(self, args: argparse.Namespace) -> None:
        """Apply the parsed extra options."""


class WorkerRuntime:
    """Connects a :class:`Service` to the kernel and serves until :meth:`stop`."""

    def __init__(
        self,
        service: Service,
        endpoint: str,
        control: str | None = None,
        *,
        heartbeat: float = P.HEARTBEAT_INTERVAL,
        liveness: int = P.LIVENESS,
        context: zmq.Context | None = None,
        cert: str | None = None,
        server_cert: str | None = None,
    ) -> None:
        if not service.name:
            raise ValueError("a service needs a name")
        #: CURVE credentials for tcp:// (``cert``/``server_cert`` or $RECA_CERT/$RECA_SERVER_CERT;
        #: the supervisor sets those for each child).
        self.creds = auth.peer_credentials(cert, server_cert)
        self.service = service
        self.endpoint = endpoint
        self.control = control
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.ctx = context or zmq.Context()
        self._own_ctx = context is None
        self.sock: zmq.Socket | None = None
        self.sub: zmq.Socket | None = None
        self._wake: asyncio.Event | None = None
        self.active: dict[bytes, Context] = {}
        self.connects = 0
        self.paused_acks = 0
        self._stopping = asyncio.Event()
        self._last_send = 0.0
        self.registered = asyncio.Event()

    # -- sending ----------------------------------------------------------------------------------

    async def _send(self, frames: list[bytes]) -> None:
        sock = self.sock
        if sock is None:
            return
        self._last_send = time.monotonic()
        send_frames(sock, [P.MDPW, *frames], nonblocking=False)
        if self._wake is not None:
            self._wake.set()  # a send may consume the descriptor's edge: re-check input

    async def _reply(self, ctx: Context, final: bool, payload: Any, status: str,
                     error: errors.RecaError | None = None) -> None:
        if self.active.get(ctx.token) is not ctx:
            return  # the connection it came on is gone; the kernel already answered it
        cmd = _W.FINAL.value if final else _W.PARTIAL.value
        if ctx.reca:
            st: dict[str, Any] = {P.H_VERSION: P.VERSION, P.S_ID: ctx.id, P.S_STATUS: status, P.S_SPENT: ctx.spent}
            if error is not None:
                st[P.S_ERROR] = error.to_wire()
            body = [codec.pack(st)]
            if error is None:
                body.append(codec.pack(payload))
        elif error is not None:
            body = [codec.pack({P.S_STATUS: P.STATUS_ERROR, P.S_ERROR: error.to_wire()})]
        elif isinstance(payload, (bytes, bytearray, memoryview)):
            body = [bytes(payload)]
        elif isinstance(payload, list) and all(isinstance(f, (bytes, bytearray, memoryview)) for f in payload):
            body = list(payload)
        else:
            body = [codec.pack(payload)]
        await self._send([cmd, ctx.token, b"", *body])

    # -- serving ----------------------------------------------------------------------------------

    async def _serve(self, ctx: Context, payload: Any) -> None:
        try:
            result = await self.service.handle(ctx, payload)
        except errors.RecaError as exc:
            await self._reply(ctx, True, None, P.STATUS_ERROR, exc)
        except asyncio.CancelledError:
            if self.active.get(ctx.token) is ctx:
                await self._reply(ctx, True, None, P.STATUS_ERROR, errors.Cancelled("worker shutting down"))
            raise
        except Exception as exc:
            log.exception("handler of %s failed", self.service.name)
            await self._reply(ctx, True, None, P.STATUS_ERROR,
                              errors.ServiceError(f"{type(exc).__name__}: {exc}"))
        else:
            await self._reply(ctx, True, result, P.STATUS_OK)
        finally:
            if self.active.get(ctx.token) is ctx:
                del self.active[ctx.token]

    def _on_request(self, frames: list[bytes]) -> None:
        # frames: [token, b"", body...]
        if len(frames) < 2:
            log.warning("malformed REQUEST from kernel ignored")
            return
        token, body = frames[0], frames[2:]
        header = codec.reca_header(body)
        payload: Any = body
        ctx = Context(self, token, header)
        self.active[token] = ctx
        if header is not None:
            try:
                payload = codec.unpack(body[1]) if len(body) > 1 else None
            except errors.BadRequest as exc:
                ctx.task = asyncio.ensure_future(self._reply_error(ctx, exc))
                return
        ctx.task = asyncio.ensure_future(self._serve(ctx, payload))

    async def _reply_error(self, ctx: Context, exc: errors.RecaError) -> None:
        await self._reply(ctx, True, None, P.STATUS_ERROR, exc)
        self.active.pop(ctx.token, None)

    def _on_control(self, topic: bytes, message: Any) -> None:
        op = topic.rsplit(b"/", 1)[-1].decode(errors="replace")
        if not isinstance(message, dict):
            return
        # Targets: "token" (the kernel's unique request token), else "job", else "id" (a client's
        # request id: only unique per client; the kernel itself resolves ids to tokens).
        token, job, rid = message.get("token"), message.get("job"), message.get("id")
        if token is not None:
            targets = [c for c in self.active.values() if c.token == token]
        else:
            targets = [c for c in self.active.values()
                       if (job is not None and c.job == job) or (rid is not None and job is None and c.id == rid)
                       or message.get("all")]
        for ctx in targets:
            if op == P.ControlOp.PREEMPT.value:
                ctx._preempt()
            elif op == P.ControlOp.RESUME.value:
                ctx._continue()
            elif op == P.ControlOp.CANCEL.value:
                code = message.get("code", P.ErrorCode.CANCELLED.value)
                exc = errors.from_wire({"code": code, "message": message.get("reason", "cancelled by the kernel")})
                ctx._cancel(exc)
        self.on_control(op, message)

    def drain_control(self) -> None:
        """Apply every control message waiting on the SUB socket (never blocks)."""
        sub = self.sub
        if sub is None:
            return
        while True:
            try:
                frames = recv_frames(sub)
            except zmq.Again:
                return
            if len(frames) != 2:
                continue
            try:
                self._on_control(frames[0], codec.unpack(frames[1]))
            except errors.BadRequest:
                log.warning("undecodable control message on %r", frames[0])

    def on_control(self, op: str, message: dict) -> None:
        """Hook for services that act on other control ops (fidelity, precision)."""
        handler = getattr(self.service, "on_control", None)
        if handler is not None:
            handler(op, message)

    def _drop_active(self) -> None:
        for ctx in list(self.active.values()):
            if ctx.task is not None and not ctx.task.done():
                ctx.task.cancel()
        self.active.clear()

    def _connect(self) -> zmq.Socket:
        sock = auth.secure_socket(self.ctx, zmq.DEALER, self.endpoint, self.creds)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.connect(self.endpoint)
        self.connects += 1
        return sock

    async def run(self) -> None:
        """Serve until :meth:`stop`; reconnect with backoff whenever the kernel is lost."""
        await self.service.setup()
        sub = None
        if self.control:
            sub = auth.secure_socket(self.ctx, zmq.SUB, self.control, self.creds)
            for prefix in (self.service.name, P.CTL_ALL):
                sub.setsockopt(zmq.SUBSCRIBE, f"{P.CTL_PREFIX}{prefix}/".encode())
            sub.connect(self.control)
            self.sub = sub
        backoff = P.RECONNECT_INITIAL
        try:
            while not self._stopping.is_set():
                self.sock = self._connect()
                opts = codec.pack({P.R_VERSION: P.VERSION, P.R_CAPACITY: self.service.capacity, P.R_PID: os.getpid()})
                await self._send([_W.READY.value, self.service.name.encode(), opts])
                reason = await self._session(sub)
                self._drop_active()
                self.registered.clear()
                if reason == "stopping":
                    await self._send([_W.DISCONNECT.value])
                self.sock.close(0)
                self.sock = None
                if reason == "stopping":
                    break
                log.warning("%s lost the kernel (%s); reconnecting in %.2f s", self.service.name, reason, backoff)
                try:
                    await asyncio.wait_for(self._stopping.wait(), backoff)
                except asyncio.TimeoutError:
                    pass
                backoff = min(P.RECONNECT_MAX, backoff * 2)
        finally:
            self._drop_active()
            if sub is not None:
                self.sub = None
                sub.close(0)
            if self.sock is not None:
                self.sock.close(0)
            await self.service.teardown()
            if self._own_ctx:
                self.ctx.term()

    async def _session(self, sub: zmq.Socket | None) -> str:
        """One connection's life; returns why it ended."""
        sock = self.sock
        assert sock is not None
        loop = asyncio.get_running_loop()
        wake = self._wake = asyncio.Event()
        readers = [sock.getsockopt(zmq.FD)]
        if sub is not None:
            readers.append(sub.getsockopt(zmq.FD))
        for fd in readers:
            loop.add_reader(fd, wake.set)
        window = self.heartbeat * self.liveness
        broker_expiry = time.monotonic() + window
        try:
            while True:
                wake.clear()
                if self._stopping.is_set():
                    return "stopping"
                self.drain_control()
                while True:
                    try:
                        frames = recv_frames(sock)
                    except zmq.Again:
                        break
                    broker_expiry = time.monotonic() + window
                    if len(frames) < 2 or frames[0] != P.MDPW:
                        log.warning("malformed message from kernel ignored")
                        continue
                    cmd = frames[1]
                    if cmd == _W.REQUEST.value:
                        self._on_request(frames[2:])
                        self.registered.set()
                    elif cmd == _W.HEARTBEAT.value:
                        self.registered.set()
                    elif cmd == _W.DISCONNECT.value:
                        return "disconnected by the kernel"
                    else:
                        log.warning("unexpected command %r from kernel", cmd)
                now = time.monotonic()
                if now >= broker_expiry:
                    return "kernel silent for the liveness window"
                if now >= self._last_send + self.heartbeat:
                    await self._send([_W.HEARTBEAT.value])
                    wake.clear()
                if sock.getsockopt(zmq.EVENTS) & zmq.POLLIN or (
                        sub is not None and sub.getsockopt(zmq.EVENTS) & zmq.POLLIN):
                    continue
                # Sleep until a descriptor signals, a send pokes, stop() is called, or the next
                # heartbeat / liveness deadline (a timer sets the same event: no task per wait).
                timeout = max(0.0, min(self._last_send + self.heartbeat, broker_expiry) - time.monotonic())
                timer = loop.call_later(timeout, wake.set)
                try:
                    await wake.wait()
                finally:
                    timer.cancel()
        finally:
            for fd in readers:
                loop.remove_reader(fd)
            self._wake = None

    def stop(self) -> None:
        self._stopping.set()
        if self._wake is not None:
            self._wake.set()


# -- process entry point --------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """When started by the kernel's supervisor, arrange to be killed if the kernel dies (even by
    SIGKILL), and exit at once if it is already gone."""
    parent = os.environ.get(ENV_PARENT)
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        log.warning("cannot arm PR_SET_PDEATHSIG")
    if os.getppid() != int(parent):
        raise SystemExit("supervisor already gone")


def main(service: Service, argv: list[str] | None = None) -> int:
    """``python -m services.<name>``: serve ``service`` until SIGINT / SIGTERM."""
    parser = argparse.ArgumentParser(prog=f"python -m services.{service.name}")
    parser.add_argument("--endpoint", default=os.environ.get(ENV_ENDPOINT))
    parser.add_argument("--control", default=os.environ.get(ENV_CONTROL))
    parser.add_argument("--name", default=service.name, help="service name to register")
    parser.add_argument("--capacity", type=int, default=service.capacity)
    parser.add_argument("--heartbeat", type=float, default=float(os.environ.get(ENV_HEARTBEAT, P.HEARTBEAT_INTERVAL)))
    parser.add_argument("--liveness", type=int, default=int(os.environ.get(ENV_LIVENESS, P.LIVENESS)))
    parser.add_argument("--log-level", default=os.environ.get(ENV_LOG_LEVEL, "INFO"))
    parser.add_argument("--cert", default=None, help=f"own secret certificate (default ${P.ENV_CERT})")
    parser.add_argument("--server-cert", default=None, help=f"kernel's public certificate (default ${P.ENV_SERVER_CERT})")
    service.add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format=f"%(asctime)s {args.name}[%(process)d] %(levelname)s %(message)s")
    die_with_parent()
    endpoint = args.endpoint or f"ipc://{runtime_dir()}/kernel.sock"
    control = args.control or default_control_for(endpoint)
    service.name = args.name
    service.capacity = args.capacity
    service.configure(args)

    async def serve() -> None:
        runtime = WorkerRuntime(service, endpoint, control, heartbeat=args.heartbeat, liveness=args.liveness,
                                cert=args.cert, server_cert=args.server_cert)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, runtime.stop)
        await runtime.run()

    try:
        import uvloop
    except ImportError:
        asyncio.run(serve())
    else:
        uvloop.run(serve())
    return 0
