"""The blocking client: one DEALER socket, Lazy-Pirate retries, every wait bounded."""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Iterator

import zmq

from clients.core import Reply, RetryPolicy, default_endpoint, parse_reply, raise_for
from kernel import codec, errors
from kernel import protocol as P


class Client:
    """Blocking reca client.

    ``call`` returns the FINAL payload or raises a :class:`kernel.errors.RecaError`.  If no reply
    arrives within ``timeout`` seconds, the socket is closed and reopened and the request sent
    again with a fresh id and the same idempotency key, up to ``retries`` times (Lazy Pirate);
    then :class:`kernel.errors.Timeout`.  Replies to earlier attempts are discarded.
    """

    def __init__(self, endpoint: str | None = None, *, timeout: float = P.CLIENT_TIMEOUT, retries: int = P.CLIENT_RETRIES,
                 job: str | None = None, context: zmq.Context | None = None) -> None:
        self.endpoint = endpoint or default_endpoint()
        self.timeout = timeout
        self.retries = retries
        self.job = job
        self._ctx = context or zmq.Context.instance()
        self._ids = itertools.count(1)
        self._sock: zmq.Socket | None = None
        self._open()

    def _open(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def stream(self, service: str, payload: Any = None, *, job: str | None = None, budget: dict | None = None,
               priority: int | None = None, deadline_ms: float | None = None, idem: str | None = None,
               txn: str | None = None, timeout: float | None = None, retries: int | None = None) -> Iterator[Reply]:
        """Yield every reply (PARTIALs, then the FINAL).  ``timeout`` bounds the silence between
        two replies; a retry happens only before the first reply arrives."""
        if self._sock is None:
            raise errors.BadRequest("client is closed")
        policy = RetryPolicy(service, self.timeout if timeout is None else timeout,
                             self.retries if retries is None else retries)
        for rid, frames in policy.attempts(self._ids, payload, job=job if job is not None else self.job,
                                           budget=budget, priority=priority, deadline_ms=deadline_ms,
                                           idem=idem, txn=txn):
            self._sock.send_multipart(frames)
            got_any = False
            while self._sock.poll(int(policy.timeout * 1000), zmq.POLLIN):
                try:
                    got_id, reply = parse_reply(self._sock.recv_multipart())
                except errors.BadRequest:
                    continue
                if got_id != rid:
                    continue  # a late reply to an earlier attempt
                got_any = True
                yield reply
                if reply.final:
                    return
            policy.went_silent(got_any)
            # Lazy Pirate: the socket may be wedged on a dead peer; start a fresh one.
            self.close()
            self._open()
        raise policy.exhausted()

    def call(self, service: str, payload: Any = None, *, on_partial: Callable[[Reply], None] | None = None,
             **kw: Any) -> Any:
        """Send one request and return its result (see :meth:`stream` for the keywords)."""
        for reply in self.stream(service, payload, **kw):
            if reply.final:
                return raise_for(reply)
            if on_partial is not None:
                on_partial(reply)
        raise errors.Timeout(f"{service}: no final reply")  # unreachable: stream ends with FINAL or raises

    def call_raw(self, service: str, frames: list[bytes], *, timeout: float | None = None) -> list[bytes]:
        """An opaque MDP request (no reca header): returns the FINAL body frames."""
        assert self._sock is not None
        self._sock.send_multipart([P.MDPC, P.ClientCmd.REQUEST.value, service.encode(), *frames])
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sock.poll(int(left * 1000), zmq.POLLIN):
                raise errors.Timeout(f"{service}: no reply within the timeout")
            msg = self._sock.recv_multipart()
            if len(msg) >= 3 and msg[0] == P.MDPC and msg[1] == P.ClientCmd.FINAL.value:
                return msg[3:]

    # -- management ---------------------------------------------------------------------------------

    def mmi(self, name: str, arg: Any = None, **kw: Any) -> Any:
        return self.call(name, arg, **kw)

    def stats(self) -> dict:
        return self.call(P.MMI_STATS)

    def has_service(self, name: str) -> bool:
        return self.call(P.MMI_SERVICE, name) == "200"

    def wait_for_service(self, name: str, timeout: float = P.START_TIMEOUT) -> None:
        """Block until a worker serves ``name`` (bounded by ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.call(P.MMI_SERVICE, name, timeout=min(1.0, timeout), retries=0) == "200":
                    return
            except errors.Timeout:
                pass
            if time.monotonic() >= deadline:
                raise errors.Timeout(f"no worker for {name!r} within {timeout:g} s")
            time.sleep(0.02)

    def open_job(self, job: str, budget: dict | None = None, parent: str | None = None, priority: int = 0) -> dict:
        return self.call(P.MMI_JOB_OPEN, {"job": job, "budget": budget or {}, "parent": parent, "priority": priority})

    def close_job(self, job: str) -> dict:
        return self.call(P.MMI_JOB_CLOSE, {"job": job})

    def reserve(self, job: str, resource: str, amount: float = 1, commit: bool = False) -> dict:
        """Ask the kernel's gate for ``amount`` of ``resource``; raises Refused when refused."""
        return self.call(P.MMI_GATE_RESERVE, {"job": job, "resource": resource, "amount": amount, "commit": commit})


__all__ = ["Client", "codec"]
