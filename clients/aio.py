"""The async client on anyio: one DEALER socket, many requests in flight, replies demultiplexed
by id; runs under asyncio (uvloop included) and trio.

Use it as ``async with AsyncClient(endpoint) as client: ...``: a task group owned by the ``async
with`` runs the reader (and, until the kernel is first reached, the watcher of the socket's
handshake), so no task outlives the block.  Under asyncio the client also works without ``async
with`` (the services' long-lived clients): the reader then starts with the first request and
:meth:`AsyncClient.close` ends it.

ZeroMQ's descriptor signals edge-wise ("something changed"), so the reader always drains until
``ZMQ_EVENTS`` has no input before it waits on the descriptor again, and whoever sends drains too
(a send may consume the edge of a reply that is already there).  Waiting is
``anyio.wait_readable`` on the descriptor; every wait for a reply is bounded by an anyio
deadline.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
from typing import Any, AsyncIterator, Callable

import anyio
import sniffio
import zmq
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from zmq.utils.monitor import recv_monitor_message

from clients.core import (
    MONITOR_EVENTS,
    ConnectError,
    FirstContact,
    Reply,
    RetryPolicy,
    cert_paths,
    default_endpoint,
    parse_reply,
    precheck,
    raise_for,
)
from kernel import auth, errors
from kernel import protocol as P
from kernel.aio import readable

#: How often a send that found no connection to queue on is tried again, seconds.
SEND_RETRY_S = 0.02
#: What a request's stream receives: a reply, or the error that ends every wait (first contact).
_Item = Reply | errors.RecaError


class AsyncClient:
    """anyio reca client; safe to use from many tasks at once (in one event loop thread).

    A request with no reply within ``timeout`` is re-sent with a fresh id and the same
    idempotency key, up to ``retries`` times; then :class:`kernel.errors.Timeout`.  First contact
    fails fast as in :class:`clients.Client` (``fail_fast``).
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout: float = P.CLIENT_TIMEOUT,
        retries: int = P.CLIENT_RETRIES,
        job: str | None = None,
        context: zmq.Context | None = None,
        cert: str | None = None,
        server_cert: str | None = None,
        fail_fast: bool = True,
    ) -> None:
        self.endpoint = endpoint or default_endpoint()
        self.timeout = timeout
        self.retries = retries
        self.job = job
        self._ctx = context or zmq.Context.instance()
        creds = auth.peer_credentials(cert, server_cert)
        self._sock = auth.secure_socket(self._ctx, zmq.DEALER, self.endpoint, creds)
        self._contact: FirstContact | None = None
        #: The monitor's last diagnosis before the kernel was reached (see :meth:`_send`).
        self._problem: errors.RecaError | None = None
        self._monitor: zmq.Socket | None = None
        if fail_fast:
            mine, theirs = cert_paths(cert, server_cert)
            self._contact = FirstContact(
                self.endpoint,
                curve=creds is not None and self.endpoint.startswith("tcp://"),
                cert=mine,
                server_cert=theirs,
            )
            self._monitor = self._sock.get_monitor_socket(MONITOR_EVENTS)
        self._sock.connect(self.endpoint)
        self._ids = itertools.count(1)
        self._waiting: dict[Any, MemoryObjectSendStream[_Item]] = {}
        self._stack: contextlib.AsyncExitStack | None = None
        self._tasks: anyio.abc.TaskGroup | None = None
        self._legacy: Any = None  # the asyncio reader task when used without ``async with``
        self._closed = False

    # -- lifetime ---------------------------------------------------------------------------------

    async def __aenter__(self) -> "AsyncClient":
        stack = contextlib.AsyncExitStack()
        self._tasks = await stack.enter_async_context(anyio.create_task_group())
        self._stack = stack
        self._start_readers(self._tasks.start_soon)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        try:
            if self._tasks is not None:
                self._tasks.cancel_scope.cancel()
            if self._stack is not None:
                await self._stack.__aexit__(None, None, None)
        finally:
            self._stack = self._tasks = None
            self._close_sockets()

    def _start_readers(self, start: Callable[..., Any]) -> None:
        start(self._read)
        if self._monitor is not None:
            start(self._watch_contact)

    async def close(self) -> None:
        """End the reader (when used without ``async with``) and close the socket."""
        if self._legacy is not None:
            for task in self._legacy:
                task.cancel()
            for task in self._legacy:
                with contextlib.suppress(BaseException):
                    await task
            self._legacy = None
        if self._stack is not None:
            await self.__aexit__(None, None, None)
        self._close_sockets()

    def _close_sockets(self) -> None:
        self._closed = True
        self._stop_monitor()
        self._sock.close(0)

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            with contextlib.suppress(Exception):  # wake a task waiting on its descriptor before it closes
                anyio.notify_closing(self._monitor.fileno())
            with contextlib.suppress(zmq.ZMQError):
                self._sock.disable_monitor()
            self._monitor.close(0)
            self._monitor = None

    def _ensure_reader(self) -> None:
        if self._tasks is not None or self._legacy is not None:
            return
        if sniffio.current_async_library() != "asyncio":
            raise RuntimeError(
                "use `async with AsyncClient(...) as client:` (outside asyncio the reader needs "
                "the task group that block owns)"
            )
        import asyncio

        loop = asyncio.get_running_loop()
        self._legacy = [loop.create_task(self._read())]
        if self._monitor is not None:
            self._legacy.append(loop.create_task(self._watch_contact()))

    # -- reading ----------------------------------------------------------------------------------

    def _drain(self) -> None:
        """Hand every reply waiting on the socket to the request it answers (never blocks)."""
        sock = self._sock
        while readable(sock):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                rid, reply = parse_reply(frames)
            except errors.BadRequest:
                continue
            if self._contact is not None:
                self._contact_made()
            queue = self._waiting.get(rid)
            if queue is not None:
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                    queue.send_nowait(reply)

    async def _read(self) -> None:
        while True:
            self._drain()
            await anyio.wait_readable(self._sock.fileno())

    async def _watch_contact(self) -> None:
        """Read the monitor until the handshake succeeded (then stop it).  Each failure it names is
        given to the requests waiting then; ZeroMQ keeps reconnecting, so a later request gets the
        next one, or its reply once the kernel is there (a kernel still starting is waited for by
        retrying, as ``wait_for_service`` does)."""
        while self._contact is not None and self._monitor is not None:
            monitor = self._monitor
            while readable(monitor):
                try:
                    event = recv_monitor_message(monitor, zmq.NOBLOCK)
                except zmq.Again:
                    break
                if self._contact is None:
                    return
                problem = self._contact.on_event(event["event"], event["value"])
                if problem is not None:
                    self._fail(problem)
                elif self._contact.done:
                    self._contact_made()
                    return
            try:
                await anyio.wait_readable(monitor.fileno())
            except (anyio.ClosedResourceError, zmq.ZMQError):
                return  # the monitor was stopped: a reply reached us first

    def _contact_made(self) -> None:
        self._contact = None
        self._problem = None
        self._stop_monitor()

    def _fail(self, problem: errors.RecaError) -> None:
        self._problem = problem
        for queue in list(self._waiting.values()):
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.WouldBlock):
                queue.send_nowait(problem)

    # -- requests ---------------------------------------------------------------------------------

    async def stream(
        self,
        service: str,
        payload: Any = None,
        *,
        job: str | None = None,
        budget: dict | None = None,
        priority: int | None = None,
        deadline_ms: float | None = None,
        idem: str | None = None,
        txn: str | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        on_behalf: str | None = None,
    ) -> AsyncIterator[Reply]:
        """Yield every reply (PARTIALs, then the FINAL); ``timeout`` bounds the silence between
        two replies, and retries happen only before the first reply.  ``on_behalf``: a service
        acting for the caller of a request it serves (``ctx.principal``; the kernel checks it)."""
        if self._closed:
            raise errors.BadRequest("client is closed")
        if self._contact is not None:
            precheck(self.endpoint)
        self._ensure_reader()
        policy = RetryPolicy(
            service, self.timeout if timeout is None else timeout, self.retries if retries is None else retries
        )
        for rid, frames in policy.attempts(
            self._ids,
            payload,
            job=job if job is not None else self.job,
            budget=budget,
            priority=priority,
            deadline_ms=deadline_ms,
            idem=idem,
            txn=txn,
            on_behalf=on_behalf,
        ):
            send: MemoryObjectSendStream[_Item]
            receive: MemoryObjectReceiveStream[_Item]
            send, receive = anyio.create_memory_object_stream[_Item](math.inf)
            self._waiting[rid] = send
            try:
                got_any = False
                if await self._send(frames, policy.timeout):
                    self._drain()  # the send may have consumed the edge of input already there
                    while True:
                        item: _Item | None = None
                        with anyio.move_on_after(policy.timeout):
                            item = await receive.receive()
                        if item is None:
                            break
                        if isinstance(item, errors.RecaError):
                            raise item
                        got_any = True
                        yield item
                        if item.final:
                            return
                policy.went_silent(got_any)
            finally:
                self._waiting.pop(rid, None)
                send.close()
                receive.close()
        raise policy.exhausted()

    async def _send(self, frames: list[bytes], timeout: float) -> bool:
        """Queue ``frames`` on the socket without blocking the event loop; False if nothing took
        them within ``timeout`` (the attempt then counts as silent).

        A DEALER blocks a send while it has no connection to queue it on: after a failed CURVE
        handshake ZeroMQ may drop the connection for good.  A blocking send there froze the whole
        event loop, and no timeout could fire (caught in ``test_curve_failures_name_the_certificate``
        under load: the handshake had failed before the first send).  So the send never blocks; while
        it cannot go, the monitor's diagnosis (given before this request was waiting) is raised."""
        with anyio.move_on_after(timeout):
            while True:
                try:
                    self._sock.send_multipart(frames, zmq.NOBLOCK)
                    return True
                except zmq.Again:
                    if self._problem is not None:
                        raise self._problem from None
                await anyio.sleep(SEND_RETRY_S)
        return False

    async def call(
        self, service: str, payload: Any = None, *, on_partial: Callable[[Reply], Any] | None = None, **kw: Any
    ) -> Any:
        """Send one request and return its result, or raise its typed error."""
        async with contextlib.aclosing(self.stream(service, payload, **kw)) as replies:  # closed on return
            async for reply in replies:
                if reply.final:
                    return raise_for(reply)
                if on_partial is not None:
                    result = on_partial(reply)
                    if inspect.isawaitable(result):
                        await result
        raise errors.Timeout(f"{service}: no final reply")

    async def stats(self) -> dict:
        return await self.call(P.MMI_STATS)

    async def wait_for_service(self, name: str, timeout: float = P.START_TIMEOUT) -> None:
        """Wait (bounded by ``timeout``) until a worker serves ``name``; a kernel that is still
        starting (its socket not there yet) is waited for too."""
        last = ""
        deadline = anyio.current_time() + timeout
        while True:
            try:
                if await self.call(P.MMI_SERVICE, name, timeout=min(1.0, timeout), retries=0) == "200":
                    return
            except (errors.Timeout, ConnectError) as e:  # a kernel still starting: no socket file yet
                last = f"; last: {e}"
            if anyio.current_time() >= deadline:
                raise errors.Timeout(f"no worker for {name!r} within {timeout:g} s{last}")
            await anyio.sleep(0.02)

    async def open_job(
        self, job: str, budget: dict | None = None, parent: str | None = None, priority: int = 0
    ) -> dict:
        return await self.call(
            P.MMI_JOB_OPEN, {"job": job, "budget": budget or {}, "parent": parent, "priority": priority}
        )

    async def close_job(self, job: str) -> dict:
        return await self.call(P.MMI_JOB_CLOSE, {"job": job})

    async def reserve(self, job: str, resource: str, amount: float = 1, commit: bool = False) -> dict:
        return await self.call(
            P.MMI_GATE_RESERVE, {"job": job, "resource": resource, "amount": amount, "commit": commit}
        )
