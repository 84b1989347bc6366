"""The routing state machine of the microkernel: MDP/0.2 with reca's body extensions.

Pure logic, no sockets: :meth:`Router.on_message` takes one multipart message as the ROUTER
socket delivered it (identity first) and the current time, and emits the messages to send
through the ``send`` callable it was built with (identity first).  :meth:`Router.tick` runs the
time-driven rules.  The kernel's process shell (kernel.server) owns the sockets and the clock;
tests drive a Router directly with a fake ``now``.

Rules (docs/protocol.md is normative):

* Workers register with READY, one service each; a worker has ``capacity`` request slots (1 for
  plain MDP workers; a reca worker may declare more in its READY options).  Free slots are kept
  in least-recently-used order and requests go to the slot that has waited longest.
* A request to a service with no free slot waits in the service's queue, highest priority first,
  round-robin across clients within a priority (a client's k-th waiting request ranks after every
  other client's first k, so a flooding client delays another by at most one request per round),
  FIFO within a client.  A request to a service that has no worker at all is answered
  UNAVAILABLE after ``unavailable_wait`` unless a worker registers in time.
* Every request gets exactly one FINAL: its worker's, or the kernel's own error.  When a worker
  dies (DISCONNECT, a missed liveness window, an unroutable send, a protocol error) every request
  in flight on it is answered WORKER_DIED at once.  Replies that arrive for a request already
  answered are dropped and counted (``late_replies``).
* Any message from a worker counts as a heartbeat; the kernel heartbeats every worker once per
  interval and drops those silent for ``liveness`` intervals.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import heapq
import itertools
import logging
from os import urandom as _urandom
from typing import Any, Callable, Iterable

from kernel import codec
from kernel import errors
from kernel import protocol as P
from kernel.auth import CHILD_PREFIX, LOCAL_OPERATOR, Principal
from kernel.mmi import Caller, Management

log = logging.getLogger("reca.kernel")

Send = Callable[[list[bytes]], None]

#: Bytes of a request token: random (``os.urandom``), so no peer can guess another's request.
TOKEN_BYTES = 16
#: Revoked principals whose refusals are logged (the first message of each).
_MAX_REVOKED_LOGGED = 1024
_EMPTY = b""
_MMI = P.MMI_PREFIX.encode()


class Form(enum.Enum):
    """Which MDP dialect a peer speaks; replies use the peer's own form."""

    SPEC = "spec"  # 18/MDP as written: no leading empty frame
    MAJORTOMO = "majortomo"  # leading empty frame, worker command codes on the client side


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
    header: dict | None = None
    done: bool = False
    principal: Principal = LOCAL_OPERATOR  # who sent it (verified by the kernel)
    queued: bool = False  # in its service's queue (counted in Service.queued)
    timed: bool = False  # has an entry in the router's deadline heap (counted in _deadlines_live)
    #: The principal a service acts for (header ``for``, checked by :meth:`Router._acting_for`).
    acting_for: str | None = None


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
        "name", "workers", "ready", "queue", "queued", "by_client", "live", "requests", "finals", "errors",
        "partials", "latencies", "wait_since", "served",
    )

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.workers: dict[bytes, Worker] = {}
        # Invariant: one entry per free slot of a live worker, least recently used first.
        self.ready: collections.deque[Worker] = collections.deque()
        # Heap of (-priority, round, seq, Request): highest priority first, then round-robin across
        # clients (a client's k-th queued request has round k), then FIFO.  Entries whose request
        # is done are skipped lazily, and the heap is rebuilt when they outnumber the live ones
        # (Invariant: len(queue) <= 2 * queued + _SLACK after every change).
        self.queue: list[tuple[int, int, int, Request]] = []
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


#: Dead entries tolerated in a lazily cleaned heap beyond its live ones before it is rebuilt.
_SLACK = 64


def _compact(heap: list, live: int) -> list:
    """``heap`` without entries whose request is done, when those outnumber the live ones."""
    if len(heap) <= 2 * live + _SLACK:
        return heap
    kept = [e for e in heap if not e[-1].done]
    heapq.heapify(kept)
    return kept


def _percentile(sorted_samples: list[float], q: float) -> float | None:
    if not sorted_samples:
        return None
    idx = min(len(sorted_samples) - 1, max(0, int(round(q * (len(sorted_samples) - 1)))))
    return sorted_samples[idx]


class Router:
    """MDP/0.2 routing with liveness, LRU dispatch, priorities, MMI and exactly-one-FINAL.

    ``send`` receives each outgoing multipart message (identity first) and returns False when it
    could not be routed (the peer is gone); the router then treats that peer as dead.
    """

    def __init__(
        self,
        send: Callable[[list[bytes]], bool | None],
        *,
        heartbeat_interval: float = P.HEARTBEAT_INTERVAL,
        liveness: int = P.LIVENESS,
        unavailable_wait: float = P.UNAVAILABLE_WAIT,
        max_queue: int = P.MAX_QUEUE,
        service_expiry: float = P.SERVICE_IDLE_EXPIRY,
        max_workerless: int = P.MAX_WORKERLESS_SERVICES,
        max_queued_bytes: int = P.MAX_QUEUED_BYTES,
        admission: "Admission | None" = None,
        management: Management | None = None,
        extra_stats: Callable[[], dict] | None = None,
        publish: Callable[[bytes, dict], None] | None = None,
    ) -> None:
        self._send = send
        #: Publishes a control message ``(topic, map)`` on the kernel's PUB socket.
        self.publish = publish or (lambda topic, msg: None)
        self.heartbeat_interval = heartbeat_interval
        self.liveness = liveness
        self.unavailable_wait = unavailable_wait
        self.max_queue = max_queue
        self.admission = admission or Admission()
        #: Answers ``mmi.*`` calls, one handler per operation of the protocol table.
        self.management = management or Management()
        self.extra_stats = extra_stats
        self.services: dict[bytes, Service] = {}
        self.workers: dict[bytes, Worker] = {}
        self.inflight: dict[bytes, Request] = {}  # token -> request, queued or dispatched
        self._seq = itertools.count()
        self._deadlines: list[tuple[float, int, Request]] = []  # heap, lazily cleaned, compacted
        self._deadlines_live = 0  # requests not done with an entry in _deadlines
        #: Services with no worker and nothing live, by when they became so (oldest first);
        #: forgotten after ``service_expiry`` seconds.
        self._idle: dict[bytes, float] = {}
        #: Services whose requests wait for a first worker (``wait_since`` set).
        self._waiting: dict[bytes, Service] = {}
        self._served = 0  # services with at least one worker
        self.service_expiry = service_expiry
        #: Services without a worker the router keeps state for; a request for a new name past
        #: it is answered UNAVAILABLE at once, with no state kept.
        self.max_workerless = max_workerless
        #: Bytes of request bodies waiting in queues (a body is dropped once dispatched).
        self.queued_bytes = 0
        self.max_queued_bytes = max_queued_bytes
        #: client -> (bytes it has queued, its queued requests oldest first), for fair eviction.
        self._holders: dict[bytes, list] = {}
        self._next_sweep = 0.0
        #: The latest time the router was given (on_message / tick): what stats() reports at.
        self.now = 0.0
        self.counters: collections.Counter[str] = collections.Counter()
        self._revoked_logged: set[str] = set()

    # -- entry points -----------------------------------------------------------------------------

    def on_message(self, frames: list[bytes], now: float, principal: Principal = LOCAL_OPERATOR) -> None:
        """Handle one message from the ROUTER socket (identity first) sent by ``principal`` (the
        kernel-verified peer; ``principal.revoked``: its key is no longer known)."""
        self.now = now
        if len(frames) < 2:
            self.counters["bad_messages"] += 1
            return
        if len(frames) > P.MAX_FRAMES:
            self.counters["bad_messages"] += 1
            self._reply_bad(frames[0], Form.SPEC, b"", f"more than {P.MAX_FRAMES} frames")
            return
        identity = frames[0]
        form = Form.SPEC
        i = 1
        if frames[1] == _EMPTY:
            form = Form.MAJORTOMO
            i = 2
        if i >= len(frames):
            self.counters["bad_messages"] += 1
            self._reply_bad(identity, form, b"", "empty message")
            return
        header = frames[i]
        if principal.revoked:
            self._on_revoked(identity, form, frames, i, principal, now)
        elif header == P.MDPC:
            self._on_client(identity, form, frames, i + 1, now, principal)
        elif header == P.MDPW:
            self._on_worker(identity, form, frames, i + 1, now, principal)
        else:
            self.counters["bad_messages"] += 1
            log.warning("unknown protocol header %r from %r", header[:16], identity)
            self._reply_bad(identity, form, b"", "unknown protocol header; expected MDPC02 or MDPW02")

    def tick(self, now: float) -> None:
        """Time-driven rules: request deadlines, liveness, heartbeats, unavailable waits."""
        self.now = now
        dl = self._deadlines
        while dl and dl[0][0] <= now:
            _, _, req = heapq.heappop(dl)
            if not req.done:
                self.admission.on_deadline(self, req, now)
        self.admission.tick(self, now)
        if now >= self._next_sweep:
            self._next_sweep = now + self.heartbeat_interval / P.SWEEPS_PER_INTERVAL
            self._sweep(now)

    def next_wakeup(self) -> float:
        """The earliest time :meth:`tick` has something to do."""
        dl = self._deadlines
        while dl and dl[0][2].done:
            heapq.heappop(dl)
        wake = min(self._next_sweep, self.admission.next_wakeup())
        if dl:
            return min(dl[0][0], wake)
        return wake

    # -- clients ----------------------------------------------------------------------------------

    def _on_revoked(self, identity: bytes, form: Form, frames: list[bytes], i: int, principal: Principal,
                    now: float) -> None:
        """A message on a connection whose key was revoked: workers are dropped, clients get
        ``forbidden``; nothing else happens.  The first such message per name is logged."""
        self.counters["revoked_messages"] += 1
        if principal.name not in self._revoked_logged and len(self._revoked_logged) < _MAX_REVOKED_LOGGED:
            self._revoked_logged.add(principal.name)
            self.admission.on_forbidden(self, principal, "revoked", {}, now)
        worker = self.workers.get(identity)
        if worker is not None or frames[i] == P.MDPW:
            if worker is not None:
                self._worker_gone(worker, now, "its key was revoked")
            self._send_worker(identity, form, [P.WorkerCmd.DISCONNECT.value])
            return
        # A client: answered forbidden in its own form, with its request id (a reca client
        # matches replies by id).
        body = frames[i + 3:]
        header = codec.reca_header(body)
        rid = header.get(P.H_ID) if header is not None else None
        service = Service(frames[i + 2] if len(frames) > i + 2 else b"")
        req = Request(b"", identity, form, service, body, rid, header is not None, None, 0, now, header=header,
                      principal=principal)
        self._finish_error(req, errors.Forbidden("your key is not (or no longer) known to the kernel"), now,
                           count=False)

    def revoke(self, known: Callable[[str], bool], now: float) -> None:
        """Drop every worker whose principal is no longer ``known`` (its key was removed)."""
        for worker in list(self.workers.values()):
            if worker.principal is not LOCAL_OPERATOR and not known(worker.principal.name):
                self._worker_gone(worker, now, f"key of {worker.principal.name} revoked")
                self._send_worker(worker.identity, worker.form, [P.WorkerCmd.DISCONNECT.value])

    def _on_client(self, identity: bytes, form: Form, frames: list[bytes], i: int, now: float,
                   principal: Principal = LOCAL_OPERATOR) -> None:
        if i + 1 > len(frames):
            self.counters["bad_messages"] += 1
            self._reply_bad(identity, form, b"", "client message without command")
            return
        cmd = frames[i]
        expected = P.ClientCmd.REQUEST.value if form is Form.SPEC else P.MajortomoClientCmd.REQUEST.value
        if cmd != expected:
            self.counters["bad_messages"] += 1
            self._reply_bad(identity, form, b"", f"unexpected client command {cmd!r}")
            return
        if i + 2 > len(frames) or not frames[i + 1] or len(frames[i + 1]) > P.MAX_NAME:
            self.counters["bad_messages"] += 1
            self._reply_bad(identity, form, b"", f"REQUEST without a service name of 1..{P.MAX_NAME} bytes")
            return
        service_name = frames[i + 1]
        body = frames[i + 2:]
        header = codec.reca_header(body)
        reca = header is not None
        rid = header.get(P.H_ID) if header is not None else None
        if service_name.startswith(_MMI):
            self._mmi(identity, form, service_name, body, header, rid, now, principal)
            return
        service = self.services.get(service_name)
        if service is None:
            if len(self.services) - self._served >= self.max_workerless:
                self.counters["workerless_refused"] += 1
                req = Request(b"", identity, form, Service(service_name), body, rid, reca, None, 0, now,
                              header=header, principal=principal)
                self._finish_error(req, errors.Unavailable(
                    f"no worker for service {service_name.decode(errors='replace')!r}"), now, count=False)
                return
            service = self.services[service_name] = Service(service_name)
        self._idle.pop(service_name, None)
        service.requests += 1
        token = _urandom(TOKEN_BYTES)
        req = Request(token, identity, form, service, body, rid, reca, None, 0, now, header=header,
                      principal=principal)
        service.live += 1
        if header is not None:
            try:
                self._parse_header(req, header)
                if P.H_FOR in header:
                    req.acting_for = self._acting_for(principal, header[P.H_FOR])
            except (errors.BadRequest, errors.Forbidden) as exc:
                self.counters["bad_requests"] += 1
                self._finish_error(req, exc, now, count=True)
                return
        # Opaque MDP bodies too: they run in the caller's default job (its wall time counts).
        refusal = self.admission.admit(self, req, now)
        if refusal is not None:
            self._finish_error(req, refusal, now, count=True)
            return
        if req.deadline is not None:
            heapq.heappush(self._deadlines, (req.deadline, next(self._seq), req))
            req.timed = True
            self._deadlines_live += 1
        self.inflight[token] = req
        self._enqueue(req, now)

    def _acting_for(self, principal: Principal, who: Any) -> str:
        """A service acting for the caller of a request it is serving (header ``for``): allowed
        only while a worker of the same principal has a request of ``who`` in flight (or for
        itself), so a service key acts for no one who is not calling it at that moment."""
        if isinstance(who, str) and who == principal.name:
            return who
        if isinstance(who, str) and principal.services:
            for w in self.workers.values():
                if w.principal == principal and any(r.principal.name == who for r in w.inflight.values()):
                    return who
        raise errors.Forbidden("header 'for' names a principal whose request this caller is not serving")

    @staticmethod
    def _parse_header(req: Request, header: dict) -> None:
        if header.get(P.H_VERSION) != P.VERSION:
            raise errors.BadRequest(f"unsupported protocol version {header.get(P.H_VERSION)!r}")
        rid = header.get(P.H_ID)
        if rid is not None and not isinstance(rid, (str, int)) or isinstance(rid, str) and len(rid) > P.MAX_NAME:
            raise errors.BadRequest(f"header field 'id' must be an integer or a string of at most {P.MAX_NAME} characters")
        job = header.get(P.H_JOB)
        if job is not None and (not isinstance(job, str) or len(job) > P.MAX_NAME):
            raise errors.BadRequest(f"header field 'job' must be a string of at most {P.MAX_NAME} characters")
        req.job = job
        prio = header.get(P.H_PRIORITY, P.DEFAULT_PRIORITY)
        if not isinstance(prio, int) or isinstance(prio, bool) or not P.PRIORITY_MIN <= prio <= P.PRIORITY_MAX:
            raise errors.BadRequest(f"header field 'priority' must be an integer in [{P.PRIORITY_MIN}, {P.PRIORITY_MAX}]")
        req.priority = prio
        deadline = header.get(P.H_DEADLINE)
        if deadline is not None:
            if not isinstance(deadline, (int, float)) or isinstance(deadline, bool) or not 0 < deadline < P.MAX_DEADLINE_MS:
                raise errors.BadRequest("header field 'deadline' must be a positive number of milliseconds")
            req.deadline = req.received + deadline / 1000.0
        budget = header.get(P.H_BUDGET)
        if budget is not None:
            if not isinstance(budget, dict) or len(budget) > P.MAX_KINDS or not all(
                isinstance(k, str) and len(k) <= P.MAX_NAME and isinstance(v, (int, float)) and not isinstance(v, bool)
                and v >= 0 for k, v in budget.items()
            ):
                raise errors.BadRequest(f"header field 'budget' must map at most {P.MAX_KINDS} kinds to non-negative numbers")
        for key in (P.H_IDEM, P.H_TXN):
            value = header.get(key)
            if value is not None and not isinstance(value, str):
                raise errors.BadRequest(f"header field {key!r} must be a string")

    def _enqueue(self, req: Request, now: float) -> None:
        service = req.service
        ready = service.ready
        if ready and not service.queue:
            self._dispatch(req, ready.popleft(), now)
            return
        size = sum(map(len, req.body))
        if service.queued >= self.max_queue or not self._make_room(req.client, size, now):
            self._finish_error(req, errors.Overloaded(f"queue for {service.name.decode(errors='replace')} is full"), now)
            return
        holder = self._holders.get(req.client)
        if holder is None:
            holder = self._holders[req.client] = [0, collections.deque()]
        holder[0] += size
        holder[1].append(req)
        turn = service.by_client.get(req.client, 0)
        service.by_client[req.client] = turn + 1
        heapq.heappush(service.queue, (-req.priority, turn, next(self._seq), req))
        req.queued = True
        service.queued += 1
        self.queued_bytes += size
        if not service.workers and service.wait_since is None:
            service.wait_since = now
            self._waiting[service.name] = service
        self._drain_queue(service, now)

    def _drain_queue(self, service: Service, now: float) -> None:
        queue = service.queue
        while queue and service.ready:
            req = heapq.heappop(queue)[-1]
            if req.done:
                continue
            self._dequeued(req)
            self._dispatch(req, service.ready.popleft(), now)

    def _make_room(self, client: bytes, size: int, now: float) -> bool:
        """Whether ``size`` more bytes from ``client`` fit in the queues; when they do not, the
        client holding the most queued bytes loses its newest requests (answered OVERLOADED)
        while it holds more than ``client`` would: one flooding client, or the backlog of many
        gone ones, cannot keep every other client's requests out (longest-queue drop)."""
        while self.queued_bytes + size > self.max_queued_bytes:
            mine = self._holders.get(client, (0,))[0] + size
            victim = max(self._holders, key=lambda c: self._holders[c][0], default=None)
            if victim is None or victim == client or self._holders[victim][0] <= mine:
                return False
            newest = self._holders[victim][1][-1]
            self.counters["queue_evictions"] += 1
            self._finish_error(newest, errors.Overloaded(
                "evicted from the queue: this client held the largest share of the kernel's queues"), now)
        return True

    def _dequeued(self, req: Request) -> None:
        req.queued = False
        holder = self._holders.get(req.client)
        if holder is not None:
            holder[0] -= sum(map(len, req.body))
            reqs = holder[1]
            if reqs and reqs[0] is req:
                reqs.popleft()
            else:
                reqs.remove(req)
            if not reqs:
                del self._holders[req.client]
        service = req.service
        service.queued -= 1
        left = service.by_client.get(req.client, 1) - 1
        if left > 0:
            service.by_client[req.client] = left
        else:
            service.by_client.pop(req.client, None)
        self.queued_bytes -= sum(map(len, req.body))

    def _retire(self, req: Request, now: float) -> None:
        """``req`` has its FINAL: drop every reference the router keeps (its entries in lazily
        cleaned heaps are compacted away), and note its service idle if nothing is left there."""
        req.done = True
        self.inflight.pop(req.token, None)
        service = req.service
        if req.queued:
            self._dequeued(req)
            service.queue = _compact(service.queue, service.queued)
        req.body = []  # the payload is freed now, whatever still points at the request
        if req.timed:
            req.timed = False
            self._deadlines_live -= 1
            self._deadlines = _compact(self._deadlines, self._deadlines_live)
        if req.token and service.live > 0:
            service.live -= 1
            if not service.live and not service.workers and self.services.get(service.name) is service:
                self._idle[service.name] = now

    def _dispatch(self, req: Request, worker: Worker, now: float) -> None:
        req.worker = worker
        req.dispatched = now
        worker.inflight[req.token] = req
        body = req.body
        if req.reca:
            body = [self.admission.forward_header(self, req)] + body[1:]
        req.body = []  # sent once; the router never needs it again
        if worker.form is Form.SPEC:
            msg = [worker.identity, P.MDPW, P.WorkerCmd.REQUEST.value, req.token, _EMPTY, *body]
        else:
            msg = [worker.identity, _EMPTY, P.MDPW, P.WorkerCmd.REQUEST.value, req.token, _EMPTY, *body]
        if self._send(msg) is False:
            self._worker_gone(worker, now, "unroutable")

    # -- replies to clients -----------------------------------------------------------------------

    def _to_client(self, req: Request, final: bool, body: list[bytes]) -> None:
        if req.form is Form.SPEC:
            cmd = P.ClientCmd.FINAL.value if final else P.ClientCmd.PARTIAL.value
            msg = [req.client, P.MDPC, cmd, req.service.name, *body]
        else:
            cmd = P.MajortomoClientCmd.FINAL.value if final else P.MajortomoClientCmd.PARTIAL.value
            msg = [req.client, _EMPTY, P.MDPC, cmd, *body]
        if self._send(msg) is False:
            self.counters["unroutable_replies"] += 1

    def error_body(self, req: Request, exc: errors.RecaError, spent: dict | None = None) -> list[bytes]:
        status: dict[str, Any] = {P.S_STATUS: P.STATUS_ERROR, P.S_ERROR: exc.to_wire()}
        if req.reca:
            status[P.H_VERSION] = P.VERSION
            status[P.S_ID] = req.rid
            status[P.S_SPENT] = spent or {}
        return [codec.pack(status)]

    def _finish_error(self, req: Request, exc: errors.RecaError, now: float, *, count: bool = True,
                      spent: dict | None = None) -> None:
        """Answer ``req`` with a kernel error as its one FINAL and forget it."""
        if req.done:
            return
        self._retire(req, now)
        if req.worker is not None:
            req.worker.inflight.pop(req.token, None)
        if count:
            req.service.errors += 1
            self.counters[f"error.{exc.code}"] += 1
        self.admission.on_done(self, req, now, None, exc)
        self._to_client(req, True, self.error_body(req, exc, spent))

    def top_queued_priority(self, service: Service) -> int | None:
        """The priority of the first request waiting in ``service``'s queue (None: none waits)."""
        queue = service.queue
        while queue and queue[0][-1].done:
            heapq.heappop(queue)
        return -queue[0][0] if queue else None

    def has_worker(self, name: bytes) -> bool:
        """Whether a live worker serves the service ``name``."""
        service = self.services.get(name)
        return service is not None and bool(service.workers)

    def fail_request(self, req: Request, exc: errors.RecaError, now: float, spent: dict | None = None) -> None:
        """Answer an in-flight request with ``exc`` now; its worker slot is freed for new work
        only when the worker's own late FINAL arrives (the worker is still busy with it)."""
        worker = req.worker
        self._finish_error(req, exc, now, spent=spent)
        if worker is not None:
            # Keep the slot occupied by a tombstone until the worker answers: it is still busy.
            worker.inflight[req.token] = req

    def _reply_bad(self, identity: bytes, form: Form, service: bytes, message: str) -> None:
        self._reply_error(identity, form, service, errors.BadRequest(message))

    def reply_bad(self, identity: bytes, message: str) -> None:
        """Answer a message the server refused before routing it (too large, too many frames)."""
        self._reply_bad(identity, Form.SPEC, b"", message)

    def refuse_peer(self, frames: list[bytes], message: str) -> None:
        """Answer ``overloaded`` to a message from a connection the server refuses (over the peer
        cap): a client's request gets a FINAL in its own form (with its reca id), a worker a
        DISCONNECT."""
        identity = frames[0]
        form, i = (Form.MAJORTOMO, 2) if len(frames) > 1 and frames[1] == _EMPTY else (Form.SPEC, 1)
        if i < len(frames) and frames[i] == P.MDPW:
            self._send_worker(identity, form, [P.WorkerCmd.DISCONNECT.value])
            return
        header = codec.reca_header(frames[i + 3:])
        self._reply_error(identity, form, frames[i + 2] if i + 2 < len(frames) else b"",
                          errors.Overloaded(message), header)

    def _reply_error(self, identity: bytes, form: Form, service: bytes, exc: errors.RecaError,
                     header: dict | None = None) -> None:
        status: dict[str, Any] = {P.S_STATUS: P.STATUS_ERROR, P.S_ERROR: exc.to_wire()}
        if header is not None:
            status.update({P.H_VERSION: P.VERSION, P.S_ID: header.get(P.H_ID), P.S_SPENT: {}})
        body = [codec.pack(status)]
        if form is Form.SPEC:
            msg = [identity, P.MDPC, P.ClientCmd.FINAL.value, service, *body]
        else:
            msg = [identity, _EMPTY, P.MDPC, P.MajortomoClientCmd.FINAL.value, *body]
        self._send(msg)

    # -- workers ----------------------------------------------------------------------------------

    def _on_worker(self, identity: bytes, form: Form, frames: list[bytes], i: int, now: float,
                   principal: Principal = LOCAL_OPERATOR) -> None:
        if i >= len(frames):
            self._protocol_error(identity, form, now, "worker message without command")
            return
        cmd = frames[i]
        worker = self.workers.get(identity)
        if worker is not None and worker.principal != principal:
            # Another principal on a routing id a worker had: it is not that worker.
            self._protocol_error(identity, form, now, f"{principal.name} spoke as {worker.principal.name}'s worker")
            return
        if worker is not None:
            worker.expiry = now + self.heartbeat_interval * self.liveness
        if cmd == P.WorkerCmd.FINAL.value or cmd == P.WorkerCmd.PARTIAL.value:
            if worker is None or i + 2 >= len(frames) or frames[i + 2] != _EMPTY:
                self._protocol_error(identity, form, now, "reply from an unregistered worker or without envelope")
                return
            self._on_reply(worker, cmd == P.WorkerCmd.FINAL.value, frames[i + 1], frames[i + 3:], now)
        elif cmd == P.WorkerCmd.HEARTBEAT.value:
            if worker is None:
                self._protocol_error(identity, form, now, "heartbeat from an unregistered worker")
        elif cmd == P.WorkerCmd.READY.value:
            if worker is not None:
                self._protocol_error(identity, form, now, "READY twice")
                return
            if i + 1 >= len(frames) or not frames[i + 1] or frames[i + 1].startswith(_MMI) \
                    or len(frames[i + 1]) > P.MAX_NAME:
                self._protocol_error(identity, form, now, "READY without a valid service name")
                return
            name = frames[i + 1].decode(errors="replace")
            if not principal.may_serve(name):
                # Registration is an authority: only the service's own principals (and operators)
                # may take its requests.  The peer gets nothing but DISCONNECT.
                self.counters["forbidden_ready"] += 1
                self.admission.on_forbidden(self, principal, "ready", {"service": name}, now)
                self._send_worker(identity, form, [P.WorkerCmd.DISCONNECT.value])
                return
            capacity, pid = P.DEFAULT_CAPACITY, None
            if i + 2 < len(frames):
                try:
                    opts = codec.unpack(frames[i + 2])
                    capacity = int(opts.get(P.R_CAPACITY, P.DEFAULT_CAPACITY))
                    pid = opts.get(P.R_PID)
                    if not 1 <= capacity <= P.MAX_CAPACITY:
                        raise ValueError("capacity out of range")
                except Exception:
                    self._protocol_error(identity, form, now, "malformed READY options")
                    return
            self._register(identity, form, frames[i + 1], capacity, pid, now, principal)
        elif cmd == P.WorkerCmd.DISCONNECT.value:
            if worker is not None:
                self._worker_gone(worker, now, "disconnected")
        else:
            self._protocol_error(identity, form, now, f"unknown worker command {cmd!r}")

    def _register(self, identity: bytes, form: Form, name: bytes, capacity: int, pid: Any, now: float,
                  principal: Principal = LOCAL_OPERATOR) -> None:
        service = self.services.get(name)
        if service is None:
            service = self.services[name] = Service(name)
        self._idle.pop(name, None)
        worker = Worker(identity, service, form, capacity, now + self.heartbeat_interval * self.liveness,
                        pid if isinstance(pid, int) and self._pid_of(principal, pid) else None, principal=principal)
        self.workers[identity] = worker
        if not service.workers:
            self._served += 1
        service.workers[identity] = worker
        service.wait_since = None
        service.served = True
        service.ready.extend([worker] * capacity)
        self.counters["workers_registered"] += 1
        log.info("worker %s ready for %s (capacity %d)", identity.hex(), name.decode(errors="replace"), capacity)
        self._drain_queue(service, now)

    def _pid_of(self, principal: Principal, pid: int) -> bool:
        """Whether a READY's declared ``pid`` is the peer's own, so the kernel may measure its CPU
        time: trusted from operators (every ``ipc://`` peer), checked with the supervisor for a
        supervised child's principal (``child:NAME``); any other peer's pid is ignored (it may be
        a process of another host, or one the peer wants measured instead of itself)."""
        if principal.operator:
            return True
        procs, prefix = self.management.procs, CHILD_PREFIX
        return procs is not None and principal.name.startswith(prefix) and procs.owns_pid(principal.name[len(prefix):], pid)

    def _on_reply(self, worker: Worker, final: bool, token: bytes, body: list[bytes], now: float) -> None:
        req = worker.inflight.get(token)
        if req is None or req.done:
            if req is not None and final:
                # The kernel already answered (deadline, budget, cancel); the slot is free now.
                del worker.inflight[token]
                self.free_slot(worker, now)
            self.counters["late_replies"] += 1
            return
        service = req.service
        if not final:
            service.partials += 1
            if req.reca:
                body = self.admission.on_partial(self, req, body, now)
                if req.done:  # the admission ended it (budget): its FINAL is already sent
                    return
            self._to_client(req, False, body)
            return
        del worker.inflight[token]
        self._retire(req, now)
        service.finals += 1
        service.latencies.append(now - req.received)
        if req.reca:
            body = self.admission.on_final(self, req, body, now)
        else:
            self.admission.on_done(self, req, now, None, None)
        self._to_client(req, True, body)
        self.free_slot(worker, now)

    def free_slot(self, worker: Worker, now: float) -> None:
        if self.workers.get(worker.identity) is not worker:
            return
        if self.admission.claim_slot(self, worker, now):
            return
        service = worker.service
        queue = service.queue
        while queue:
            req = heapq.heappop(queue)[-1]
            if not req.done:
                self._dequeued(req)
                self._dispatch(req, worker, now)
                return
        service.ready.append(worker)

    def _protocol_error(self, identity: bytes, form: Form, now: float, why: str) -> None:
        self.counters["protocol_errors"] += 1
        log.warning("worker protocol error from %s: %s", identity.hex(), why)
        worker = self.workers.get(identity)
        if worker is not None:
            self._worker_gone(worker, now, why)
        self._send_worker(identity, form, [P.WorkerCmd.DISCONNECT.value])

    def _send_worker(self, identity: bytes, form: Form, tail: list[bytes]) -> bool | None:
        if form is Form.SPEC:
            return self._send([identity, P.MDPW, *tail])
        return self._send([identity, _EMPTY, P.MDPW, *tail])

    def _worker_gone(self, worker: Worker, now: float, why: str) -> None:
        """Forget ``worker``; every request in flight on it is answered WORKER_DIED at once."""
        if self.workers.get(worker.identity) is not worker:
            return
        del self.workers[worker.identity]
        self.admission.worker_gone(worker.identity)
        service = worker.service
        service.workers.pop(worker.identity, None)
        if worker in service.ready:
            service.ready = collections.deque(w for w in service.ready if w is not worker)
        self.counters["workers_lost"] += 1
        log.warning("worker %s of %s gone (%s); failing %d request(s)", worker.identity.hex(),
                    service.name.decode(errors="replace"), why, len(worker.inflight))
        for req in list(worker.inflight.values()):
            if not req.done:
                self._finish_error(req, errors.WorkerDied(f"worker died: {why}", service=service.name.decode(errors="replace")), now)
        worker.inflight.clear()
        if not service.workers:
            self._served -= 1
        if not service.workers and service.queued:
            service.wait_since = now
            self._waiting[service.name] = service
        elif not service.workers and not service.live:
            self._idle[service.name] = now

    def _sweep(self, now: float) -> None:
        for worker in list(self.workers.values()):
            if worker.expiry <= now:
                self._worker_gone(worker, now, "missed its liveness window")
                self._send_worker(worker.identity, worker.form, [P.WorkerCmd.DISCONNECT.value])
            elif self._send_worker(worker.identity, worker.form, [P.WorkerCmd.HEARTBEAT.value]) is False:
                self._worker_gone(worker, now, "unroutable")
        waiting = self._waiting
        for service in list(waiting.values()):
            if service.wait_since is None or service.workers or not service.queued:
                del waiting[service.name]
                service.wait_since = None
            elif now - service.wait_since >= self.unavailable_wait:
                del waiting[service.name]
                service.wait_since = None
                for *_, req in list(service.queue):
                    if not req.done:
                        self._finish_error(req, errors.Unavailable(
                            f"no worker for service {service.name.decode(errors='replace')!r}"), now)
                service.queue.clear()
                # a name no worker ever registered for is forgotten at once (review: made-up names)
                if not service.served and not service.workers and not service.live:
                    del self.services[service.name]
                    self._idle.pop(service.name, None)
        idle = self._idle
        while idle:
            name, since = next(iter(idle.items()))
            if since > now - self.service_expiry:
                break
            del idle[name]
            gone = self.services.get(name)
            if gone is not None and not gone.workers and not gone.live:
                del self.services[name]
                self.counters["services_expired"] += 1

    # -- MMI --------------------------------------------------------------------------------------

    def _mmi(self, identity: bytes, form: Form, name: bytes, body: list[bytes], header: dict | None,
             rid: Any, now: float, principal: Principal = LOCAL_OPERATOR) -> None:
        self.counters["mmi"] += 1
        service = Service(name)  # only for the reply's service frame
        req = Request(b"", identity, form, service, body, rid, header is not None, None, 0, now, header=header,
                      principal=principal)
        if header is not None:
            try:
                arg = codec.unpack(body[1]) if len(body) > 1 else None
            except errors.BadRequest as exc:
                self._finish_error(req, exc, now, count=False)
                return
        else:
            arg = body[0] if body else None
        result = self.management.handle(self, name.decode(errors="replace"), arg, now,
                                        caller=Caller(identity, principal))
        if result is None:
            result = P.MMI_NOT_IMPLEMENTED
        if isinstance(result, errors.RecaError):
            self._finish_error(req, result, now, count=False)
            return
        if header is not None:
            if isinstance(result, bytes) and name != P.MMI_STATS.encode():
                result = result.decode()
            status = {P.H_VERSION: P.VERSION, P.S_ID: rid, P.S_STATUS: P.STATUS_OK, P.S_SPENT: {}}
            self._to_client(req, True, [codec.pack(status), codec.pack(result)])
        else:
            self._to_client(req, True, [result if isinstance(result, bytes) else codec.pack(result)])

    # -- statistics -------------------------------------------------------------------------------

    def service_stats(self, services: Iterable[Service] | None = None) -> list[ServiceStats]:
        out = []
        for s in self.services.values() if services is None else services:
            lat = sorted(s.latencies)
            p50 = _percentile(lat, 0.5)
            p99 = _percentile(lat, 0.99)
            out.append(ServiceStats(
                name=s.name.decode(errors="replace"),
                workers=len(s.workers),
                free_slots=len(s.ready),
                queued=s.queued,
                inflight=sum(len(w.inflight) for w in s.workers.values()),
                requests=s.requests,
                finals=s.finals,
                errors=s.errors,
                partials=s.partials,
                p50_ms=None if p50 is None else p50 * 1000,
                p99_ms=None if p99 is None else p99 * 1000,
            ))
        return out

    def stats(self, now: float | None = None, query: dict | None = None) -> dict:
        """``mmi.stats``: a summary and one page of services (sorted by name, ``STATS_PAGE`` per
        page) plus the admission's and ``extra_stats``' sections; ``{"page": n}`` asks for page n,
        ``{"service": name}`` for one service.  Its cost is one sort of the service names plus the
        page's own figures.  ``now`` defaults to the latest time the router was given."""
        now = self.now if now is None else now
        query = query or {}
        page = query.get("page", 0)
        page = page if isinstance(page, int) and not isinstance(page, bool) and page >= 0 else 0
        wanted = query.get("service")
        if isinstance(wanted, str):
            chosen = [s for s in (self.services.get(wanted.encode()),) if s is not None]
        else:
            names = sorted(self.services)[page * P.STATS_PAGE:(page + 1) * P.STATS_PAGE]
            chosen = [self.services[n] for n in names]
        out: dict[str, Any] = {
            "services": {s.name: dataclasses.asdict(s) for s in self.service_stats(chosen)},
            "summary": {"services": len(self.services), "services_with_workers": self._served,
                        "workers": len(self.workers), "inflight": len(self.inflight),
                        "queued_bytes": self.queued_bytes,
                        "page": page, "pages": -(-len(self.services) // P.STATS_PAGE)},
            "counters": dict(self.counters),
            "workers": [
                {"service": w.service.name.decode(errors="replace"), "pid": w.pid, "inflight": len(w.inflight),
                 "capacity": w.capacity, "form": w.form.value}
                for w in self.workers.values()
            ],
        }
        out.update(self.admission.stats(now))
        if self.extra_stats is not None:
            out.update(self.extra_stats())
        return out

    def serving(self, principal: Principal, job: str) -> bool:
        """Whether a worker of ``principal`` is serving a request of ``job`` now."""
        return any(r.job == job and not r.done for w in self.workers.values() if w.principal == principal
                   for r in w.inflight.values())

    def requests_for_job(self, job: str) -> Iterable[Request]:
        return [r for r in self.inflight.values() if r.job == job and not r.done]



def forwarded_header(req: Request, **kernel_fields: Any) -> bytes:
    """The reca header a worker receives: the client's, with the fields only the kernel sets
    replaced -- ``principal`` (the caller's verified name) always, ``granted`` only when given."""
    header = dict(req.header or {})
    header.pop(P.H_GRANTED, None)
    header.pop(P.H_FOR, None)
    header[P.H_PRINCIPAL] = req.acting_for or req.principal.name
    header.update(kernel_fields)
    return codec.pack(header)

class Admission:
    """The policy hooks the router calls for reca requests.  This base class admits everything
    and charges nothing; kernel.admission.BudgetAdmission enforces budgets, gates and preemption.

    Hooks must not raise; they answer with values (a refusal is an exception *returned*).
    """

    def admit(self, router: Router, req: Request, now: float) -> errors.RecaError | None:
        return None

    def forward_header(self, router: Router, req: Request) -> bytes:
        return forwarded_header(req)

    def on_partial(self, router: Router, req: Request, body: list[bytes], now: float) -> list[bytes]:
        return body

    def on_final(self, router: Router, req: Request, body: list[bytes], now: float) -> list[bytes]:
        """The FINAL's body for the client: the worker's status, settled (:meth:`settle`), with the
        kernel-measured wall time added; a malformed status or a settlement's error instead
        answers the request with that error."""
        try:
            status = codec.unpack(body[0]) if body else None
        except errors.BadRequest:
            status = None
        if not isinstance(status, dict):
            exc = errors.ServiceError("worker sent a malformed status frame")
            self.on_done(router, req, now, None, exc)
            return router.error_body(req, exc)
        over = self.settle(router, req, status, now)
        spent = status.get(P.S_SPENT)
        if not isinstance(spent, dict):
            spent = {}
        spent["wall_ms"] = (now - req.received) * 1000.0
        status[P.S_SPENT] = spent
        self.on_done(router, req, now, spent, over)
        if over is not None:
            return router.error_body(req, over, spent)
        return [codec.pack(status), *body[1:]]

    def settle(self, router: Router, req: Request, status: dict, now: float) -> errors.RecaError | None:
        """Account a FINAL's status (it may be amended in place); an error to answer with instead."""
        return None

    def on_deadline(self, router: Router, req: Request, now: float) -> None:
        router.fail_request(req, errors.DeadlineExceeded("request deadline passed"), now)

    def on_done(self, router: Router, req: Request, now: float, spent: dict | None,
                error: errors.RecaError | None) -> None:
        pass

    def claim_slot(self, router: Router, worker: Worker, now: float) -> bool:
        """A slot of ``worker`` just freed; True if the admission took it (to resume paused work)."""
        return False

    def flush_log(self) -> None:
        """Hand the decisions taken so far to the operating system (the server calls it after
        every batch of messages)."""

    def tick(self, router: Router, now: float) -> None:
        """Time-driven policy (budget deadlines)."""

    def next_wakeup(self) -> float:
        return float("inf")

    def on_forbidden(self, router: Router, principal: Principal, op: str, inputs: dict, now: float) -> None:
        """A call or registration ``principal`` lacks the authority for was refused (logged)."""

    def worker_gone(self, identity: bytes) -> None:
        """The worker with ``identity`` left the router's tables."""

    def stats(self, now: float) -> dict:
        return {}
