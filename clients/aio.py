"""The asyncio client: one DEALER socket, many requests in flight, replies demultiplexed by id."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any, AsyncIterator, Callable

import zmq

from clients.core import Reply, RetryPolicy, default_endpoint, parse_reply, raise_for
from kernel import auth, errors
from kernel.aio import Readable
from kernel import protocol as P


class AsyncClient:
    """asyncio reca client; safe to use from many tasks at once.

    A reader task receives every reply and hands it to the queue of the request it answers
    (by the id in its status).  A request with no reply within ``timeout`` is re-sent with a
    fresh id and the same idempotency key, up to ``retries`` times; then
    :class:`kernel.errors.Timeout`.
    """

    def __init__(self, endpoint: str | None = None, *, timeout: float = P.CLIENT_TIMEOUT, retries: int = P.CLIENT_RETRIES,
                 job: str | None = None, context: zmq.Context | None = None, cert: str | None = None,
                 server_cert: str | None = None) -> None:
        self.endpoint = endpoint or default_endpoint()
        self.timeout = timeout
        self.retries = retries
        self.job = job
        self._ctx = context or zmq.Context.instance()
        self._sock = auth.secure_socket(self._ctx, zmq.DEALER, self.endpoint, auth.peer_credentials(cert, server_cert))
        self._sock.connect(self.endpoint)
        self._ids = itertools.count(1)
        self._waiting: dict[Any, asyncio.Queue[Reply]] = {}
        self._reader: asyncio.Task | None = None
        self._readable: Readable | None = None
        self._closed = False

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        if self._readable is not None:
            self._readable.close()
        self._sock.close(0)

    async def _read(self) -> None:
        readable = self._readable
        assert readable is not None
        while True:
            await readable.wait()
            while True:
                try:
                    frames = self._sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    rid, reply = parse_reply(frames)
                except errors.BadRequest:
                    continue
                queue = self._waiting.get(rid)
                if queue is not None:
                    queue.put_nowait(reply)

    async def stream(self, service: str, payload: Any = None, *, job: str | None = None,
                     budget: dict | None = None, priority: int | None = None, deadline_ms: float | None = None,
                     idem: str | None = None, txn: str | None = None, timeout: float | None = None,
                     retries: int | None = None, on_behalf: str | None = None) -> AsyncIterator[Reply]:
        """Yield every reply (PARTIALs, then the FINAL); ``timeout`` bounds the silence between
        two replies, and retries happen only before the first reply.  ``on_behalf``: a service
        acting for the caller of a request it serves (``ctx.principal``; the kernel checks it)."""
        if self._closed:
            raise errors.BadRequest("client is closed")
        if self._reader is None:
            self._readable = Readable(self._sock)
            self._reader = asyncio.ensure_future(self._read())
        policy = RetryPolicy(service, self.timeout if timeout is None else timeout,
                             self.retries if retries is None else retries)
        for rid, frames in policy.attempts(self._ids, payload, job=job if job is not None else self.job,
                                           budget=budget, priority=priority, deadline_ms=deadline_ms,
                                           idem=idem, txn=txn, on_behalf=on_behalf):
            queue: asyncio.Queue[Reply] = asyncio.Queue()
            self._waiting[rid] = queue
            try:
                self._sock.send_multipart(frames)
                assert self._readable is not None
                self._readable.poke()
                got_any = False
                while True:
                    try:
                        reply = await asyncio.wait_for(queue.get(), policy.timeout)
                    except asyncio.TimeoutError:
                        break
                    got_any = True
                    yield reply
                    if reply.final:
                        return
                policy.went_silent(got_any)
            finally:
                self._waiting.pop(rid, None)
        raise policy.exhausted()

    async def call(self, service: str, payload: Any = None, *,
                   on_partial: Callable[[Reply], Any] | None = None, **kw: Any) -> Any:
        """Send one request and return its result, or raise its typed error."""
        async for reply in self.stream(service, payload, **kw):
            if reply.final:
                return raise_for(reply)
            if on_partial is not None:
                result = on_partial(reply)
                if asyncio.iscoroutine(result):
                    await result
        raise errors.Timeout(f"{service}: no final reply")

    async def stats(self) -> dict:
        return await self.call(P.MMI_STATS)

    async def wait_for_service(self, name: str, timeout: float = P.START_TIMEOUT) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                if await self.call(P.MMI_SERVICE, name, timeout=min(1.0, timeout), retries=0) == "200":
                    return
            except errors.Timeout:
                pass
            if loop.time() >= deadline:
                raise errors.Timeout(f"no worker for {name!r} within {timeout:g} s")
            await asyncio.sleep(0.02)

    async def open_job(self, job: str, budget: dict | None = None, parent: str | None = None,
                       priority: int = 0) -> dict:
        return await self.call(P.MMI_JOB_OPEN, {"job": job, "budget": budget or {}, "parent": parent,
                                                "priority": priority})

    async def reserve(self, job: str, resource: str, amount: float = 1, commit: bool = False) -> dict:
        return await self.call(P.MMI_GATE_RESERVE, {"job": job, "resource": resource, "amount": amount,
                                                    "commit": commit})
