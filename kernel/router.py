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
  FIFO within a priority.  A request to a service that has no worker at all is answered
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
import struct
from typing import Any, Callable, Iterable

from kernel import codec
from kernel import errors
from kernel import protocol as P
from kernel.mmi import Management

log = logging.getLogger("reca.kernel")

Send = Callable[[list[bytes]], None]

_TOKEN = struct.Struct(">Q")
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


@dataclasses.dataclass(slots=True, eq=False)
class Worker:
    identity: bytes
    service: "Service"
    form: Form
    capacity: int
    expiry: float
    pid: int | None = None
    inflight: dict[bytes, Request] = dataclasses.field(default_factory=dict)


class Service:
    """Per-service worker pool, request queue and statistics."""

    __slots__ = (
        "name", "workers", "ready", "queue", "requests", "finals", "errors", "partials",
        "latencies", "wait_since",
    )

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.workers: dict[bytes, Worker] = {}
        # Invariant: one entry per free slot of a live worker, least recently used first.
        self.ready: collections.deque[Worker] = collections.deque()
        # Heap of (-priority, seq, Request); entries whose request is done are skipped lazily.
        self.queue: list[tuple[int, int, Request]] = []
        self.requests = 0
        self.finals = 0
        self.errors = 0
        self.partials = 0
        self.latencies: collections.deque[float] = collections.deque(maxlen=P.LATENCY_WINDOW)
        # When the service last had no worker while requests waited (None: has workers or idle).
        self.wait_since: float | None = None


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
        self._tokens = itertools.count(1)
        self._seq = itertools.count()
        self._deadlines: list[tuple[float, int, Request]] = []  # heap, lazily cleaned
        self._next_sweep = 0.0
        #: The latest time the router was given (on_message / tick): what stats() reports at.
        self.now = 0.0
        self.counters: collections.Counter[str] = collections.Counter()

    # -- entry points -----------------------------------------------------------------------------

    def on_message(self, frames: list[bytes], now: float) -> None:
        """Handle one message from the ROUTER socket (identity first)."""
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
        if header == P.MDPC:
            self._on_client(identity, form, frames, i + 1, now)
        elif header == P.MDPW:
            self._on_worker(identity, form, frames, i + 1, now)
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

    def _on_client(self, identity: bytes, form: Form, frames: list[bytes], i: int, now: float) -> None:
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
        if i + 2 > len(frames) or not frames[i + 1]:
            self.counters["bad_messages"] += 1
            self._reply_bad(identity, form, b"", "REQUEST without service name")
            return
        service_name = frames[i + 1]
        body = frames[i + 2:]
        header = codec.reca_header(body)
        reca = header is not None
        rid = header.get(P.H_ID) if header is not None else None
        if service_name.startswith(_MMI):
            self._mmi(identity, form, service_name, body, header, rid, now)
            return
        service = self.services.get(service_name)
        if service is None:
            service = self.services[service_name] = Service(service_name)
        service.requests += 1
        token = _TOKEN.pack(next(self._tokens))
        req = Request(token, identity, form, service, body, rid, reca, None, 0, now, header=header)
        if reca:
            try:
                self._parse_header(req, header)
            except errors.BadRequest as exc:
                self.counters["bad_requests"] += 1
                self._finish_error(req, exc, now, count=True)
                return
            refusal = self.admission.admit(self, req, now)
            if refusal is not None:
                self._finish_error(req, refusal, now, count=True)
                return
        if req.deadline is not None:
            heapq.heappush(self._deadlines, (req.deadline, next(self._seq), req))
        self.inflight[token] = req
        self._enqueue(req, now)

    @staticmethod
    def _parse_header(req: Request, header: dict) -> None:
        if header.get(P.H_VERSION) != P.VERSION:
            raise errors.BadRequest(f"unsupported protocol version {header.get(P.H_VERSION)!r}")
        rid = header.get(P.H_ID)
        if rid is not None and not isinstance(rid, (str, int)):
            raise errors.BadRequest("header field 'id' must be a string or an integer")
        job = header.get(P.H_JOB)
        if job is not None and not isinstance(job, str):
            raise errors.BadRequest("header field 'job' must be a string")
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
            if not isinstance(budget, dict) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                for k, v in budget.items()
            ):
                raise errors.BadRequest("header field 'budget' must map kinds to non-negative numbers")
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
        if len(service.queue) >= self.max_queue:
            self.inflight.pop(req.token, None)
            self._finish_error(req, errors.Overloaded(f"queue for {service.name.decode(errors='replace')} is full"), now)
            return
        heapq.heappush(service.queue, (-req.priority, next(self._seq), req))
        if not service.workers and service.wait_since is None:
            service.wait_since = now
        self._drain_queue(service, now)

    def _drain_queue(self, service: Service, now: float) -> None:
        queue = service.queue
        while queue and service.ready:
            _, _, req = heapq.heappop(queue)
            if req.done:
                continue
            self._dispatch(req, service.ready.popleft(), now)

    def _dispatch(self, req: Request, worker: Worker, now: float) -> None:
        req.worker = worker
        req.dispatched = now
        worker.inflight[req.token] = req
        body = req.body
        if req.reca:
            body = [self.admission.forward_header(self, req)] + body[1:]
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
        status = {P.S_STATUS: P.STATUS_ERROR, P.S_ERROR: exc.to_wire()}
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
        req.done = True
        self.inflight.pop(req.token, None)
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
        while queue and queue[0][2].done:
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
        body = [codec.pack({P.S_STATUS: P.STATUS_ERROR, P.S_ERROR: errors.BadRequest(message).to_wire()})]
        if form is Form.SPEC:
            msg = [identity, P.MDPC, P.ClientCmd.FINAL.value, service, *body]
        else:
            msg = [identity, _EMPTY, P.MDPC, P.MajortomoClientCmd.FINAL.value, *body]
        self._send(msg)

    # -- workers ----------------------------------------------------------------------------------

    def _on_worker(self, identity: bytes, form: Form, frames: list[bytes], i: int, now: float) -> None:
        if i >= len(frames):
            self._protocol_error(identity, form, now, "worker message without command")
            return
        cmd = frames[i]
        worker = self.workers.get(identity)
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
            if i + 1 >= len(frames) or not frames[i + 1] or frames[i + 1].startswith(_MMI):
                self._protocol_error(identity, form, now, "READY without a valid service name")
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
            self._register(identity, form, frames[i + 1], capacity, pid, now)
        elif cmd == P.WorkerCmd.DISCONNECT.value:
            if worker is not None:
                self._worker_gone(worker, now, "disconnected")
        else:
            self._protocol_error(identity, form, now, f"unknown worker command {cmd!r}")

    def _register(self, identity: bytes, form: Form, name: bytes, capacity: int, pid: Any, now: float) -> None:
        service = self.services.get(name)
        if service is None:
            service = self.services[name] = Service(name)
        worker = Worker(identity, service, form, capacity, now + self.heartbeat_interval * self.liveness,
                        pid if isinstance(pid, int) else None)
        self.workers[identity] = worker
        service.workers[identity] = worker
        service.wait_since = None
        service.ready.extend([worker] * capacity)
        self.counters["workers_registered"] += 1
        log.info("worker %s ready for %s (capacity %d)", identity.hex(), name.decode(errors="replace"), capacity)
        self._drain_queue(service, now)

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
        self.inflight.pop(token, None)
        req.done = True
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
            _, _, req = heapq.heappop(queue)
            if not req.done:
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
        if not service.workers and service.queue:
            service.wait_since = now

    def _sweep(self, now: float) -> None:
        for worker in list(self.workers.values()):
            if worker.expiry <= now:
                self._worker_gone(worker, now, "missed its liveness window")
                self._send_worker(worker.identity, worker.form, [P.WorkerCmd.DISCONNECT.value])
            elif self._send_worker(worker.identity, worker.form, [P.WorkerCmd.HEARTBEAT.value]) is False:
                self._worker_gone(worker, now, "unroutable")
        for service in self.services.values():
            if service.wait_since is not None and service.queue and not service.workers \
                    and now - service.wait_since >= self.unavailable_wait:
                for _, _, req in service.queue:
                    if not req.done:
                        self._finish_error(req, errors.Unavailable(
                            f"no worker for service {service.name.decode(errors='replace')!r}"), now)
                service.queue.clear()
                service.wait_since = None

    # -- MMI --------------------------------------------------------------------------------------

    def _mmi(self, identity: bytes, form: Form, name: bytes, body: list[bytes], header: dict | None,
             rid: Any, now: float) -> None:
        self.counters["mmi"] += 1
        service = Service(name)  # only for the reply's service frame
        req = Request(b"", identity, form, service, body, rid, header is not None, None, 0, now, header=header)
        if header is not None:
            try:
                arg = codec.unpack(body[1]) if len(body) > 1 else None
            except errors.BadRequest as exc:
                self._finish_error(req, exc, now, count=False)
                return
        else:
            arg = body[0] if body else None
        result = self.management.handle(self, name.decode(errors="replace"), arg, now, caller=identity)
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

    def service_stats(self) -> list[ServiceStats]:
        out = []
        for s in self.services.values():
            lat = sorted(s.latencies)
            p50 = _percentile(lat, 0.5)
            p99 = _percentile(lat, 0.99)
            out.append(ServiceStats(
                name=s.name.decode(errors="replace"),
                workers=len(s.workers),
                free_slots=len(s.ready),
                queued=sum(1 for _, _, r in s.queue if not r.done),
                inflight=sum(len(w.inflight) for w in s.workers.values()),
                requests=s.requests,
                finals=s.finals,
                errors=s.errors,
                partials=s.partials,
                p50_ms=None if p50 is None else p50 * 1000,
                p99_ms=None if p99 is None else p99 * 1000,
            ))
        return out

    def stats(self, now: float | None = None) -> dict:
        """Services, workers and counters, plus the admission's and ``extra_stats``' sections;
        ``now`` defaults to the latest time the router was given."""
        now = self.now if now is None else now
        out: dict[str, Any] = {
            "services": {s.name: dataclasses.asdict(s) for s in self.service_stats()},
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

    def requests_for_job(self, job: str) -> Iterable[Request]:
        return [r for r in self.inflight.values() if r.job == job and not r.done]


class Admission:
    """The policy hooks the router calls for reca requests.  This base class admits everything
    and charges nothing; kernel.admission.BudgetAdmission enforces budgets, gates and preemption.

    Hooks must not raise; they answer with values (a refusal is an exception *returned*).
    """

    def admit(self, router: Router, req: Request, now: float) -> errors.RecaError | None:
        return None

    def forward_header(self, router: Router, req: Request) -> bytes:
        return req.body[0]

    def on_partial(self, router: Router, req: Request, body: list[bytes], now: float) -> list[bytes]:
        return body

    def on_final(self, router: Router, req: Request, body: list[bytes], now: float) -> list[bytes]:
        """Add the kernel-measured wall time to the worker's status."""
        spent = None
        try:
            status = codec.unpack(body[0]) if body else None
        except errors.BadRequest:
            status = None
        if not isinstance(status, dict):
            exc = errors.ServiceError("worker sent a malformed status frame")
            self.on_done(router, req, now, None, exc)
            return router.error_body(req, exc)
        spent = status.get(P.S_SPENT)
        if not isinstance(spent, dict):
            spent = {}
        spent["wall_ms"] = (now - req.received) * 1000.0
        status[P.S_SPENT] = spent
        self.on_done(router, req, now, spent, None)
        return [codec.pack(status), *body[1:]]

    def on_deadline(self, router: Router, req: Request, now: float) -> None:
        router.fail_request(req, errors.DeadlineExceeded("request deadline passed"), now)

    def on_done(self, router: Router, req: Request, now: float, spent: dict | None,
                error: errors.RecaError | None) -> None:
        pass

    def claim_slot(self, router: Router, worker: Worker, now: float) -> bool:
        """A slot of ``worker`` just freed; True if the admission took it (to resume paused work)."""
        return False

    def tick(self, router: Router, now: float) -> None:
        """Time-driven policy (budget deadlines)."""

    def next_wakeup(self) -> float:
        return float("inf")

    def stats(self, now: float) -> dict:
        return {}
