"""What the sync and async clients share: building requests and reading replies (no sockets)."""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Iterator
from typing import Any

import zmq

from kernel import codec, errors
from kernel import protocol as P
from kernel.config import runtime_dir


def default_endpoint() -> str:
    """``$RECA_ENDPOINT`` or the embedded default's ipc endpoint."""
    return os.environ.get(P.ENV_ENDPOINT) or f"ipc://{runtime_dir()}/kernel.sock"


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """One reply frame set: ``final`` False for PARTIALs (including ``status == "paused"``)."""

    final: bool
    status: str
    payload: Any
    spent: dict
    raw: dict


def build_header(rid: Any, *, job: str | None, budget: dict | None, priority: int | None,
                 deadline_ms: float | None, idem: str | None, txn: str | None,
                 on_behalf: str | None = None) -> dict:
    header: dict[str, Any] = {P.H_VERSION: P.VERSION, P.H_ID: rid}
    if job is not None:
        header[P.H_JOB] = job
    if budget is not None:
        header[P.H_BUDGET] = budget
    if priority is not None:
        header[P.H_PRIORITY] = priority
    if deadline_ms is not None:
        header[P.H_DEADLINE] = deadline_ms
    if idem is not None:
        header[P.H_IDEM] = idem
    if txn is not None:
        header[P.H_TXN] = txn
    if on_behalf is not None:  # a service acting for the caller it serves (kernel-checked)
        header[P.H_FOR] = on_behalf
    return header


def request_frames(service: str, header: dict, payload: Any) -> list[bytes]:
    return [P.MDPC, P.ClientCmd.REQUEST.value, service.encode(), codec.pack(header), codec.pack(payload)]


def parse_reply(frames: list[bytes]) -> tuple[Any, Reply]:
    """``[MDPC, cmd, service, status, payload?]`` -> (request id, Reply).  Raises BadRequest on
    a reply that is not a reca reply (which a reca client never provokes)."""
    if len(frames) < 4 or frames[0] != P.MDPC:
        raise errors.BadRequest(f"malformed reply with {len(frames)} frames")
    cmd = frames[1]
    if cmd not in (P.ClientCmd.PARTIAL.value, P.ClientCmd.FINAL.value):
        raise errors.BadRequest(f"unexpected reply command {cmd!r}")
    status = codec.unpack(frames[3])
    if not isinstance(status, dict):
        raise errors.BadRequest("reply status is not a map")
    payload = codec.unpack(frames[4]) if len(frames) > 4 else None
    reply = Reply(cmd == P.ClientCmd.FINAL.value, str(status.get(P.S_STATUS, "")), payload,
                  status.get(P.S_SPENT) or {}, status)
    return status.get(P.S_ID), reply


def raise_for(reply: Reply) -> Any:
    """The payload of a successful FINAL, or the typed error it carries."""
    if reply.status == P.STATUS_ERROR:
        exc = errors.from_wire(reply.raw.get(P.S_ERROR))
        exc.detail.setdefault("spent", reply.spent)
        raise exc
    return reply.payload


def new_idem() -> str:
    return uuid.uuid4().hex


class RetryPolicy:
    """The one retry policy of the blocking and the asyncio client (ZeroMQ's Lazy Pirate).

    A request is sent up to ``retries + 1`` times, each time with a fresh request id and the same
    idempotency key, so the kernel's answer to an earlier attempt is recognised and dropped and a
    service can tell a retry from a new request.  ``timeout`` bounds the silence before the first
    reply of an attempt (then the next attempt) and between two replies of a stream that has
    started (then :class:`kernel.errors.Timeout` at once: a retry would run the request twice).
    After the last attempt: :class:`kernel.errors.Timeout`.  No I/O here: the clients send the
    frames and wait.
    """

    def __init__(self, service: str, timeout: float, retries: int) -> None:
        self.service = service
        self.timeout = timeout
        self.retries = retries

    def attempts(self, ids: Iterator[int], payload: Any, *, job: str | None, budget: dict | None,
                 priority: int | None, deadline_ms: float | None, idem: str | None,
                 txn: str | None, on_behalf: str | None = None) -> Iterator[tuple[int, list[bytes]]]:
        """``(request id, frames to send)`` per attempt."""
        idem = idem or new_idem()
        for _ in range(self.retries + 1):
            rid = next(ids)
            header = build_header(rid, job=job, budget=budget, priority=priority, deadline_ms=deadline_ms,
                                  idem=idem, txn=txn, on_behalf=on_behalf)
            yield rid, request_frames(self.service, header, payload)

    def went_silent(self, got_any: bool) -> None:
        """An attempt heard nothing for ``timeout``: raise if its stream had started (the caller
        retries otherwise)."""
        if got_any:
            raise errors.Timeout(f"{self.service}: stream went silent for {self.timeout:g} s")

    def exhausted(self) -> errors.Timeout:
        return errors.Timeout(f"{self.service}: no reply after {self.retries + 1} attempt(s) of {self.timeout:g} s")


# -- first contact: a fast, clear diagnosis instead of a silent wait ------------------------------

#: How to start a kernel, for the messages below.
HOW_TO_START = "start one with `python -m kernel` (or point --endpoint / $RECA_ENDPOINT at a running one)"


class ConnectError(errors.Unavailable):
    """The kernel cannot be reached at all: nothing listens at the endpoint, or it refused the
    CURVE handshake.  Raised at once on first contact (a client that has reached the kernel
    before waits and retries instead: the kernel may be restarting)."""

    code = "connect_failed"


def cert_paths(cert: str | None, server_cert: str | None) -> tuple[str | None, str | None]:
    """The certificate files a client uses: the arguments, else ``$RECA_CERT`` / ``$RECA_SERVER_CERT``."""
    return (cert or os.environ.get(P.ENV_CERT) or None, server_cert or os.environ.get(P.ENV_SERVER_CERT) or None)


def precheck(endpoint: str) -> None:
    """Before the first request to an ``ipc://`` endpoint: its socket file must exist
    (:class:`ConnectError` at once otherwise: no wait, no retry).  A kernel at its connection cap
    has moved it aside (``kernel.protocol.IPC_PAUSED_SUFFIX``): :class:`kernel.errors.Overloaded`."""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        if not os.path.exists(path) and os.path.exists(path + P.IPC_PAUSED_SUFFIX):
            raise errors.Overloaded(f"the kernel at {endpoint} is at its connection cap and accepts no new "
                                    "connections for now; retry later")
        if not os.path.exists(path):
            raise ConnectError(f"no kernel at {endpoint}: the socket file {path} does not exist; {HOW_TO_START}")


#: Socket monitor events :class:`FirstContact` reads.
MONITOR_EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_DISCONNECTED
                  | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                  | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


#: Consecutive CURVE handshakes dropped by the kernel before the server certificate is blamed.
DROPS_BEFORE_BLAME = 3


class FirstContact:
    """Reads a new connection's socket-monitor events (no I/O here) until the ZMTP handshake
    with the kernel succeeds, and names what went wrong when it cannot:

    * a connection refused before any connection was made: nothing listens at the endpoint;
    * the kernel answered the CURVE handshake with an error (ZAP said no): it does not know
      this client's key (``cert``);
    * the kernel dropped the connection during the CURVE handshake :data:`DROPS_BEFORE_BLAME`
      times in a row: the client's idea of the kernel's public key (``server_cert``) is wrong
      (the kernel cannot open its HELLO).  One drop is not enough: a kernel over its peer cap
      also closes new connections at once during a flood, and a retry may then get in.  Over a
      connection without CURVE a drop is never blamed on anything (the client waits and retries).

    :meth:`on_event` returns a :class:`ConnectError` to raise, or None; ``done`` is True once
    the handshake succeeded (the monitor can then be switched off).
    """

    def __init__(self, endpoint: str, *, curve: bool, cert: str | None = None, server_cert: str | None = None) -> None:
        self.endpoint = endpoint
        self.curve = curve
        self.cert = cert
        self.server_cert = server_cert
        self.connected = False
        self.done = False
        self.drops = 0

    def on_event(self, event: int, value: int | None = None) -> ConnectError | None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.done = True
        elif event == zmq.EVENT_CONNECTED:
            self.connected = True
        elif event == zmq.EVENT_CONNECT_RETRIED and not self.connected:
            stale = " (its socket file is left from a kernel that is gone)" if self.endpoint.startswith("ipc://") else ""
            return ConnectError(f"nothing is listening at {self.endpoint}{stale}; {HOW_TO_START}")
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return ConnectError(
                f"the kernel at {self.endpoint} refused this client's key "
                f"({P.ENV_CERT}={self.cert or '(none)'}; ZAP status {value}): ask its operator to add the public "
                f"certificate to the kernel's key directory (`python -m kernel keys new NAME --role ROLE`)")
        elif event == zmq.EVENT_DISCONNECTED and self.connected and not self.done:
            self.drops += 1
            if self.curve and self.drops >= DROPS_BEFORE_BLAME:
                return ConnectError(
                    f"the kernel at {self.endpoint} dropped the CURVE handshake {self.drops} times: the server "
                    f"certificate {P.ENV_SERVER_CERT}={self.server_cert} is not this kernel's public key (use the "
                    "kernel.key of its key directory, or the one its operator gave you)")
        elif event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
            if self.curve:
                return ConnectError(
                    f"the kernel at {self.endpoint} dropped the CURVE handshake: the server certificate "
                    f"{P.ENV_SERVER_CERT}={self.server_cert} is not this kernel's public key (use the kernel.key it "
                    f"wrote to its runtime directory's certs/, or the one its operator gave you)")
            return ConnectError(f"the peer at {self.endpoint} closed the connection during the ZeroMQ handshake "
                                "(is it a reca kernel? a tcp:// kernel needs CURVE: set RECA_CERT and RECA_SERVER_CERT)")
        return None


def to_text(value: Any) -> Any:
    """``value`` with every bytes turned into hex text (what ``mmi.cancel`` / ``mmi.preempt``
    accept back as a token), so printed ids and tokens can be pasted into the next command."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {str(to_text(k)): to_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_text(v) for v in value]
    return value
