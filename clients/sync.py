"""The blocking client: one DEALER socket, Lazy-Pirate retries, every wait bounded."""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Iterator

import zmq

from zmq.utils.monitor import recv_monitor_message

from clients.core import (MONITOR_EVENTS, ConnectError, FirstContact, Reply, RetryPolicy, cert_paths, default_endpoint,
                          parse_reply, precheck, raise_for)
from kernel import auth, codec, errors
from kernel import protocol as P

#: How often a send that found no connection to queue on is tried again, seconds.
SEND_RETRY_S = 0.05


class Client:
    """Blocking reca client.

    ``call`` returns the FINAL payload or raises a :class:`kernel.errors.RecaError`.  If no reply
    arrives within ``timeout`` seconds, the socket is closed and reopened and the request sent
    again with a fresh id and the same idempotency key, up to ``retries`` times (Lazy Pirate);
    then :class:`kernel.errors.Timeout`.  Replies to earlier attempts are discarded.

    First contact fails fast: until this client has once reached the kernel, a missing ``ipc://``
    socket file, nothing listening, or a refused CURVE handshake raise
    :class:`clients.core.ConnectError` at once, naming the endpoint or the certificate
    (``fail_fast=False``: wait and retry instead, e.g. for a kernel that is still starting).
    """

    def __init__(self, endpoint: str | None = None, *, timeout: float = P.CLIENT_TIMEOUT, retries: int = P.CLIENT_RETRIES,
                 job: str | None = None, context: zmq.Context | None = None, cert: str | None = None,
                 server_cert: str | None = None, fail_fast: bool = True) -> None:
        self.endpoint = endpoint or default_endpoint()
        #: CURVE credentials for tcp:// (``cert``/``server_cert`` or $RECA_CERT/$RECA_SERVER_CERT).
        self._creds = auth.peer_credentials(cert, server_cert)
        self.timeout = timeout
        self.retries = retries
        self.job = job
        self._ctx = context or zmq.Context.instance()
        self._ids = itertools.count(1)
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        curve = self._creds is not None and self.endpoint.startswith("tcp://")
        #: Watches the first connection's handshake (None once the kernel was reached, or not failing fast).
        self._contact: FirstContact | None = (
            FirstContact(self.endpoint, curve=curve, **dict(zip(("cert", "server_cert"), cert_paths(cert, server_cert))))
            if fail_fast else None)
        #: The id of the request :meth:`stream` is waiting on (what :meth:`cancel` names).
        self.current: int | None = None
        self._open()

    def _open(self) -> None:
        sock = auth.secure_socket(self._ctx, zmq.DEALER, self.endpoint, self._creds)
        if self._contact is not None:
            self._monitor = sock.get_monitor_socket(MONITOR_EVENTS)
        sock.connect(self.endpoint)
        self._sock = sock

    def _close_monitor(self) -> None:
        if self._monitor is not None:
            if self._sock is not None:
                try:
                    self._sock.disable_monitor()
                except zmq.ZMQError:
                    pass
            self._monitor.close(0)
            self._monitor = None

    def close(self) -> None:
        self._close_monitor()
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def _contact_made(self) -> None:
        self._contact = None
        self._close_monitor()

    def _poll(self, timeout_s: float) -> bool:
        """Wait (bounded) for input on the socket; on first contact, raise the monitor's diagnosis."""
        assert self._sock is not None
        if self._monitor is None or self._contact is None:
            return bool(self._sock.poll(int(timeout_s * 1000), zmq.POLLIN))
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        deadline = time.monotonic() + timeout_s
        while True:
            ready = dict(poller.poll(max(0, int((deadline - time.monotonic()) * 1000))))
            if self._monitor in ready and self._read_monitor():
                return self._poll(max(0.0, deadline - time.monotonic()))
            if self._sock in ready:
                return True
            if time.monotonic() >= deadline:
                return False

    def _read_monitor(self) -> bool:
        """Read the monitor's waiting events: raise its diagnosis; True once the handshake succeeded."""
        while self._contact is not None and self._monitor is not None:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return False
            problem = self._contact.on_event(event["event"], event["value"])
            if problem is not None:
                raise problem
            if self._contact.done:
                self._contact_made()
                return True
        return False

    def _send(self, frames: list[bytes], timeout_s: float) -> bool:
        """Queue ``frames`` without blocking past ``timeout_s``; False if nothing took them (the
        attempt then counts as silent).  A DEALER blocks a send while it has no connection to queue
        it on, as after a failed CURVE handshake (an unbounded wait before: see
        :meth:`clients.aio.AsyncClient._send`); meanwhile the monitor's diagnosis is raised."""
        assert self._sock is not None
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._sock.send_multipart(frames, zmq.NOBLOCK)
                return True
            except zmq.Again:
                pass
            self._read_monitor()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._sock.poll(int(min(left, SEND_RETRY_S) * 1000) + 1, zmq.POLLOUT)

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
        if self._contact is not None:
            precheck(self.endpoint)
        policy = RetryPolicy(service, self.timeout if timeout is None else timeout,
                             self.retries if retries is None else retries)
        for rid, frames in policy.attempts(self._ids, payload, job=job if job is not None else self.job,
                                           budget=budget, priority=priority, deadline_ms=deadline_ms,
                                           idem=idem, txn=txn):
            sent = self._send(frames, policy.timeout)
            self.current = rid
            got_any = False
            while sent and self._poll(policy.timeout):
                try:
                    got_id, reply = parse_reply(self._sock.recv_multipart())
                except errors.BadRequest:
                    continue
                if self._contact is not None:
                    self._contact_made()  # a reply: the kernel was reached
                if got_id != rid:
                    continue  # a late reply to an earlier attempt
                got_any = True
                yield reply
                if reply.final:
                    self.current = None
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
        bound = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + bound
        if not self._send([P.MDPC, P.ClientCmd.REQUEST.value, service.encode(), *frames], bound):
            raise errors.Timeout(f"{service}: no connection took the request within the timeout")
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

    def cancel(self, rid: int | None = None, *, timeout: float = 2.0) -> dict:
        """Cancel this client's own request ``rid`` (default: the one :meth:`stream` waits on),
        e.g. after Ctrl-C; the handler sees it at its next safe point."""
        rid = self.current if rid is None else rid
        if rid is None:
            raise errors.BadRequest("no request of this client to cancel")
        return self.call(P.MMI_CANCEL, {P.C_ID: rid}, timeout=timeout, retries=0)

    def has_service(self, name: str) -> bool:
        return self.call(P.MMI_SERVICE, name) == "200"

    def wait_for_service(self, name: str, timeout: float = P.START_TIMEOUT) -> None:
        """Block until a worker serves ``name`` (bounded by ``timeout``); a kernel that is still
        starting (its socket not there yet) is waited for too."""
        last = ""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.call(P.MMI_SERVICE, name, timeout=min(1.0, timeout), retries=0) == "200":
                    return
            except (errors.Timeout, ConnectError) as e:  # a kernel still starting: no socket file yet
                last = f"; last: {e}"
            if time.monotonic() >= deadline:
                raise errors.Timeout(f"no worker for {name!r} within {timeout:g} s{last}")
            time.sleep(0.02)

    def open_job(self, job: str, budget: dict | None = None, parent: str | None = None, priority: int = 0) -> dict:
        return self.call(P.MMI_JOB_OPEN, {"job": job, "budget": budget or {}, "parent": parent, "priority": priority})

    def close_job(self, job: str) -> dict:
        return self.call(P.MMI_JOB_CLOSE, {"job": job})

    def reserve(self, job: str, resource: str, amount: float = 1, commit: bool = False) -> dict:
        """Ask the kernel's gate for ``amount`` of ``resource``; raises Refused when refused."""
        return self.call(P.MMI_GATE_RESERVE, {"job": job, "resource": resource, "amount": amount, "commit": commit})


__all__ = ["Client", "codec"]
