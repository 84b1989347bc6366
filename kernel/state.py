"""The router's records: requests, workers and services, and the error body every kernel error
is answered with.

Plain data shared by the router (which owns and mutates them), the admission policy (which reads
them through :class:`kernel.policy.View`) and the management calls.  Pure: no sockets, no clock.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from kernel import codec, errors
from kernel import protocol as P
from kernel.mdp import Form, Header
from kernel.fairq import FairQueue
from kernel.principal import LOCAL_OPERATOR, Principal

__all__ = ["Request", "Service", "ServiceStats", "Worker", "error_body"]


@dataclasses.dataclass(slots=True, eq=False)
class Request:
    token: bytes  # kernel-assigned; travels as MDP's client address and comes back in replies
    client: bytes  # ROUTER identity of the client
    form: Form
    service: "Service"
    body: list[bytes]  # frames forwarded to the worker
    rid: Any  # reca request id, None for opaque bodies
    reca: bool
    job: str | None
    priority: int
    received: float
    deadline: float | None = None  # absolute; None = no deadline
    worker: "Worker | None" = None
    dispatched: float = 0.0
    header: dict[str, Any] | None = None  # the reca header map as sent (None: opaque)
    done: bool = False
    principal: Principal = LOCAL_OPERATOR  # who sent it (verified by the kernel)
    queued: bool = False  # in its service's queue (counted in Service.queued)
    timed: bool = False  # has an entry in the router's deadline heap (counted in _deadlines_live)
    checked: Header | None = None  # the header checked against the schema (None: opaque)
    size: int = 0  # bytes of its body while queued (counted in the router's queued bytes)
    #: The principal a service acts for (header ``for``, checked by ``Router._acting_for``).
    acting_for: str | None = None
    #: Its FINAL is an error the kernel made at settlement (not kept for retries, kernel.dedup).
    kernel_error: bool = False


@dataclasses.dataclass(slots=True, eq=False)
class Worker:
    identity: bytes
    service: "Service"
    form: Form
    capacity: int
    expiry: float
    pid: int | None = None
    inflight: dict[bytes, Request] = dataclasses.field(default_factory=dict)
    principal: Principal = LOCAL_OPERATOR


class Service:
    """Per-service worker pool, request queue and statistics."""

    __slots__ = (
        "name",
        "workers",
        "ready",
        "queue",
        "queued",
        "by_client",
        "live",
        "requests",
        "finals",
        "errors",
        "partials",
        "latencies",
        "wait_since",
        "served",
        "text",
    )

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.text = name.decode(errors="replace")
        self.workers: dict[bytes, Worker] = {}
        # Invariant: one entry per free slot of a live worker, least recently used first.
        self.ready: collections.deque[Worker] = collections.deque()
        # Waiting requests: deficit round robin across principals, a priority heap within each
        # (kernel.fairq).  Entries whose request is done are skipped lazily and compacted when
        # they outnumber the live ones (Invariant: len(queue) <= 2 * queued + _SLACK).
        self.queue: FairQueue = FairQueue()
        self.queued = 0  # live (not done) requests in the queue
        self.by_client: dict[bytes, int] = {}  # client -> its live queued requests
        self.live = 0  # requests of this service not yet answered (queued or dispatched)
        self.requests = 0
        self.finals = 0
        self.errors = 0
        self.partials = 0
        self.latencies: collections.deque[float] = collections.deque(maxlen=P.LATENCY_WINDOW)
        # When the service last had no worker while requests waited (None: has workers or idle).
        self.wait_since: float | None = None
        # Whether a worker ever registered for it.  A service no worker ever served is forgotten
        # once its waiting requests are answered, so requests to made-up names do not pile up.
        self.served = False


@dataclasses.dataclass(frozen=True, slots=True)
class ServiceStats:
    name: str
    workers: int
    free_slots: int
    queued: int
    inflight: int
    requests: int
    finals: int
    errors: int
    partials: int
    p50_ms: float | None
    p99_ms: float | None


#: The header schema's check of a request id (str of at most MAX_NAME characters, or int).
_VALID_ID = next(f.check for f in P.HEADER if f.name == P.H_ID)


def error_body(
    exc: errors.RecaError, header: dict[str, Any] | None, spent: dict[str, Any] | None = None
) -> list[bytes]:
    """The body of a kernel error FINAL: a status map (a reca request's carries its id and what
    it spent)."""
    status: dict[str, Any] = {P.S_STATUS: P.STATUS_ERROR, P.S_ERROR: exc.to_wire()}
    if header is not None:
        status[P.H_VERSION] = P.VERSION
        rid = header.get(P.H_ID)  # echoed only if it is a valid id (a refused header may hold anything)
        status[P.S_ID] = rid if rid is None or _VALID_ID(rid) else None
        status[P.S_SPENT] = spent or {}
    return [codec.pack(status)]
