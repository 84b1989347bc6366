"""The worker's side of MDP/0.2 as a state machine with no I/O: the mirror of kernel.router.

:class:`WorkerSession` holds everything a service process decides about its link to the kernel
and the requests on it; it reads no clock and owns no socket.  Messages from the kernel go in
through :meth:`WorkerSession.on_message` (frames as a DEALER receives them, time passed in),
control messages from the PUB socket through :meth:`WorkerSession.on_control`; time-driven
rules run in :meth:`WorkerSession.tick`, and :meth:`WorkerSession.next_wakeup` says when that is
next needed.  Frames to the kernel leave through the ``send`` callable.  The asyncio shell
(services/base.py) owns the sockets, the clock and the handler tasks.

Rules (docs/protocol.md is normative):

* **Link.** :meth:`connect` sends READY (with capacity and pid).  Any message from the kernel
  proves it alive; after ``liveness`` silent heartbeat intervals the kernel is lost.  The worker
  heartbeats whenever it has sent nothing for one interval.  DISCONNECT from the kernel, or its
  loss, ends the link: every request on it is dropped (the kernel has already answered them
  ``worker_died``) and the shell reconnects on a fresh socket after a backoff that starts at
  ``reconnect_initial`` and doubles up to ``reconnect_max``, reset once a new link is registered.
* **Requests.** Each REQUEST becomes a :class:`RequestState`; a reca body whose payload frame does
  not decode is answered ``bad_request`` at once.  Replies are encoded here: a request gets any
  number of PARTIALs and exactly one FINAL; a reply for a request that is no longer active
  (answered, or lost with its link) is dropped and counted.
* **Control.** A control message addresses requests by ``token`` (exact), else ``job``, else
  ``id`` (a client's id: unique per client only), or ``all`` (:func:`targets`).  ``preempt``
  asks the request to pause at its next safe point, ``resume`` lets it go on, ``cancel`` makes
  its next safe point raise the error the message names.
* **Safe points.** :meth:`safe_point` is what ``ctx.checkpoint()`` asks: go on, pause (a PARTIAL
  ``paused`` with ``paused_at`` is sent), or cancel.  While paused, :meth:`still_paused` answers
  after every control message: keep waiting, or go on (a PARTIAL ``resumed`` with
  ``resumed_at``), or cancel.  Every preempt that finds the request running is acknowledged:
  one that follows a resume the paused handler has not yet seen sends ``resumed`` and then
  ``paused`` again (the kernel resumed it, and lends its slot again only on that ``paused``).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import Any, Callable

from kernel import codec, errors
from kernel import protocol as P

__all__ = ["Event", "Link", "LinkLost", "NewRequest", "RequestState", "SafePoint", "WorkerSession", "targets"]

_W = P.WorkerCmd
# The command bytes as plain constants (an Enum member's ``.value`` is a Python property call).
_READY, _REQUEST, _PARTIAL, _FINAL = _W.READY.value, _W.REQUEST.value, _W.PARTIAL.value, _W.FINAL.value
_HEARTBEAT, _DISCONNECT = _W.HEARTBEAT.value, _W.DISCONNECT.value
#: A worker message to the kernel, without the MDPW header (the send callable adds nothing).
Send = Callable[[list[bytes]], None]


class Link(enum.Enum):
    """The state of the link to the kernel."""

    IDLE = "idle"  # not yet connected
    READY_SENT = "ready_sent"  # READY sent; the kernel has not spoken on this link yet
    REGISTERED = "registered"  # the kernel spoke on this link (heartbeat or request)
    BACKOFF = "backoff"  # lost; waiting to reconnect
    STOPPED = "stopped"  # stopped for good


class SafePoint(enum.Enum):
    """What a handler does at a safe point."""

    CONTINUE = "continue"
    PAUSE = "pause"
    CANCEL = "cancel"


@dataclasses.dataclass(eq=False, slots=True)
class RequestState:
    """One request on the current link.  Invariant: ``paused`` implies ``pause_requested`` was
    set when it paused; ``cancel`` once set stays set; a state leaves ``active`` when its FINAL
    is sent or its link ends."""

    token: bytes
    header: dict[str, Any] | None
    #: A reca request (header present), else an opaque MDP body.
    reca: bool = dataclasses.field(init=False)
    #: The client's request id and the job, from the header (None if absent).
    id: Any = dataclasses.field(init=False)
    job: str | None = dataclasses.field(init=False)
    #: The caller's verified principal, as the kernel set it (None: an opaque body).
    principal: str | None = dataclasses.field(init=False)
    spent: dict[str, float] = dataclasses.field(default_factory=dict)
    pause_requested: bool = False
    paused: bool = False
    #: A resume reached this request while it was paused (its handler has not looked yet): a
    #: preempt after it is a new pause, acknowledged again (the kernel waits for that ``paused``).
    resumed_while_paused: bool = False
    cancel: errors.RecaError | None = None

    def __post_init__(self) -> None:
        header = self.header
        self.reca = header is not None
        self.id = None if header is None else header.get(P.H_ID)
        self.job = None if header is None else header.get(P.H_JOB)
        principal = None if header is None else header.get(P.H_PRINCIPAL)
        self.principal = principal if isinstance(principal, str) else None


def targets(message: dict[str, Any], state: RequestState) -> bool:
    """Whether the control ``message`` addresses ``state``: ``token`` (exact) if given, else
    ``job``, else ``id`` (only without ``job``), or ``all``."""
    token = message.get(P.C_TOKEN)
    if token is not None:
        return bool(state.token == token)
    job, rid = message.get(P.C_JOB), message.get(P.C_ID)
    return bool(
        (job is not None and state.job == job)
        or (rid is not None and job is None and state.id == rid)
        or message.get("all")
    )


@dataclasses.dataclass(slots=True)
class NewRequest:
    """A request arrived: the shell runs the service's handler on ``payload``."""

    state: RequestState
    payload: Any


@dataclasses.dataclass(slots=True)
class LinkLost:
    """The link ended (``reason``); ``dropped`` were the requests on it."""

    reason: str
    dropped: list[RequestState]


Event = NewRequest | LinkLost
#: No events (shared: the common answer of on_message and tick).
_NONE: tuple[Event, ...] = ()


class WorkerSession:
    """The worker's protocol state: link, heartbeats, requests, control targets, safe points."""

    def __init__(
        self,
        service: str,
        send: Send,
        *,
        capacity: int = P.DEFAULT_CAPACITY,
        pid: int | None = None,
        heartbeat: float = P.HEARTBEAT_INTERVAL,
        liveness: int = P.LIVENESS,
        reconnect_initial: float = P.RECONNECT_INITIAL,
        reconnect_max: float = P.RECONNECT_MAX,
    ) -> None:
        if not service:
            raise ValueError("a service needs a name")
        self.service = service
        self._send = send
        self.capacity = capacity
        self.pid = pid
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.reconnect_initial = reconnect_initial
        self.reconnect_max = reconnect_max
        self.link = Link.IDLE
        #: token -> request on the current link (Invariant: empty unless READY_SENT/REGISTERED).
        self.active: dict[bytes, RequestState] = {}
        self.connects = 0
        self.paused_acks = 0
        self.late_replies = 0
        self.malformed = 0
        self._backoff = reconnect_initial
        self.reconnect_at = 0.0
        self._last_send = 0.0
        self._kernel_expiry = 0.0

    # -- link -------------------------------------------------------------------------------------

    @property
    def window(self) -> float:
        return self.heartbeat * self.liveness

    def connect(self, now: float) -> None:
        """A fresh socket is connected: send READY."""
        if self.link is Link.STOPPED:
            raise RuntimeError("session stopped")
        self.link = Link.READY_SENT
        self.connects += 1
        self._kernel_expiry = now + self.window
        opts = {P.R_VERSION: P.VERSION, P.R_CAPACITY: self.capacity}
        if self.pid is not None:
            opts[P.R_PID] = self.pid
        self._emit([_READY, self.service.encode(), codec.pack(opts)], now)

    @property
    def registered(self) -> bool:
        """The kernel has spoken on the current link."""
        return self.link is Link.REGISTERED

    @property
    def connected(self) -> bool:
        return self.link in (Link.READY_SENT, Link.REGISTERED)

    def on_message(self, frames: list[bytes], now: float) -> Sequence[Event]:
        """One message from the kernel (``[MDPW, cmd, ...]``)."""
        if not self.connected:
            return _NONE
        self._kernel_expiry = now + self.window
        if len(frames) < 2 or frames[0] != P.MDPW:
            self.malformed += 1
            return _NONE
        cmd = frames[1]
        if cmd == _REQUEST:
            self._registered()
            event = self._on_request(frames[2:], now)
            return (event,) if event is not None else _NONE
        if cmd == _HEARTBEAT:
            self._registered()
            return _NONE
        if cmd == _DISCONNECT:
            return [self.lost("disconnected by the kernel", now)]
        self.malformed += 1
        return _NONE

    def _registered(self) -> None:
        if self.link is Link.READY_SENT:
            self.link = Link.REGISTERED
            self._backoff = self.reconnect_initial

    def tick(self, now: float) -> Sequence[Event]:
        """Heartbeat when due; the kernel is lost after a silent liveness window."""
        if not self.connected:
            return _NONE
        if now >= self._kernel_expiry:
            return [self.lost("kernel silent for the liveness window", now)]
        if now >= self._last_send + self.heartbeat:
            self._emit([_HEARTBEAT], now)
        return _NONE

    def next_wakeup(self) -> float:
        """When :meth:`tick` (or, in BACKOFF, a reconnect) is next due."""
        if self.link is Link.BACKOFF:
            return self.reconnect_at
        if not self.connected:
            return float("inf")
        return min(self._last_send + self.heartbeat, self._kernel_expiry)

    def lost(self, reason: str, now: float) -> LinkLost:
        """End the link (the shell closes its socket); reconnect at ``reconnect_at``."""
        dropped = self._drop()
        self.link = Link.BACKOFF
        self.reconnect_at = now + self._backoff
        self._backoff = min(self.reconnect_max, self._backoff * 2)
        return LinkLost(reason, dropped)

    def stop(self, now: float) -> list[RequestState]:
        """Stop for good: DISCONNECT if connected; returns the requests dropped."""
        if self.connected:
            self._emit([_DISCONNECT], now)
        dropped = self._drop()
        self.link = Link.STOPPED
        return dropped

    def _drop(self) -> list[RequestState]:
        dropped = list(self.active.values())
        self.active.clear()
        return dropped

    # -- requests ---------------------------------------------------------------------------------

    def _on_request(self, frames: list[bytes], now: float) -> NewRequest | None:
        # frames: [token, b"", body...]
        if len(frames) < 2:
            self.malformed += 1
            return None
        token, body = frames[0], frames[2:]
        header = codec.reca_header(body)
        state = RequestState(token, header)
        self.active[token] = state
        payload: Any = body
        if header is not None:
            try:
                payload = codec.unpack(body[1]) if len(body) > 1 else None
            except errors.BadRequest as exc:
                self.final(token, now, error=exc)
                return None
        return NewRequest(state, payload)

    def partial(self, token: bytes, payload: Any, now: float, status: str = P.STATUS_PARTIAL) -> bool:
        """Send one PARTIAL; False (and nothing sent) if the request is no longer active."""
        state = self.active.get(token)
        if state is None:
            self.late_replies += 1
            return False
        self._emit([_PARTIAL, token, b"", *self._body(state, payload, status, None)], now)
        return True

    def final(self, token: bytes, now: float, result: Any = None, error: errors.RecaError | None = None) -> bool:
        """Send the FINAL (the result, or ``error``); exactly once per request: False (and
        nothing sent) if it is no longer active."""
        state = self.active.pop(token, None)
        if state is None:
            self.late_replies += 1
            return False
        status = P.STATUS_OK if error is None else P.STATUS_ERROR
        self._emit([_FINAL, token, b"", *self._body(state, result, status, error)], now)
        return True

    @staticmethod
    def _body(state: RequestState, payload: Any, status: str, error: errors.RecaError | None) -> list[bytes]:
        if state.reca:
            st: dict[str, Any] = {P.H_VERSION: P.VERSION, P.S_ID: state.id, P.S_STATUS: status, P.S_SPENT: state.spent}
            if error is not None:
                st[P.S_ERROR] = error.to_wire()
                return [codec.pack(st)]
            return [codec.pack(st), codec.pack(payload)]
        if error is not None:
            return [codec.pack({P.S_STATUS: P.STATUS_ERROR, P.S_ERROR: error.to_wire()})]
        if isinstance(payload, (bytes, bytearray, memoryview)):
            return [bytes(payload)]
        if isinstance(payload, list) and all(isinstance(f, (bytes, bytearray, memoryview)) for f in payload):
            return [bytes(f) for f in payload]
        return [codec.pack(payload)]

    # -- control and safe points ------------------------------------------------------------------

    def on_control(self, op: str, message: Any) -> list[RequestState]:
        """Apply a control message; returns the requests it addressed (their handlers must look
        at their safe point again)."""
        if not isinstance(message, dict):
            return []
        hit = [s for s in self.active.values() if targets(message, s)]
        for state in hit:
            if op == P.ControlOp.PREEMPT:
                state.pause_requested = True
            elif op == P.ControlOp.RESUME:
                state.pause_requested = False
                state.resumed_while_paused = state.paused
            elif op == P.ControlOp.CANCEL and state.cancel is None:
                code = message.get(P.C_CODE, P.ErrorCode.CANCELLED)
                state.cancel = errors.from_wire(
                    {"code": code, "message": message.get(P.C_REASON, "cancelled by the kernel")}
                )
        return hit

    def pending(self, token: bytes) -> SafePoint:
        """What :meth:`safe_point` would decide now, without acting (a handler may park its own
        state before the pause is acknowledged)."""
        state = self.active.get(token)
        if state is None:
            return SafePoint.CONTINUE
        if state.cancel is not None:
            return SafePoint.CANCEL
        return SafePoint.PAUSE if state.pause_requested else SafePoint.CONTINUE

    def safe_point(self, token: bytes, now: float) -> SafePoint:
        """A handler reached a safe point: go on, pause (PARTIAL ``paused`` sent), or cancel."""
        state = self.active.get(token)
        if state is None:
            return SafePoint.CONTINUE  # lost with its link: the shell cancels the handler
        if state.cancel is not None:
            return SafePoint.CANCEL
        if state.pause_requested:
            state.paused = True
            self.paused_acks += 1
            self.partial(token, {"paused_at": now}, now, P.STATUS_PAUSED)
            return SafePoint.PAUSE
        return SafePoint.CONTINUE

    def still_paused(self, token: bytes, now: float) -> SafePoint:
        """A paused handler looks again: PAUSE (keep waiting), CONTINUE (PARTIAL ``resumed``
        sent) or CANCEL."""
        state = self.active.get(token)
        if state is None:
            return SafePoint.CONTINUE
        if state.cancel is not None:
            state.paused = state.resumed_while_paused = False
            return SafePoint.CANCEL
        resumed, state.resumed_while_paused = state.resumed_while_paused, False
        if state.pause_requested:
            if resumed:  # resumed and preempted again before this look: both, then paused again
                self.partial(token, {"resumed_at": now}, now, P.STATUS_RESUMED)
                self.paused_acks += 1
                self.partial(token, {"paused_at": now}, now, P.STATUS_PAUSED)
            return SafePoint.PAUSE
        state.paused = False
        self.partial(token, {"resumed_at": now}, now, P.STATUS_RESUMED)
        return SafePoint.CONTINUE

    # -- invariants -------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError naming the first broken invariant: requests live only on a
        connected link, each under its own token; the backoff stays
        within its bounds."""
        if not self.connected:
            assert not self.active, f"{len(self.active)} request(s) active on a {self.link.value} link"
        for token, state in self.active.items():
            assert state.token == token, "a request under another's token"
        assert self.reconnect_initial <= self._backoff <= max(self.reconnect_max, self.reconnect_initial), (
            f"backoff {self._backoff} out of bounds"
        )
        assert self.late_replies >= 0 and self.malformed >= 0

    # -- sending ----------------------------------------------------------------------------------

    def _emit(self, tail: list[bytes], now: float) -> None:
        self._last_send = now
        self._send([P.MDPW, *tail])
