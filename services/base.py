"""The service runtime: an MDP/0.2 worker with heartbeats, reconnects and control topics.

A service is a :class:`Service` subclass whose ``handle(ctx, payload)`` coroutine answers one
request; it may stream PARTIAL replies with ``await ctx.partial(x)``, report what it spent with
``ctx.charge(tokens=..., flops=...)`` and offer safe points with ``await ctx.checkpoint()``, where
the kernel's control messages take effect: ``preempt`` pauses there (the caller sees a PARTIAL
with status ``paused``) keeping every local variable of the handler, ``resume`` continues from the
same state, ``cancel`` raises :class:`kernel.errors.Cancelled` in the handler.

:class:`WorkerRuntime` is the process shell over :class:`kernel.worker.WorkerSession`, the
sans-I/O state machine that decides everything about the link (READY, heartbeats, liveness,
reconnect backoff), the requests (replies, exactly one FINAL) and control (targets, safe
points).  The shell owns a DEALER socket to the kernel, a SUB socket on the kernel's control PUB,
the clock and the handler tasks; requests in flight when the link is lost are cancelled (the
kernel has already answered them ``worker_died``).

Handlers run on the event loop: a handler that computes for long stretches must call
``await ctx.checkpoint()`` more often than the liveness window, or run its compute in a thread.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import functools
import gc
import logging
import math
import numbers
import os
import select
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any, Callable

import zmq

from kernel import auth, codec, errors
from kernel.aio import readable, recv_frames, send_frames
from kernel import protocol as P
from kernel.worker import LinkLost, NewRequest, RequestState, SafePoint, WorkerSession
from kernel.config import default_control_for, runtime_dir
from kernel.protocol import ENV_CONTROL, ENV_ENDPOINT, ENV_HEARTBEAT, ENV_LIVENESS, ENV_LOG_LEVEL, ENV_PARENT

log = logging.getLogger("reca.service")

#: READYs the kernel answered with DISCONNECT, in a row, before the worker gives up (about 7 s of
#: reconnect back-off): the kernel refuses to let this principal serve the name (not its role's
#: service, or its key revoked), so reconnecting forever would only hide that.  The process exits
#: with :data:`EXIT_REFUSED` and says why; its supervisor shows the reason (``status``).  (A kernel
#: over its peer cap also answers a new worker so; a flood that long costs one restart.)
REFUSED_READY_LIMIT = 8
EXIT_REFUSED = 78  # EX_CONFIG


class WorkerRefused(RuntimeError):
    """The kernel keeps refusing this worker's READY (see :data:`REFUSED_READY_LIMIT`)."""


class Context:
    """One request as its handler sees it.

    ``reca`` is False for opaque MDP bodies: ``payload`` is then the list of raw frames and the
    handler's result must be bytes or a list of bytes.
    """

    def __init__(self, runtime: "WorkerRuntime", state: RequestState) -> None:
        self._runtime = runtime
        self._state = state
        self.token = state.token
        self.header = state.header or {}
        self.reca = state.reca
        self.id = state.id
        self.job: str | None = state.job
        #: The caller's verified principal (set by the kernel, never by the client; "" for an
        #: opaque body): services keep per-caller state under it (services.common.Scoped).
        self.principal: str = state.principal or ""
        self.priority: int = self.header.get(P.H_PRIORITY, P.DEFAULT_PRIORITY)
        #: What the handler reported spending (sent in every status frame).
        self.spent: dict[str, float] = state.spent
        self._wake_event: asyncio.Event | None = None  # made on first use (most requests never pause)
        self.task: asyncio.Task | None = None

    @functools.cached_property
    def granted(self) -> dict[str, float]:
        """The budget the kernel granted (already clamped to what the job has left): the handler's
        own copy, made on first use (most handlers never look)."""
        return dict(self.header.get(P.H_GRANTED) or self.header.get(P.H_BUDGET) or {})

    @property
    def _wake(self) -> asyncio.Event:
        """Set whenever a control message addressed this request (the paused handler looks again)."""
        event = self._wake_event
        if event is None:
            event = self._wake_event = asyncio.Event()
        return event

    @property
    def paused(self) -> bool:
        """Whether the handler waits at a safe point after a preempt."""
        return self._state.paused

    def charge(self, **amounts: float) -> None:
        """Record spending (``tokens=``, ``flops=``, counted resources); reported to the kernel
        in every status frame, which charges it to the job.  A misspelt budget kind (``flopz``:
        it would charge nothing) or an amount that is not a finite non-negative number is a
        :class:`errors.BadRequest`, and nothing of the call is recorded."""
        for kind, amount in amounts.items():
            typo = P.budget_kind_typo(kind)
            if typo is not None:
                raise errors.BadRequest(f"charge: {kind!r} is not a budget kind (did you mean {typo!r}?)",
                                        kind="budget_kind")
            if isinstance(amount, bool) or not isinstance(amount, numbers.Real) or not 0 <= amount < math.inf:
                raise errors.BadRequest(f"charge: {kind}={amount!r} is not a finite non-negative number")
        for kind, amount in amounts.items():
            self.spent[kind] = self.spent.get(kind, 0) + amount

    async def partial(self, payload: Any, status: str = P.STATUS_PARTIAL) -> None:
        """Stream one PARTIAL reply to the caller."""
        self._runtime.partial(self, payload, status)

    async def checkpoint(self, on_pause: Callable[[], None] | None = None,
                         on_resume: Callable[[], None] | None = None) -> None:
        """A safe point: raises if cancelled; if a preempt is pending, acknowledges it (a PARTIAL
        with status ``paused``) and waits here, state intact, until resumed or cancelled.
        ``on_pause`` runs just before the pause is acknowledged, ``on_resume`` when the wait
        ends (resumed or cancelled), so a handler can park its own state (the decode worker
        marks its engine sequence paused)."""
        runtime = self._runtime
        session = runtime.session
        runtime.drain_control()  # a preempt published a moment ago takes effect here
        decision = session.pending(self.token)
        if decision is SafePoint.CONTINUE:
            await asyncio.sleep(0)
            return
        if decision is SafePoint.PAUSE:
            if on_pause is not None:
                on_pause()
            decision = session.safe_point(self.token, time.monotonic())  # acknowledges the pause
            runtime.flush()
            try:
                while decision is SafePoint.PAUSE:
                    self._wake.clear()
                    decision = session.still_paused(self.token, time.monotonic())
                    runtime.flush()
                    if decision is SafePoint.PAUSE:
                        await self._wake.wait()
            finally:
                if on_resume is not None:
                    on_resume()
        if decision is SafePoint.CANCEL:
            assert self._state.cancel is not None
            raise self._state.cancel


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
    """The asyncio shell of a :class:`kernel.worker.WorkerSession`: connects a :class:`Service`
    to the kernel and serves until :meth:`stop`.

    It owns the DEALER socket (a fresh one per link), the SUB socket, the clock and the handler
    tasks; every protocol decision is the session's.  Invariant: every handler task still
    running is in ``active`` (its context leaves ``active`` with its FINAL, the task's last step);
    the tasks of a lost link are cancelled and awaited (bounded) before the next link, and none
    outlives :meth:`run`.  (An ``asyncio.TaskGroup`` gives the same ownership but cost 2-3 us per
    request, about 5% of the worker's per-request CPU, measured.)

    Input is driven by callbacks, as in the kernel (kernel.server): the loop calls
    :meth:`_on_input` when either socket's descriptor signals, and one long-lived timer calls it
    when the session's next wake-up is due; no task step and no future per loop turn.  ZeroMQ's
    descriptors are edge-triggered, so every turn ends only once neither socket is readable, and
    a send outside a turn (a handler's reply) is followed by one ``ZMQ_EVENTS`` look: input whose
    edge the send consumed is picked up by a turn scheduled then (:meth:`flush`); input that
    arrives later raises a new edge.
    """

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
        self.ctx = context or zmq.Context()
        self._own_ctx = context is None
        self.sock: zmq.Socket | None = None
        self.sub: zmq.Socket | None = None
        self.session = WorkerSession(service.name, self._queue, capacity=service.capacity, pid=os.getpid(),
                                     heartbeat=heartbeat, liveness=liveness)
        self.active: dict[bytes, Context] = {}
        self._out: list[list[bytes]] = []
        #: The current link's end (its reason, or the error a turn raised); None between links.
        self._ended: asyncio.Future[str] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poked = False  # a turn is scheduled by flush() (call_soon), not yet run
        #: The session's timer: one handle, re-armed only when the next wake-up moves earlier.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        #: The SUB socket's descriptor, polled without libzmq (see drain_control), and whether the
        #: last drain of the SUB socket may have stopped before it found the socket unreadable.
        self._sub_poll: select.poll | None = None
        self._sub_dirty = True
        self._stopping = asyncio.Event()
        self.registered = asyncio.Event()
        self._refused = 0  # READYs refused in a row (_count_refusal)
        #: gc.freeze() once the service is set up (the process entry point sets it): the start-up
        #: objects (zmq, asyncio, the service's own tables) leave the collector's generations.
        self.freeze_after_setup = False

    # -- sending ----------------------------------------------------------------------------------

    def _queue(self, frames: list[bytes]) -> None:
        self._out.append(frames)

    def flush(self) -> None:
        """Send what the session emitted, in order (a handler's replies, outside a turn)."""
        sock = self.sock
        if self._send_out() and self._ended is not None and not self._poked and sock is not None and readable(sock):
            # The send may have consumed the descriptor's edge of input that is waiting: take a
            # turn for it (input arriving later raises a new edge; libzmq's prescribed check).
            self._poked = True
            assert self._loop is not None
            self._loop.call_soon(self._on_poke)

    def _send_out(self) -> bool:
        """Send what the session emitted, in order; whether anything was sent."""
        out = self._out
        if not out:
            return False
        self._out = []
        sock = self.sock
        if sock is None:
            return False
        for frames in out:
            send_frames(sock, frames, nonblocking=False)
        return True

    def partial(self, ctx: Context, payload: Any, status: str) -> None:
        self.session.partial(ctx.token, payload, time.monotonic(), status)
        self.flush()

    def _final(self, ctx: Context, result: Any = None, error: errors.RecaError | None = None) -> None:
        if self.active.get(ctx.token) is ctx:
            del self.active[ctx.token]
            self.session.final(ctx.token, time.monotonic(), result, error)
            self.flush()

    # -- serving ----------------------------------------------------------------------------------

    async def _serve(self, ctx: Context, payload: Any) -> None:
        try:
            result = await self.service.handle(ctx, payload)
        except errors.RecaError as exc:
            self._final(ctx, error=exc)
        except asyncio.CancelledError:
            self._final(ctx, error=errors.Cancelled("worker shutting down"))
            raise
        except Exception as exc:
            log.exception("handler of %s failed", self.service.name)
            self._final(ctx, error=errors.ServiceError(f"{type(exc).__name__}: {exc}"))
        else:
            self._final(ctx, result)

    def _on_events(self, events: Sequence[Any]) -> str | None:
        """Start handlers of new requests; the reason when the link was lost."""
        if not events:
            return None
        loop = self._loop or asyncio.get_running_loop()
        for event in events:
            if isinstance(event, NewRequest):
                if not self.registered.is_set():
                    self.registered.set()
                ctx = Context(self, event.state)
                self.active[ctx.token] = ctx
                # A Task, not an eager first step: on Python 3.11 a handler's first step run
                # inline would run in this loop callback, outside any task (asyncio.current_task()
                # None: asyncio.timeout() in a handler would fail).
                ctx.task = loop.create_task(self._serve(ctx, event.payload))
            elif isinstance(event, LinkLost):
                return event.reason
        return None

    def _on_control(self, topic: bytes, message: Any) -> None:
        op = topic.rsplit(b"/", 1)[-1].decode(errors="replace")
        if not isinstance(message, dict):
            return
        for state in self.session.on_control(op, message):
            ctx = self.active.get(state.token)
            if ctx is not None:
                ctx._wake.set()
        self.on_control(op, message)

    def drain_control(self) -> None:
        """Apply every control message waiting on the SUB socket (never blocks)."""
        sub = self.sub
        if sub is None:
            return
        # Control messages are rare.  Every drain ends on a look (ZMQ_EVENTS) that found the socket
        # unreadable, and then libzmq signals the descriptor for the next message (the edge the
        # loop's reader waits for): while the descriptor is unsignalled, nothing has come.  poll(2)
        # on it costs a fraction of the look (pyzmq's getsockopt and libzmq's command processing,
        # ~10k instructions, measured), which ran on every turn and every checkpoint.
        poller = self._sub_poll
        if poller is not None and not self._sub_dirty and not poller.poll(0):
            return
        self._sub_dirty = True  # until this drain ends on an unreadable look (a hook may raise)
        while readable(sub):
            try:
                frames = recv_frames(sub)
            except zmq.Again:
                break
            if len(frames) != 2:
                continue
            try:
                self._on_control(frames[0], codec.unpack(frames[1]))
            except errors.BadRequest:
                log.warning("undecodable control message on %r", frames[0])
        self._sub_dirty = False

    def on_control(self, op: str, message: dict) -> None:
        """Hook for services that act on other control ops (fidelity, precision)."""
        handler = getattr(self.service, "on_control", None)
        if handler is not None:
            handler(op, message)

    async def _drop_active(self) -> None:
        """Cancel the handlers of the link that ended and wait (bounded) until they have."""
        tasks = [ctx.task for ctx in self.active.values() if ctx.task is not None and not ctx.task.done()]
        self.active.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=P.SHUTDOWN_TIMEOUT)
            if stuck:
                log.error("%d handler(s) of %s ignored cancellation", len(stuck), self.service.name)

    def _connect(self) -> zmq.Socket:
        sock = auth.secure_socket(self.ctx, zmq.DEALER, self.endpoint, self.creds)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.connect(self.endpoint)
        return sock

    async def run(self) -> None:
        """Serve until :meth:`stop`; reconnect with backoff whenever the kernel is lost."""
        await self.service.setup()
        if self.freeze_after_setup:
            gc.freeze()
        sub = None
        if self.control:
            sub = auth.secure_socket(self.ctx, zmq.SUB, self.control, self.creds)
            for prefix in (self.service.name, P.CTL_ALL):
                sub.setsockopt(zmq.SUBSCRIBE, f"{P.CTL_PREFIX}{prefix}/".encode())
            sub.connect(self.control)
            self.sub = sub
            self._sub_poll = select.poll()
            self._sub_poll.register(sub.fileno(), select.POLLIN)
            self._sub_dirty = True
        session = self.session
        try:
            while not self._stopping.is_set():
                self.sock = self._connect()
                session.connect(time.monotonic())
                self.flush()
                reason = await self._link(sub)
                if reason == "stopping":
                    session.stop(time.monotonic())  # DISCONNECT first: the kernel answers the rest
                    self.flush()
                await self._drop_active()
                self._count_refusal(reason, self.registered.is_set())
                self.registered.clear()
                self.sock.close(0)
                self.sock = None
                if reason == "stopping":
                    break
                delay = max(0.0, session.reconnect_at - time.monotonic())
                log.warning("%s lost the kernel (%s); reconnecting in %.2f s", self.service.name, reason, delay)
                try:
                    await asyncio.wait_for(self._stopping.wait(), delay)
                except asyncio.TimeoutError:
                    pass
        finally:
            await self._drop_active()
            if sub is not None:
                self.sub = None
                self._sub_poll = None
                sub.close(0)
            if self.sock is not None:
                self.sock.close(0)
                self.sock = None
            await self.service.teardown()
            if self._own_ctx:
                self.ctx.term()

    async def _link(self, sub: zmq.Socket | None) -> str:
        """One link's life: the loop feeds the session (:meth:`_on_input`) until the link ends;
        returns why (or raises what a turn raised)."""
        sock = self.sock
        assert sock is not None
        loop = self._loop = asyncio.get_running_loop()
        ended = self._ended = loop.create_future()
        readers = [sock.fileno()]
        if sub is not None:
            readers.append(sub.fileno())
        for fd in readers:
            loop.add_reader(fd, self._on_input)
        try:
            if self._stopping.is_set():
                return "stopping"
            self._on_input()  # what arrived before the readers were added raised no edge we saw
            return await ended
        finally:
            for fd in readers:
                loop.remove_reader(fd)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._timer_at = math.inf
            self._ended = None

    def _on_poke(self) -> None:
        self._poked = False
        self._on_input()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        self._on_input()  # input first, then the tick: messages that waited prove the kernel alive

    def _on_input(self) -> None:
        """One turn: the link's end is set if the turn ended it (or raised); else the timer is
        armed for the session's next wake-up."""
        ended = self._ended
        if ended is None or ended.done():
            return  # the link ended; _link has not yet removed the readers
        try:
            reason = self._turn()
        except Exception as exc:  # the link's owner (run) sees it, as if _link had raised it
            if ended.done():
                raise  # stop() ended the link during the turn: the loop's handler logs it
            ended.set_exception(exc)
            return
        if reason is not None:
            if not ended.done():  # stop() may have ended it during the turn
                ended.set_result(reason)
            return
        wake = self.session.next_wakeup()
        if self._timer is not None and self._timer_at <= wake:
            return  # fires early at worst: a turn that finds nothing due re-arms
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if wake < math.inf:
            assert self._loop is not None
            self._timer_at = wake
            self._timer = self._loop.call_later(max(0.0, wake - time.monotonic()), self._on_timer)

    def _turn(self) -> str | None:
        """Feed the session what both sockets hold, control first, and tick it after each drain,
        until neither socket is readable (their descriptors are edge-triggered); the reason when
        the link ended."""
        sock = self.sock
        assert sock is not None
        session = self.session
        while True:
            self.drain_control()
            received = 0
            while True:
                try:
                    # after one message, look first: a wake-up usually carries one, and the
                    # zmq.Again ending the drain costs ~3x the look (kernel.server._drain)
                    if received == 1 and not readable(sock):
                        break
                    frames = recv_frames(sock)
                except zmq.Again:
                    break
                received += 1
                reason = self._on_events(session.on_message(frames, time.monotonic()))
                self._send_out()  # followed by a look (the drain's, or the one below)
                if reason is not None:
                    return reason
                if session.registered and not self.registered.is_set():
                    self.registered.set()
            reason = self._on_events(session.tick(time.monotonic()))
            sent = self._send_out()
            if reason is not None:
                return reason
            # Each drain ended on a look (or zmq.Again) that left its socket unreadable, and input
            # arriving since raised a new edge (the loop calls again).  Only a send since (the
            # tick's heartbeat) may have consumed such an edge: look again then.
            if not sent or not readable(sock):
                return None
            if self._stopping.is_set():
                return "stopping"  # stop() during the turn: no further drain (as before callbacks)

    def _count_refusal(self, reason: str, registered: bool) -> None:
        """A link the kernel ended with DISCONNECT before it ever spoke on it is a refused READY;
        :data:`REFUSED_READY_LIMIT` in a row raise :class:`WorkerRefused`."""
        if reason == "disconnected by the kernel" and not registered:
            self._refused += 1
            if self._refused >= REFUSED_READY_LIMIT:
                raise WorkerRefused(
                    f"the kernel refused this worker's READY for {self.service.name!r} {self._refused} times in a row: "
                    f"its principal may not serve {self.service.name!r} (over tcp:// a supervised process may serve "
                    "only the service its certificate names), its key was revoked, or the kernel is over its peer cap")
        else:
            self._refused = 0

    def stop(self) -> None:
        self._stopping.set()
        ended = self._ended
        if ended is not None and not ended.done():
            ended.set_result("stopping")


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
    parser.add_argument("--log-level", default=os.environ.get(ENV_LOG_LEVEL, "INFO"), type=str.upper,
                        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
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
        runtime.freeze_after_setup = True
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, runtime.stop)
        await runtime.run()

    try:
        import uvloop
    except ImportError:
        runner: Any = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(serve())
    except WorkerRefused as exc:
        log.error("%s", exc)
        print(f"{args.name}: {exc}", file=sys.stderr, flush=True)  # the last line: status shows it
        return EXIT_REFUSED
    finally:
        # Served and torn down: the interpreter's last full collection would walk every torch /
        # SymPy object only to exit (py-spy: ~0.6 CPU s of each service's stop); finalizers and
        # atexit handlers still run.
        gc.freeze()
    return 0
