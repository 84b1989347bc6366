"""Admission as policy: hooks that read the router through a view and return effects.

The router calls an :class:`Admission` at each step of a request's life (admit, forward,
partial, final, deadline, a freed slot, time) and applies what it returns: a refusal, a reply
body, or a list of effects.  A policy never calls back into the router:

* :class:`Fail` -- answer an in-flight request now with a kernel error (its slot stays busy until
  its worker's own late FINAL);
* :class:`Lend` -- a slot of a worker is free for the queue (a paused request lent it);
* :class:`Order` -- a control order published on ``ctl/<service>/<op>`` and recorded in the
  decision log, both by :meth:`kernel.router.Router.order`, the one path every order takes
  (the kernel's own preemption, resume and cancel, and ``mmi.preempt``/``resume``/``cancel``/
  ``control``).

A new effect is a class here plus one row of the router's effect table (``Router._apply``).
:class:`View` is what a policy may read of the router.  This module also holds the base policy,
which admits everything and charges nothing (kernel.admission.BudgetAdmission enforces budgets).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Protocol, Sequence, Union

from kernel import codec, errors
from kernel import protocol as P
from kernel.principal import Principal
from kernel.dedup import Dedup
from kernel.state import Request, Service, Worker, error_body

__all__ = ["NO_EFFECTS", "Admission", "Core", "Effect", "Effects", "Fail", "Lend", "Order", "View"]


@dataclasses.dataclass(frozen=True, slots=True)
class Fail:
    """Answer ``request`` with ``error`` now (``spent``: what the status reports it spent)."""

    request: Request
    error: errors.RecaError
    spent: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Lend:
    """A slot of ``worker`` is free for queued work (its paused request lent it)."""

    worker: Worker


@dataclasses.dataclass(frozen=True, slots=True)
class Order:
    """A control order: ``message`` published on ``ctl/<service>/<op>``; the decision log records
    ``op`` with the message (tokens as hex), the service and ``why`` (extra fields for the log
    only).  One type for every order the kernel gives or relays."""

    service: str
    op: str
    message: dict[str, Any]
    why: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def topic(self) -> bytes:
        return P.control_topic(self.service, self.op)

    def record(self) -> dict[str, Any]:
        """The order as the decision log records it (JSON: bytes as hex)."""
        out: dict[str, Any] = {"service": self.service}
        for k, v in self.message.items():
            out[k] = v.hex() if isinstance(v, bytes) else v
        out.update(self.why)
        return out

    def with_why(self, **why: Any) -> "Order":
        """This order with ``why`` added to what the log records."""
        return dataclasses.replace(self, why={**self.why, **why})

    @classmethod
    def to_request(cls, op: P.ControlOp | str, req: Request, **message: Any) -> "Order":
        """An order addressed to one request (by its kernel token) on its service's topic."""
        return cls(
            req.service.text,
            str(op.value if isinstance(op, P.ControlOp) else op),
            {P.C_TOKEN: req.token, P.C_ID: req.rid, **message},
        )


Effect = Union[Fail, Lend, Order]
Effects = Sequence[Effect]
#: What most hooks return on the common path (no allocation).
NO_EFFECTS: Effects = ()


class View(Protocol):
    """What a policy may read of the router (it mutates nothing through it)."""

    @property
    def now(self) -> float: ...

    @property
    def inflight(self) -> Mapping[bytes, Request]: ...

    def serving(self, principal: Principal, job: str) -> bool:
        """Whether a worker of ``principal`` is serving a request of ``job`` now."""
        ...

    def top_queued_priority(self, service: Service, principal: str | None = None) -> int | None:
        """The priority of the first request waiting in ``service``'s queue, or of ``principal``'s (None: none)."""
        ...


class Core(View, Protocol):
    """What the management calls may use of the router: the view, its statistics, and the
    one path of effects and orders."""

    def has_worker(self, name: bytes) -> bool: ...

    def stats(self, now: float | None = None, query: dict[str, Any] | None = None) -> dict[str, Any]: ...

    def principal_stats(self, now: float, query: dict[str, Any], figures: bool) -> dict[str, Any]: ...

    def apply(self, effects: Effects, now: float) -> None: ...

    def order(self, order: Order, now: float) -> None: ...


def forwarded_header(req: Request, **kernel_fields: Any) -> bytes:
    """The reca header a worker receives: the client's, with the fields only the kernel sets
    replaced -- ``principal`` (the caller's verified name, or the one a service acts for)
    always, ``granted`` only when given; ``for`` is not forwarded (issue 24)."""
    return forward_with(req, kernel_fields)


def forward_with(req: Request, kernel_fields: dict[str, Any] | None) -> bytes:
    """:func:`forwarded_header` with the kernel's fields as a map (no keyword packing)."""
    raw = req.header
    header = dict(raw) if raw else {}
    if P.H_GRANTED in header:
        del header[P.H_GRANTED]
    if P.H_FOR in header:
        del header[P.H_FOR]
    header[P.H_PRINCIPAL] = req.acting_for or req.principal.name
    if kernel_fields:
        header.update(kernel_fields)
    return codec.pack(header)


class Admission:
    """The policy hooks the router calls.  This base admits everything and charges nothing.

    Hooks never raise and never call the router: they answer with values (a refusal is an
    exception *returned*) and effects the router applies, in order."""

    #: The idempotency table the router consults (kernel.dedup); None: no deduplication.
    dedup: Dedup | None = None
    #: principal -> its weight in the fair share of slots (kernel.fairq; default 1 each).
    weights: Mapping[str, float] = {}
    #: Jobs a hook's charges exhausted that the router must still take (:meth:`take_later`);
    #: falsy when there are none (read on every answer: an attribute, not a call).
    later: Sequence[Any] = ()

    def admit(self, view: View, req: Request, now: float) -> tuple[errors.RecaError | None, Effects]:
        """Admit ``req`` (it may set its job, priority and deadline) or refuse it."""
        return None, NO_EFFECTS

    def forward_header(self, req: Request, now: float) -> bytes:
        """The header frame the worker gets (the request is being dispatched to ``req.worker``)."""
        return forwarded_header(req)

    def on_partial(self, view: View, req: Request, body: list[bytes], now: float) -> Effects:
        """A PARTIAL of a reca request arrived (a Fail of ``req`` means it is not forwarded)."""
        return NO_EFFECTS

    def on_final(self, view: View, req: Request, body: list[bytes], now: float) -> tuple[list[bytes], Effects]:
        """The FINAL's body for the client: the worker's status, settled (:meth:`settle`), with the
        kernel-measured wall time added; a malformed status or a settlement's error instead
        answers the request with that error."""
        try:
            status = codec.unpack(body[0]) if body else None
        except errors.BadRequest:
            status = None
        if not isinstance(status, dict):
            exc = errors.ServiceError("worker sent a malformed status frame")
            req.kernel_error = True
            self.on_done(req, now, None, exc)
            return error_body(exc, req.header), NO_EFFECTS
        over, effects = self.settle(view, req, status, now)
        spent = status.get(P.S_SPENT)
        if not isinstance(spent, dict):
            spent = {}
        spent[P.WALL_MS] = (now - req.received) * 1000.0
        status[P.S_SPENT] = spent
        self.on_done(req, now, spent, over)
        if over is not None:
            req.kernel_error = True
            return error_body(over, req.header, spent), effects
        return [codec.pack(status), *body[1:]], effects

    def settle(
        self, view: View, req: Request, status: dict[str, Any], now: float
    ) -> tuple[errors.RecaError | None, Effects]:
        """Account a FINAL's status (it may be amended in place); an error to answer with instead."""
        return None, NO_EFFECTS

    def on_queued(self, req: Request, now: float) -> Effects:
        """``req`` (admitted) waits in its service's queue for a slot; effects: a slot lent to
        the queue (a paused request's)."""
        return NO_EFFECTS

    def on_dispatched(self, req: Request, now: float) -> bool:
        """``req`` leaves the queue for a slot; True when its ``deadline`` moved (the router
        then re-arms it: a budget's clock starts at dispatch)."""
        return False

    def on_deadline(self, view: View, req: Request, now: float) -> Effects:
        return (Fail(req, errors.DeadlineExceeded("request deadline passed")),)

    def on_done(self, req: Request, now: float, spent: dict[str, Any] | None,
                error: errors.RecaError | None) -> dict[str, Any] | None:
        """``req`` got its one FINAL (the router's, or its worker's).  For a kernel error (``error``
        and no worker status) it may return what the request spent that the kernel measured (for
        the answer's ``spent``); effects its charges cause wait in :meth:`take_later`."""
        return None

    def take_later(self, view: View, now: float) -> Effects:
        """Effects a hook that cannot return them caused (``on_done``'s charges exhausting a
        job: every other request drawing on it is cancelled), in order; each is handed out once."""
        return NO_EFFECTS

    def claim_slot(self, view: View, worker: Worker, now: float) -> tuple[bool, Effects]:
        """A slot of ``worker`` just freed; True if the policy took it (to resume paused work)."""
        return False, NO_EFFECTS

    def record(self, op: str, now: float, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        """Record a decision that is not the ledger's (orders, process controls, audits)."""

    def flush_log(self) -> None:
        """Hand the decisions taken so far to the operating system (the server calls it once per
        turn of its loop: the group commit)."""

    def tick(self, view: View, now: float) -> Effects:
        """Time-driven policy (budget deadlines)."""
        return NO_EFFECTS

    def next_wakeup(self) -> float:
        return float("inf")

    def on_forbidden(self, principal: Principal, op: str, inputs: dict[str, Any], now: float) -> None:
        """A call or registration ``principal`` lacks the authority for was refused (logged)."""

    def worker_gone(self, identity: bytes) -> None:
        """The worker with ``identity`` left the router's tables."""

    def lent_slots(self, worker: Worker) -> int:
        """Slots of ``worker`` beyond its capacity that the policy has lent out (paused work)."""
        return 0

    def stats(self, now: float) -> dict[str, Any]:
        return {}

    def check_invariants(self, view: View) -> None:
        """Raise AssertionError if the policy's state is inconsistent."""
