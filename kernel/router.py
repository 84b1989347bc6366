"""The routing state machine of the microkernel: MDP/0.2 with reca's body extensions.

Events in, effects out, no sockets: :meth:`Router.on_message` takes one multipart message as the
ROUTER socket delivered it (identity first) and the current time; kernel.mdp parses it once into a
typed event, and the router handles the event (one handler per event type, ``Router._on``),
emitting the messages to send through the ``send`` callable it was built with (identity first).
The admission policy (kernel.policy) is asked at each step of a request's life and answers with
effects the router applies (``Router._apply``); every control order goes through
:meth:`Router.order`, which publishes and records it.  :meth:`Router.tick` runs the time-driven
rules.  The clock, CPU times, pid ownership and random tokens come through the host port
(kernel.host).  The kernel's process shell (kernel.server) owns the sockets and the clock; tests
drive a Router directly with a fake ``now``.

Rules (docs/protocol.md is normative):

* Workers register with READY, one service each; a worker has ``capacity`` request slots (1 for
  plain MDP workers; a reca worker may declare more in its READY options).  Free slots are kept
  in least-recently-used order and requests go to the slot that has waited longest.
* A request to a service with no free slot waits in the service's queue (kernel.fairq): slots
  are shared across principals by deficit round robin, weighted by ``[enforce] weights``, so no
  principal's priority overrules another's; within a principal, highest priority first,
  round-robin across its clients within a priority (a client's k-th waiting request ranks after
  every other client's first k), FIFO within a client.  A request to a service that has no worker at all is answered
  UNAVAILABLE after ``unavailable_wait`` unless a worker registers in time.
* Every request gets exactly one FINAL: its worker's, or the kernel's own error.  When a worker
  dies (DISCONNECT, a missed liveness window, an unroutable send, a protocol error) every request
  in flight on it is answered WORKER_DIED at once.  Replies that arrive for a request already
  answered are dropped and counted (``late_replies``).
* Any message from a worker counts as a heartbeat; the kernel heartbeats every worker once per
  interval and drops those silent for ``liveness`` intervals.  A worker dropped so while it held
  requests (answered or not) and whose process the kernel knows (its READY ``pid``) is *hung*:
  busy and silent, it may be burning CPU nobody bills and will not stop on an order.  It is
  listed in :attr:`Router.hung` for the escalation ladder (kernel/ladder.py), which kills its
  process and lets the supervisor restart it.
* A worker the escalation ladder froze is *parked* (:meth:`Router.park`): its free slots take no
  new request until the tombstone that got it frozen ends (its late FINAL) or the worker goes.

Invariants (:meth:`Router.check_invariants` checks them):

* every request in ``inflight`` is not done, and is either queued in its service (counted in
  ``Service.queued``) or in flight on exactly the worker it names;
* a service's ``ready`` holds each of its live workers at most ``capacity - len(inflight)`` times;
* ``queued_bytes`` is the sum of the sizes of the queued requests, and equals the holders' total;
* ``Service.live`` counts the service's requests in ``inflight``.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import logging
from typing import TYPE_CHECKING, Any, Callable, Final, Iterable

from kernel import codec, errors, mdp
from kernel import protocol as P
from kernel.dedup import Attempt, Dedup, digest
from kernel.mdp import Form
from kernel.mmi import Caller, Management
from kernel.policy import Admission, Effects, Fail, Lend, Order
from kernel.principal import LOCAL_OPERATOR, Principal
from kernel.state import Request, Service, ServiceStats, Worker, error_body

if TYPE_CHECKING:
    from kernel.host import Host

__all__ = ["Admission", "Form", "Hung", "Request", "Router", "Service", "ServiceStats", "Worker"]

#: Hung workers (:attr:`Router.hung`) kept for the ladder at most: it takes them every poll (2 ms).
MAX_HUNG: Final = 1024


@dataclasses.dataclass(frozen=True, slots=True)
class Hung:
    """A worker dropped for a missed liveness window while it held requests: its process
    (``pid``, verified at READY), its identity, its service, the tokens it held (already answered
    ``worker_died``), when it was dropped and the child its principal is."""

    pid: int
    identity: bytes
    service: str
    tokens: tuple[bytes, ...]
    at: float
    #: The supervised child the worker's principal is (``child:NAME``), else None.
    child: str | None = None


log = logging.getLogger("reca.kernel")

#: Bytes of a request token: random (the host's ``token``), so no peer can guess another's request.
TOKEN_BYTES: Final = 16
#: Revoked principals whose refusals are logged (the first message of each).
_MAX_REVOKED_LOGGED: Final = 1024
_DISCONNECT: Final = P.WorkerCmd.DISCONNECT
_HEARTBEAT: Final = P.WorkerCmd.HEARTBEAT


#: Dead entries tolerated in a lazily cleaned heap beyond its live ones before it is rebuilt.
_SLACK: Final = 64


def _compact(heap: list[Any], live: int) -> list[Any]:
    """``heap`` without entries whose request is done, when those outnumber the live ones."""
    if len(heap) <= 2 * live + _SLACK:
        return heap
    kept = [e for e in heap if not e[-1].done]
    heapq.heapify(kept)
    return kept


#: Management operations that change nothing: a retry of one just runs again (every other one
#: that carries an idempotency key is deduplicated like a service request, docs/protocol.md).
_MMI_READ_ONLY: Final = frozenset({P.MMI_SERVICE, P.MMI_STATS, P.MMI_JOB_STATS})


def _with_rid(body: list[bytes], rid: Any) -> list[bytes]:
    """``body`` (a reca reply: status frame first) under the request id ``rid``."""
    if not body:
        return body
    try:
        status = codec.unpack(body[0])
    except errors.BadRequest:
        return body
    if not isinstance(status, dict) or status.get(P.S_ID) == rid:
        return body
    return [codec.pack({**status, P.S_ID: rid}), *body[1:]]


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
        admission: Admission | None = None,
        management: Management | None = None,
        extra_stats: Callable[[], dict[str, Any]] | None = None,
        publish: Callable[[bytes, dict[str, Any]], None] | None = None,
        host: "Host | None" = None,
    ) -> None:
        self._send = send
        #: Publishes a control message ``(topic, map)`` on the kernel's PUB socket.
        self.publish: Callable[[bytes, dict[str, Any]], None] = publish or (lambda topic, msg: None)
        if host is None:
            from kernel.host import SystemHost  # the real machine unless one is injected

            host = SystemHost()
        self.host: Host = host
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
        self._holders: dict[bytes, list[Any]] = {}
        self._next_sweep = 0.0
        self._last_sweep: float | None = None  # when the liveness sweep last ran
        #: The latest time the router was given (on_message / tick): what stats() reports at.
        self.now = 0.0
        self.counters: collections.Counter[str] = collections.Counter()
        #: Workers dropped for a missed liveness window while they held requests, oldest first
        #: (:class:`Hung`): the escalation ladder takes them (``popleft``) and kills their
        #: processes.  Bounded: at most :data:`MAX_HUNG` wait (an older one is dropped and counted).
        self.hung: collections.deque[Hung] = collections.deque()
        #: Workers whose free slots take no new request (:meth:`park`): the ladder froze them for
        #: a request they hold past its answer, until that tombstone ends or the worker goes.
        self.parked: set[bytes] = set()
        #: Wakes a sleeping escalation ladder where its work is born: a tombstone
        #: (:meth:`fail_request`), a hung worker (:meth:`_sweep`), a ``mem_bytes`` grant (the
        #: admission's ``admit``).  Installed by the ladder (kernel/ladder.py ``Wake``); None: it polls.
        self.ladder_wake: Callable[[], None] | None = None
        self._revoked_logged: set[str] = set()
        #: One handler per event type of kernel.mdp (the MDP command table's other half).
        self._on: dict[type, Callable[[Any, float, Principal], None]] = {
            mdp.Request: self._on_request,
            mdp.Ready: self._on_ready,
            mdp.Reply: self._on_reply_event,
            mdp.Heartbeat: self._on_heartbeat,
            mdp.Disconnect: self._on_disconnect,
            mdp.BadClient: self._on_bad_client,
            mdp.BadWorker: self._on_bad_worker,
            mdp.Unreadable: self._on_unreadable,
        }
        #: One row per effect type of kernel.policy: how the router applies it.
        self._apply: dict[type, Callable[[Any, float], None]] = {
            Fail: self._apply_fail,
            Lend: self._apply_lend,
            Order: self._apply_order,
        }

    # -- entry points -----------------------------------------------------------------------------

    def on_message(self, frames: list[bytes], now: float, principal: Principal = LOCAL_OPERATOR) -> None:
        """Handle one message from the ROUTER socket (identity first) sent by ``principal`` (the
        kernel-verified peer; ``principal.revoked``: its key is no longer known)."""
        event = mdp.parse(frames)  # then as handle(event, now, principal), one call less per message
        self.now = now
        if principal is not LOCAL_OPERATOR and principal.revoked and type(event) is not mdp.Unreadable:
            self._on_revoked(event, principal, now)
            return
        # the two events of every request called directly (compiled: a native call, not a bound
        # method looked up in the table and called generically); the rest through the table
        if type(event) is mdp.Reply:
            self._on_reply_event(event, now, principal)
        elif type(event) is mdp.Request:
            self._on_request(event, now, principal)
        else:
            self._on[type(event)](event, now, principal)

    def handle(self, event: mdp.Event, now: float, principal: Principal = LOCAL_OPERATOR) -> None:
        """Handle one parsed event from ``principal``."""
        self.now = now
        # (the local operator, every ipc:// peer, is never revoked: no property call for it)
        if principal is not LOCAL_OPERATOR and principal.revoked and type(event) is not mdp.Unreadable:
            self._on_revoked(event, principal, now)
            return
        if type(event) is mdp.Reply:  # (as in on_message)
            self._on_reply_event(event, now, principal)
        elif type(event) is mdp.Request:
            self._on_request(event, now, principal)
        else:
            self._on[type(event)](event, now, principal)

    def tick(self, now: float) -> None:
        """Time-driven rules: request deadlines, liveness, heartbeats, unavailable waits."""
        self.now = now
        dl = self._deadlines
        while dl and dl[0][0] <= now:
            _, _, req = heapq.heappop(dl)
            if not req.done:
                self.apply(self.admission.on_deadline(self, req, now), now)
        self.apply(self.admission.tick(self, now), now)
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

    # -- effects ----------------------------------------------------------------------------------

    def apply(self, effects: Effects, now: float) -> None:
        """Apply a policy's effects, in order (one row of ``_apply`` per effect type)."""
        for effect in effects:
            self._apply[type(effect)](effect, now)

    def _apply_fail(self, effect: Fail, now: float) -> None:
        if not effect.request.done:
            self.fail_request(effect.request, effect.error, now, spent=effect.spent)

    def _apply_lend(self, effect: Lend, now: float) -> None:
        self.free_slot(effect.worker, now)

    def order(self, order: Order, now: float) -> None:
        """The one path of every control order: published on its topic and recorded.  An order
        naming a job is never broadcast on ``ctl/all`` (every service key may read it): it goes
        to the services that hold requests of that job, none if none does."""
        if order.service == P.CTL_ALL and P.C_JOB in order.message:
            job = order.message[P.C_JOB]
            for name in sorted({r.service.text for r in self.inflight.values() if r.job == job}):
                self.publish(P.control_topic(name, order.op), order.message)
        else:
            self.publish(order.topic, order.message)
        self.admission.record(order.op, now, order.record(), {"ok": True})

    def _apply_order(self, effect: Order, now: float) -> None:
        self.order(effect, now)


    # -- malformed messages and revoked peers -----------------------------------------------------

    def _on_unreadable(self, ev: mdp.Unreadable, now: float, principal: Principal) -> None:
        self.counters["bad_messages"] += 1
        if ev.why.startswith("unknown protocol header"):
            log.warning("unknown protocol header from %r", ev.identity)
        if ev.answer:
            self._reply_bad(ev.identity, ev.form, b"", ev.why)

    def _on_bad_client(self, ev: mdp.BadClient, now: float, principal: Principal) -> None:
        self.counters["bad_messages"] += 1
        self._reply_bad(ev.identity, ev.form, b"", ev.why)

    def _on_bad_worker(self, ev: mdp.BadWorker, now: float, principal: Principal) -> None:
        if self._known_worker(ev, now, principal) is not False:
            self._protocol_error(ev.identity, ev.form, now, ev.why)

    def _on_revoked(self, ev: mdp.Event, principal: Principal, now: float) -> None:
        """A message on a connection whose key was revoked: workers are dropped, clients get
        ``forbidden``; nothing else happens.  The first such message per name is logged."""
        self.counters["revoked_messages"] += 1
        if principal.name not in self._revoked_logged and len(self._revoked_logged) < _MAX_REVOKED_LOGGED:
            self._revoked_logged.add(principal.name)
            self.admission.on_forbidden(principal, "revoked", {}, now)
        worker = self.workers.get(ev.identity)
        if worker is not None or isinstance(ev, mdp.WORKER_EVENTS):
            if worker is not None:
                self._worker_gone(worker, now, "its key was revoked")
            self._send(mdp.to_worker(ev.identity, ev.form, _DISCONNECT))
            return
        # A client: answered forbidden in its own form, with its request id (a reca client
        # matches replies by id).
        assert isinstance(ev, (mdp.Request, mdp.BadClient))
        self._reply_error(ev.identity, ev.form, ev.service,
                          errors.Forbidden("your key is not (or no longer) known to the kernel"), ev.header)

    def revoke(self, known: Callable[[str], bool], now: float) -> None:
        """Drop every worker whose principal is no longer ``known`` (its key was removed)."""
        for worker in list(self.workers.values()):
            if worker.principal is not LOCAL_OPERATOR and not known(worker.principal.name):
                self._worker_gone(worker, now, f"key of {worker.principal.name} revoked")
                self._send(mdp.to_worker(worker.identity, worker.form, _DISCONNECT))

    # -- clients ----------------------------------------------------------------------------------

    def _acting_for(self, principal: Principal, who: str) -> str:
        """A service acting for the caller of a request it is serving (header ``for``): allowed
        only while a worker of the same principal has a request of ``who`` in flight (or for
        itself), so a service key acts for no one who is not calling it at that moment."""
        if who == principal.name:
            return who
        if principal.services:
            for w in self.workers.values():
                if w.principal == principal and any(r.principal.name == who for r in w.inflight.values()):
                    return who
        raise errors.Forbidden("header 'for' names a principal whose request this caller is not serving")

    def _on_request(self, ev: mdp.Request, now: float, principal: Principal) -> None:
        name = ev.service
        if name.startswith(mdp.MMI):  # (ev.mmi, without the property call)
            self._mmi_once(ev, now, principal)
            return
        header = ev.header
        service = self.services.get(name)
        if service is None:
            if len(self.services) - self._served >= self.max_workerless:
                self.counters["workerless_refused"] += 1
                self._reply_error(ev.identity, ev.form, name, errors.Unavailable(
                    f"no worker for service {name.decode(errors='replace')!r}"), header)
                return
            service = self.services[name] = Service(name)
        if self._idle:
            self._idle.pop(name, None)
        checked = ev.checked
        dedup = self.admission.dedup
        key = None
        if dedup is not None and checked is not None and checked.idem is not None:
            # keyed by the principal acted for (header ``for``): a service's retry on behalf of
            # alice meets alice's key, not the service's own; a refused ``for`` is answered below
            who: str | None = principal.name
            if checked.on_behalf is not None:
                try:
                    who = self._acting_for(principal, checked.on_behalf)
                except errors.Forbidden:
                    who = None
            if who is not None:
                key = (who, checked.idem)
                if self._deduplicated(dedup, ev, key, now, digest(name, ev.body[1:], checked)):
                    return
        service.requests += 1
        token = self.host.token(TOKEN_BYTES)
        req = Request(token, ev.identity, ev.form, service, ev.body, ev.rid,  # (a failed header's id only if valid)
                      header is not None, None, P.DEFAULT_PRIORITY, now, header=header, principal=principal,
                      checked=checked)
        service.live += 1
        if header is not None:
            if checked is None:
                self.counters["bad_requests"] += 1
                self._finish_error(req, ev.bad or errors.BadRequest("malformed header"), now, count=True)
                return
            req.job = checked.job
            req.priority = checked.priority
            if checked.on_behalf is not None:
                try:
                    req.acting_for = self._acting_for(principal, checked.on_behalf)
                except errors.Forbidden as exc:
                    self.counters["bad_requests"] += 1
                    self._finish_error(req, exc, now, count=True)
                    return
            if checked.deadline is not None:
                req.deadline = now + checked.deadline / 1000.0
        # Opaque MDP bodies too: they run in the caller's default job (its wall time counts).
        refusal, effects = self.admission.admit(self, req, now)
        if refusal is not None:
            self._finish_error(req, refusal, now, count=True)
            self.apply(effects, now)
            return
        if req.deadline is not None:
            heapq.heappush(self._deadlines, (req.deadline, next(self._seq), req))
            req.timed = True
            self._deadlines_live += 1
        self.inflight[token] = req
        if dedup is not None and key is not None:
            dedup.start(key, token, digest(name, ev.body[1:], checked))
        ready = service.ready
        if ready and not service.queue and not self.parked:  # (_enqueue's first case, one call less)
            self._dispatch(req, ready.popleft(), now)
        else:
            self._enqueue(req, now)
        if effects:
            self.apply(effects, now)

    # -- exactly-once: retries of one idempotency key (kernel.dedup) -----------------------------

    def _deduplicated(self, dedup: Dedup, ev: mdp.Request, key: tuple[str, str], now: float,
                      dig: bytes | None = None) -> bool:
        """Answer a request whose ``(principal, idem)`` the kernel has seen: attach it to the
        attempt in flight, or send the stored FINAL; ``idem_conflict`` naming what differs when the
        key was sent with another service, body, job, budget, txn or ``for`` (``dig``).  False: a new request (it runs)."""
        kind, what = dedup.seen(key, now, dig)
        if kind == "run":
            return False
        if kind == "conflict":
            self.counters["dedup_conflicts"] += 1
            self._reply_error(ev.identity, ev.form, ev.service, errors.IdemConflict(
                f"this idempotency key was first sent with another {', '.join(what)} (a retry must resend "
                "the same request; use a fresh key per request)", differs=what), ev.header)
            return True
        if kind == "replay":
            dedup.replayed()
            self.counters["dedup_replayed"] += 1
            body = what.body if what.body is not None else error_body(errors.AlreadyDone(
                "this request (same idempotency key) already ran; its answer was too large to keep"), ev.header)
            self._send(mdp.to_client(ev.identity, ev.form, ev.service, True, _with_rid(body, ev.rid)))
            return True
        if not dedup.attach(what, Attempt(ev.identity, ev.form, ev.rid)):
            self._reply_error(ev.identity, ev.form, ev.service, errors.Overloaded(
                f"more than {dedup.max_attached} retries wait on this request"), ev.header)
            return True
        self.counters["dedup_attached"] += 1
        return True

    def _to_attempts(self, req: Request, final: bool, body: list[bytes], now: float, keep: bool) -> None:
        """Send what ``req``'s client got to the retries attached to it; at its FINAL, forget its
        key, storing the FINAL for later retries when ``keep`` (its worker made it)."""
        dedup = self.admission.dedup
        if dedup is None or req.token not in dedup.key_of:
            return
        if final:
            key = dedup.key_of[req.token]
            attempts, stored = dedup.finish(req.token, now, body if keep else None, req.service.name)
            if stored is not None:
                self.admission.record("final", now, Dedup.record(key, req.service.name, stored), {"ok": True})
        else:
            attempts = dedup.attempts(req.token)
        for a in attempts:
            if self._send(mdp.to_client(a.client, a.form, req.service.name, final, _with_rid(body, a.rid))) is False:
                self.counters["unroutable_replies"] += 1

    def _enqueue(self, req: Request, now: float) -> None:
        service = req.service
        ready = service.ready
        if ready and not service.queue:
            worker = ready.popleft() if not self.parked else self._take_ready(service)
            if worker is not None:
                self._dispatch(req, worker, now)
                return
        size = req.size = sum(map(len, req.body))
        if service.queued >= self.max_queue or not self._make_room(req.client, size, now):
            self._finish_error(req, errors.Overloaded(f"queue for {service.text} is full"), now)
            return
        holder = self._holders.get(req.client)
        if holder is None:
            holder = self._holders[req.client] = [0, collections.deque()]
        holder[0] += size
        holder[1].append(req)
        turn = service.by_client.get(req.client, 0)
        service.by_client[req.client] = turn + 1
        queue = service.queue
        if queue.weights is not self.admission.weights:
            queue.weights = self.admission.weights  # [enforce] weights, shared by every service
        # DRR across principals (the one acted for, for a service's request on a caller's behalf);
        # priority, then round-robin across the principal's clients, then FIFO within it; an
        # operator's priority above the default crosses principals (kernel/fairq.py, express)
        queue.push(req.acting_for or req.principal.name, req.priority, turn, req,
                   crosses=req.principal.operator and not req.acting_for and req.priority > P.DEFAULT_PRIORITY)
        req.queued = True
        service.queued += 1
        self.queued_bytes += size
        effects = self.admission.on_queued(req, now)  # its budgets' clocks stop until dispatch
        if effects:
            self.apply(effects, now)  # a paused request's slot given back to the queue
        if not service.workers and service.wait_since is None:
            service.wait_since = now
            self._waiting[service.name] = service
        self._drain_queue(service, now)

    def _drain_queue(self, service: Service, now: float) -> None:
        queue = service.queue
        ready = service.ready
        while queue and ready:
            worker = ready.popleft() if not self.parked else self._take_ready(service)
            if worker is None:  # every free slot is a parked worker's
                break
            req = queue.pop()
            if req is None:
                ready.appendleft(worker)
                break
            self._dequeued(req)
            self._dispatch(req, worker, now)

    def _take_ready(self, service: Service) -> Worker | None:
        """The least recently used free slot of a worker not parked (None: none), taken; the
        parked workers' slots it passes keep their places.  (Only while some worker is parked.)"""
        ready = service.ready
        skipped = []
        found = None
        while ready:
            w = ready.popleft()
            if w.identity in self.parked:
                skipped.append(w)
            else:
                found = w
                break
        ready.extendleft(reversed(skipped))  # parked slots keep their place
        return found

    def park(self, identity: bytes, now: float) -> None:
        """Give no new request to worker ``identity``'s free slots: the escalation ladder froze it
        for a request it holds past the kernel's answer (a tombstone that burns).  A request given
        to it now would stop with it -- and, being another principal's, would spare it from the
        kill (kernel/ladder.py).  Lifted when it holds no tombstone any more (:meth:`_on_reply`)
        or when it goes."""
        worker = self.workers.get(identity)
        if worker is not None and any(r.done for r in worker.inflight.values()):  # (holds one)
            self.parked.add(identity)
            self.counters["workers_parked"] += 1

    def _unpark(self, worker: Worker, now: float) -> None:
        self.parked.discard(worker.identity)
        self._drain_queue(worker.service, now)

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
        """``req`` leaves its queue: for a slot (not done: its budgets' clocks start now, a moved
        deadline is re-armed), or answered while waiting (done)."""
        req.queued = False
        if not req.done and self.admission.on_dispatched(req, self.now) and req.deadline is not None:
            heapq.heappush(self._deadlines, (req.deadline, next(self._seq), req))
            if not req.timed:
                req.timed = True
                self._deadlines_live += 1
        holder = self._holders.get(req.client)
        if holder is not None:
            holder[0] -= req.size
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
        self.queued_bytes -= req.size

    def _retire(self, req: Request, now: float) -> None:
        """``req`` has its FINAL: drop every reference the router keeps (its entries in lazily
        cleaned heaps are compacted away), and note its service idle if nothing is left there."""
        req.done = True
        self.inflight.pop(req.token, None)
        service = req.service
        if req.queued:
            self._dequeued(req)
            service.queue.compact(service.queued, _SLACK)
        req.body = []  # the payload is freed now, whatever still points at the request
        if req.timed:
            req.timed = False
            self._deadlines_live -= 1
            self._deadlines = _compact(self._deadlines, self._deadlines_live)
        if req.token and service.live > 0:
            service.live -= 1
            if not service.live and not service.workers and self.services.get(service.name) is service:
                self._mark_idle(service.name, now)

    def _dispatch(self, req: Request, worker: Worker, now: float) -> None:
        req.worker = worker
        req.dispatched = now
        worker.inflight[req.token] = req
        body = req.body
        if req.reca:
            body = [self.admission.forward_header(req, now), *body[1:]]
        req.body = []  # sent once; the router never needs it again
        if self._send(mdp.request_to_worker(worker.identity, worker.form, req.token, body)) is False:
            self._worker_gone(worker, now, "unroutable")

    # -- replies to clients -----------------------------------------------------------------------

    def _to_client(self, req: Request, final: bool, body: list[bytes]) -> None:
        if self._send(mdp.to_client(req.client, req.form, req.service.name, final, body)) is False:
            self.counters["unroutable_replies"] += 1

    def _finish_error(self, req: Request, exc: errors.RecaError, now: float, *, count: bool = True,
                      spent: dict[str, Any] | None = None) -> None:
        """Answer ``req`` with a kernel error as its one FINAL and forget it."""
        if req.done:
            return
        self._retire(req, now)
        if req.worker is not None:
            req.worker.inflight.pop(req.token, None)
        if count:
            req.service.errors += 1
            self.counters[f"error.{exc.code}"] += 1
        measured = self.admission.on_done(req, now, None, exc)
        if measured:  # what the kernel measured the request spent (its worker's CPU until now)
            spent = {**(spent or {}), **measured}
        body = error_body(exc, req.header, spent)
        self._to_client(req, True, body)
        self._to_attempts(req, True, body, now, keep=False)  # a kernel error: a retry runs again
        if self.admission.later:  # its charge exhausted a job: the job's other requests are cancelled now
            self.apply(self.admission.take_later(self, now), now)

    def top_queued_priority(self, service: Service, principal: str | None = None) -> int | None:
        """The priority of the first request waiting in ``service``'s queue, or of ``principal``'s
        requests there (None: none waits)."""
        return service.queue.top_priority(principal)

    def has_worker(self, name: bytes) -> bool:
        """Whether a live worker serves the service ``name``."""
        service = self.services.get(name)
        return service is not None and bool(service.workers)

    def fail_request(self, req: Request, exc: errors.RecaError, now: float, spent: dict[str, Any] | None = None) -> None:
        """Answer an in-flight request with ``exc`` now; its worker slot is freed for new work
        only when the worker's own late FINAL arrives (the worker is still busy with it)."""
        worker = req.worker
        self._finish_error(req, exc, now, spent=spent)
        if worker is not None:
            # Keep the slot occupied by a tombstone until the worker answers: it is still busy.
            worker.inflight[req.token] = req
            if self.ladder_wake is not None:  # the escalation ladder watches tombstones
                self.ladder_wake()

    def held_by(self, client: bytes) -> int:
        """Bytes of ``client``'s request bodies waiting in the queues (the per-peer inbound
        budget's measure, kernel.quotas.PeerBudgets)."""
        holder = self._holders.get(client)
        return holder[0] if holder is not None else 0

    def drop_client(self, client: bytes, exc: errors.RecaError, now: float) -> int:
        """``client``'s connection is being dropped (past a per-peer byte budget): every request
        it has in the kernel is answered ``exc`` (its one FINAL), a dispatched one cancelled on
        its worker too.  Returns how many.  O(requests in flight), only at a drop."""
        mine = [r for r in self.inflight.values() if r.client == client]
        for req in mine:
            if req.worker is not None:
                self.order(Order.to_request(P.ControlOp.CANCEL, req, **{P.C_CODE: exc.code,
                                                                        P.C_REASON: exc.message}), now)
                self.fail_request(req, exc, now)
            else:
                self._finish_error(req, exc, now)
        return len(mine)

    def _reply_bad(self, identity: bytes, form: Form, service: bytes, message: str) -> None:
        self._reply_error(identity, form, service, errors.BadRequest(message))

    def reply_bad(self, identity: bytes, message: str) -> None:
        """Answer a message the server refused before routing it (too large, too many frames)."""
        self._reply_bad(identity, Form.SPEC, b"", message)

    def refuse_peer(self, frames: list[bytes], message: str) -> None:
        """Answer ``overloaded`` to a message from a connection the server refuses (over the peer
        cap): a client's request gets a FINAL in its own form (with its reca id), a worker a
        DISCONNECT."""
        ev = mdp.parse(frames)
        if isinstance(ev, mdp.WORKER_EVENTS):
            self._send(mdp.to_worker(ev.identity, ev.form, _DISCONNECT))
            return
        service = ev.service if isinstance(ev, (mdp.Request, mdp.BadClient)) else b""
        header = ev.header if isinstance(ev, (mdp.Request, mdp.BadClient)) else None
        self._reply_error(ev.identity, ev.form, service, errors.Overloaded(message), header)

    def _reply_error(self, identity: bytes, form: Form, service: bytes, exc: errors.RecaError,
                     header: dict[str, Any] | None = None) -> None:
        self._send(mdp.to_client(identity, form, service, True, error_body(exc, header)))

    # -- workers ----------------------------------------------------------------------------------

    def _known_worker(self, ev: Any, now: float, principal: Principal) -> Worker | None | bool:
        """The registered worker a worker event comes from (None: none), its liveness renewed;
        False when another principal speaks on its routing id (it is dropped)."""
        worker = self.workers.get(ev.identity)
        if worker is None:
            return None
        if worker.principal is not principal and worker.principal != principal:
            # Another principal on a routing id a worker had: it is not that worker.
            self._protocol_error(ev.identity, ev.form, now, f"{principal.name} spoke as {worker.principal.name}'s worker")
            return False
        worker.expiry = now + self.heartbeat_interval * self.liveness
        return worker

    def _on_reply_event(self, ev: mdp.Reply, now: float, principal: Principal) -> None:
        known = self.workers.get(ev.identity)
        if known is not None and known.principal is principal:  # (_known_worker's common case)
            known.expiry = now + self.heartbeat_interval * self.liveness
            self._on_reply(known, ev.final, ev.token, ev.body, now)
            return
        worker = self._known_worker(ev, now, principal)
        if worker is False:
            return
        if worker is None or worker is True:
            self._protocol_error(ev.identity, ev.form, now, "reply from an unregistered worker or without envelope")
            return
        self._on_reply(worker, ev.final, ev.token, ev.body, now)

    def _on_heartbeat(self, ev: mdp.Heartbeat, now: float, principal: Principal) -> None:
        if self._known_worker(ev, now, principal) is None:
            self._protocol_error(ev.identity, ev.form, now, "heartbeat from an unregistered worker")

    def _on_disconnect(self, ev: mdp.Disconnect, now: float, principal: Principal) -> None:
        worker = self._known_worker(ev, now, principal)
        if isinstance(worker, Worker):
            self._worker_gone(worker, now, "disconnected")

    def _on_ready(self, ev: mdp.Ready, now: float, principal: Principal) -> None:
        worker = self._known_worker(ev, now, principal)
        if worker is False:
            return
        if worker is not None:
            self._protocol_error(ev.identity, ev.form, now, "READY twice")
            return
        name = ev.service.decode(errors="replace")
        if not principal.may_serve(name):
            # Registration is an authority: only the service's own principals (and operators)
            # may take its requests.  The peer gets nothing but DISCONNECT.
            self.counters["forbidden_ready"] += 1
            self.admission.on_forbidden(principal, "ready", {"service": name}, now)
            self._send(mdp.to_worker(ev.identity, ev.form, _DISCONNECT))
            return
        self._register(ev, now, principal)

    def _register(self, ev: mdp.Ready, now: float, principal: Principal) -> None:
        name, identity, capacity = ev.service, ev.identity, ev.capacity
        service = self.services.get(name)
        if service is None:
            service = self.services[name] = Service(name)
        self._idle.pop(name, None)
        pid = ev.pid if ev.pid is not None and self._pid_of(principal, ev.pid) else None
        worker = Worker(identity, service, ev.form, capacity, now + self.heartbeat_interval * self.liveness,
                        pid, principal=principal)
        self.workers[identity] = worker
        if not service.workers:
            self._served += 1
        service.workers[identity] = worker
        service.wait_since = None
        service.served = True
        service.ready.extend([worker] * capacity)
        self.counters["workers_registered"] += 1
        log.info("worker %s ready for %s (capacity %d)", identity.hex(), service.text, capacity)
        self._drain_queue(service, now)

    def _pid_of(self, principal: Principal, pid: int) -> bool:
        """Whether a READY's declared ``pid`` is the peer's own, so the kernel may measure its CPU
        time: trusted from operators (every ``ipc://`` peer), checked with the host (the
        supervisor) for a supervised child's principal (``child:NAME``); any other peer's pid is
        ignored (it may be a process of another host, or one the peer wants measured instead of
        itself)."""
        if principal.operator:
            return True
        child = principal.child
        return child is not None and self.host.owns_pid(child, pid)

    def _on_reply(self, worker: Worker, final: bool, token: bytes, body: list[bytes], now: float) -> None:
        req = worker.inflight.get(token)
        if req is None or req.done:
            if req is not None and final:
                # The kernel already answered (deadline, budget, cancel); the slot is free now.
                del worker.inflight[token]
                self.free_slot(worker, now)
                if worker.identity in self.parked and not any(r.done for r in worker.inflight.values()):
                    self._unpark(worker, now)
            self.counters["late_replies"] += 1
            return
        service = req.service
        if not final:
            service.partials += 1
            if req.reca:
                effects = self.admission.on_partial(self, req, body, now)
                if effects:
                    self.apply(effects, now)
                if req.done:  # the admission ended it (budget): its FINAL is already sent
                    return
            self._to_client(req, False, body)
            self._to_attempts(req, False, body, now, keep=False)
            return
        del worker.inflight[token]
        self._retire(req, now)
        service.finals += 1
        service.latencies.append(now - req.received)
        if req.reca:
            body, effects = self.admission.on_final(self, req, body, now)
            if effects:
                self.apply(effects, now)
            if self.admission.later:  # a malformed status's CPU charge exhausted a job
                self.apply(self.admission.take_later(self, now), now)
        else:
            self.admission.on_done(req, now, None, None)
        if self._send(mdp.to_client(req.client, req.form, service.name, True, body)) is False:  # (_to_client)
            self.counters["unroutable_replies"] += 1
        # a FINAL its worker made is kept for retries; one the kernel made at settlement
        # (budget_exceeded, a malformed status) is not: a retry is what it is for
        dedup = self.admission.dedup
        if dedup is not None and req.token in dedup.key_of:
            self._to_attempts(req, True, body, now, keep=not req.kernel_error)
        self.free_slot(worker, now)

    def free_slot(self, worker: Worker, now: float) -> None:
        if self.workers.get(worker.identity) is not worker:
            return
        claimed, effects = self.admission.claim_slot(self, worker, now)
        if effects:
            self.apply(effects, now)
        if claimed:
            return
        service = worker.service
        if worker.identity in self.parked:
            service.ready.append(worker)  # free, but no new request until it is unparked
            return
        req = service.queue.pop()
        if req is not None:
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
        self._send(mdp.to_worker(identity, form, _DISCONNECT))

    def _worker_gone(self, worker: Worker, now: float, why: str) -> None:
        """Forget ``worker``; every request in flight on it is answered WORKER_DIED at once."""
        if self.workers.get(worker.identity) is not worker:
            return
        del self.workers[worker.identity]
        self.parked.discard(worker.identity)
        service = worker.service
        service.workers.pop(worker.identity, None)
        if worker in service.ready:
            service.ready = collections.deque(w for w in service.ready if w is not worker)
        self.counters["workers_lost"] += 1
        if self.ladder_wake is not None:  # the ladder forgets the workers it killed once they go (its
            self.ladder_wake()  # ``killed`` set): a later worker with the same routing id is watched again
        log.warning("worker %s of %s gone (%s); failing %d request(s)", worker.identity.hex(),
                    service.text, why, len(worker.inflight))
        for req in list(worker.inflight.values()):
            if not req.done:
                self._finish_error(req, errors.WorkerDied(f"worker died: {why}", service=service.text), now)
        worker.inflight.clear()
        self.admission.worker_gone(worker.identity)  # after its requests: a paused one's debt goes too
        if not service.workers:
            self._served -= 1
        if not service.workers and service.queued:
            service.wait_since = now
            self._waiting[service.name] = service
        elif not service.workers and not service.live:
            self._mark_idle(service.name, now)

    def _mark_idle(self, name: bytes, now: float) -> None:
        """``name`` has no worker and nothing in flight: forgotten after ``service_expiry``, or at
        once, oldest first, past ``max_workerless`` idle names (issue 24: 100,000 per-worker names
        registered and dropped in a loop were all kept for a minute)."""
        idle = self._idle
        idle[name] = now
        while len(idle) > self.max_workerless:
            old, _ = next(iter(idle.items()))
            del idle[old]
            gone = self.services.get(old)
            if gone is not None and not gone.workers and not gone.live:
                del self.services[old]
                self.counters["services_evicted"] += 1

    def _sweep(self, now: float) -> None:
        # A sweep a whole interval late means this process itself was not running (a stalled
        # kernel, a paused VM): the silence it finds may be its own.  It still drops the silent
        # workers (they re-register), but lists none as hung for the ladder to kill.
        late = self._last_sweep is not None and now - self._last_sweep > self.heartbeat_interval
        self._last_sweep = now
        for worker in list(self.workers.values()):
            if worker.expiry <= now:
                if late and worker.pid is not None and worker.inflight:
                    self.counters["hung_unjudged_late_sweep"] += 1
                elif worker.pid is not None and worker.inflight:
                    if len(self.hung) >= MAX_HUNG:
                        self.hung.popleft()
                        self.counters["hung_dropped"] += 1
                    self.hung.append(Hung(worker.pid, worker.identity, worker.service.text,
                                          tuple(worker.inflight), now, worker.principal.child))
                    self.counters["workers_hung"] += 1
                    if self.ladder_wake is not None:  # the escalation ladder kills it
                        self.ladder_wake()
                self._worker_gone(worker, now, "missed its liveness window")
                self._send(mdp.to_worker(worker.identity, worker.form, _DISCONNECT))
            elif self._send(mdp.to_worker(worker.identity, worker.form, _HEARTBEAT)) is False:
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
                            f"no worker for service {service.text!r}"), now)
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

    def _mmi_once(self, ev: mdp.Request, now: float, principal: Principal) -> None:
        """A management call; one that may change state and carries an idempotency key is
        deduplicated by (principal, key) like a service request: a client's retry of it gets the
        stored answer instead of running (charging, reserving) again.  Only answers that are not
        errors are stored (an error changed nothing, so its retry may run)."""
        dedup = self.admission.dedup
        checked = ev.checked
        if dedup is None or checked is None or checked.idem is None \
                or ev.service.decode(errors="replace") in _MMI_READ_ONLY:
            self._mmi(ev, now, principal)
            return
        key, dig = (principal.name, checked.idem), digest(ev.service, ev.body[1:], checked)
        if self._deduplicated(dedup, ev, key, now, dig):
            return
        out = self._mmi(ev, now, principal)
        if out is not None:
            stored = dedup.store(key, ev.service, out, now + dedup.ttl, dig)
            self.admission.record("final", now, Dedup.record(key, ev.service, stored), {"ok": True})

    def _mmi(self, ev: mdp.Request, now: float, principal: Principal) -> list[bytes] | None:
        """Answer a management call; returns the answer sent (None: an error)."""
        self.counters["mmi"] += 1
        name, header, body = ev.service, ev.header, ev.body
        if header is not None:
            try:
                arg = codec.unpack(body[1]) if len(body) > 1 else None
            except errors.BadRequest as exc:
                self._reply_error(ev.identity, ev.form, name, exc, header)
                return None
        else:
            arg = body[0] if body else None
        result = self.management.handle(self, name.decode(errors="replace"), arg, now,
                                        caller=Caller(ev.identity, principal))
        if result is None:
            if header is not None:  # a reca caller gets a typed error (an opaque one RFC 8's "501")
                op = name.decode(errors="replace")
                result = errors.BadRequest(
                    f"{op} is not available in this kernel" if op in P.MMI_OPS else
                    f"unknown management operation {op!r}; known: {', '.join(sorted(P.MMI_OPS))}",
                    kind="unknown_op")
            else:
                result = P.MMI_NOT_IMPLEMENTED
        if isinstance(result, errors.RecaError):
            self._reply_error(ev.identity, ev.form, name, result, header)
            return None
        if header is not None:
            if isinstance(result, bytes) and name != P.MMI_STATS.encode():
                result = result.decode()
            status = {P.H_VERSION: P.VERSION, P.S_ID: ev.rid, P.S_STATUS: P.STATUS_OK, P.S_SPENT: {}}
            out = [codec.pack(status), codec.pack(result)]
        else:
            out = [result if isinstance(result, bytes) else codec.pack(result)]
        if self._send(mdp.to_client(ev.identity, ev.form, name, True, out)) is False:
            self.counters["unroutable_replies"] += 1
        return out

    # -- statistics -------------------------------------------------------------------------------

    def service_stats(self, services: Iterable[Service] | None = None) -> list[ServiceStats]:
        out = []
        for s in self.services.values() if services is None else services:
            lat = sorted(s.latencies)
            p50 = _percentile(lat, 0.5)
            p99 = _percentile(lat, 0.99)
            out.append(ServiceStats(
                name=s.text,
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

    def stats(self, now: float | None = None, query: dict[str, Any] | None = None) -> dict[str, Any]:
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
                {"service": w.service.text, "pid": w.pid, "inflight": len(w.inflight),
                 "capacity": w.capacity, "form": w.form.value}
                for w in self.workers.values()
            ],
        }
        out.update(self.admission.stats(now))
        if self.extra_stats is not None:
            out.update(self.extra_stats())
        return out

    def principal_stats(self, now: float, query: dict[str, Any], figures: bool) -> dict[str, Any]:
        """One page of services as a non-operator sees it (issue 24): by name and health only,
        or with their figures and the workers' capacities (``figures``: a service key, which
        places work on the others) -- never a pid, the counters or another section."""
        page = query.get("page", 0)
        page = page if isinstance(page, int) and not isinstance(page, bool) and page >= 0 else 0
        wanted = query.get("service")
        if isinstance(wanted, str):
            chosen = [s for s in (self.services.get(wanted.encode()),) if s is not None]
        else:
            names = sorted(self.services)[page * P.STATS_PAGE:(page + 1) * P.STATS_PAGE]
            chosen = [self.services[n] for n in names]
        shown = {s.name: dataclasses.asdict(s) for s in self.service_stats(chosen)}
        out: dict[str, Any] = {
            "services": shown if figures else {
                n: {"health": "serving" if f.get("workers", 0) > 0 else "no_worker"} for n, f in shown.items()},
            "summary": {"services": len(self.services), "page": page,
                        "pages": -(-len(self.services) // P.STATS_PAGE)},
        }
        if figures:
            out["workers"] = [{"service": w.service.text, "inflight": len(w.inflight), "capacity": w.capacity}
                              for w in self.workers.values()]
        return out

    def serving(self, principal: Principal, job: str) -> bool:
        """Whether a worker of ``principal`` is serving a request of ``job`` now."""
        return any(r.job == job and not r.done for w in self.workers.values() if w.principal == principal
                   for r in w.inflight.values())

    # -- invariants -------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError naming the first broken invariant (module docstring), then the
        admission's."""
        assert len(self.hung) <= MAX_HUNG, "more hung workers kept than MAX_HUNG"
        wake_check = getattr(self.ladder_wake, "check_invariants", None)
        if wake_check is not None:  # a sleeping ladder has nothing to watch (kernel/ladder.py Wake)
            wake_check(self)
        for ident in self.parked:
            w = self.workers.get(ident)
            assert w is not None, "a parked worker that is gone"
            assert any(r.done for r in w.inflight.values()), "a parked worker that holds no tombstone"
        queued_bytes = 0
        live: collections.Counter[bytes] = collections.Counter()
        for token, req in self.inflight.items():
            assert not req.done, f"done request {token.hex()} still in flight"
            assert req.token == token
            live[req.service.name] += 1
            if req.queued:
                assert req.worker is None, "a queued request names a worker"
                queued_bytes += req.size
            else:
                w = req.worker
                assert w is not None, f"request {token.hex()} neither queued nor dispatched"
                assert w.inflight.get(token) is req, "a dispatched request is not in its worker's table"
        assert queued_bytes == self.queued_bytes, f"queued_bytes {self.queued_bytes} != {queued_bytes}"
        assert sum(h[0] for h in self._holders.values()) == self.queued_bytes, "holders' bytes disagree"
        served = 0
        for name, service in self.services.items():
            assert service.name == name
            assert service.live == live[name], f"service {service.text}: live {service.live} != {live[name]}"
            assert service.queued == sum(1 for e in service.queue if not e[-1].done), f"{service.text}: queued count"
            assert sum(service.by_client.values()) == service.queued
            free = collections.Counter(w.identity for w in service.ready)
            for ident, n in free.items():
                w = service.workers.get(ident)
                assert w is not None, f"{service.text}: a free slot of a worker that is gone"
                lent = self.admission.lent_slots(w)
                assert n + len(w.inflight) <= w.capacity + lent, f"{service.text}: worker {ident.hex()} over capacity"
            served += bool(service.workers)
            for ident, w in service.workers.items():
                assert self.workers.get(ident) is w and w.service is service
        assert served == self._served, f"services with workers {self._served} != {served}"
        for ident, w in self.workers.items():
            assert w.identity == ident and w.service.workers.get(ident) is w
        dedup = self.admission.dedup
        if dedup is not None:
            dedup.check_invariants()
            assert all(t in self.inflight for t in dedup.key_of), "an idempotency key runs a request not in flight"
        self.admission.check_invariants(self)
