"""The transaction manager's typed errors, each with a stable wire ``code``.

All derive from :class:`kernel.errors.RecaError` so the service shell can put them on the wire
unchanged (``to_wire()``).  Split by what the caller can do:

* fix the request: :class:`UnknownTool`, :class:`PreconditionFailed`, :class:`TooLarge`,
  :class:`UnknownCall`, :class:`IdempotencyConflict` (all also ``ValueError``);
* accept the decision already taken: :class:`Aborted`, :class:`AlreadyCommitted`,
  :class:`AlreadyFinished`;
* wait or ask for less: :class:`BudgetRefused`.
"""

from __future__ import annotations

from kernel.errors import RecaError


class TtcError(RecaError):
    """Base of the transaction manager's errors."""

    code = "ttc_error"


class UnknownTool(TtcError, ValueError):
    """``prepare`` named a tool that is not registered."""

    code = "unknown_tool"


class PreconditionFailed(TtcError, ValueError):
    """The tool's own validator rejected the inputs, or an argument (cost, timeout, consumers) is invalid."""

    code = "precondition_failed"


class TooLarge(TtcError, ValueError):
    """The encoded inputs exceed the manager's size cap."""

    code = "too_large"


class UnknownCall(TtcError, ValueError):
    """No call with this id is in the log."""

    code = "unknown_call"


class IdempotencyConflict(TtcError, ValueError):
    """An idempotency key was reused for a different tool or different inputs."""

    code = "idem_conflict"


class Aborted(TtcError):
    """The call was aborted (``detail['reason']`` says why: ``timeout``, ``no_consumer``, ``requested``, ...)."""

    code = "aborted"


class AlreadyCommitted(TtcError):
    """A second ``commit`` that is not a retry (no matching idempotency key) of a committed call."""

    code = "already_committed"


class AlreadyFinished(TtcError):
    """``abort`` of a call whose run already finished (DONE or FAILED): there is nothing to stop."""

    code = "already_finished"


class BudgetRefused(TtcError):
    """The gate refused to reserve the call's estimated cost."""

    code = "budget_refused"


class NotDelivered(TtcError, ValueError):
    """``attach`` of a (call, consumer) that has no result to attach (not finished, or not a consumer)."""

    code = "not_delivered"


ALL = (
    UnknownTool,
    PreconditionFailed,
    TooLarge,
    UnknownCall,
    IdempotencyConflict,
    Aborted,
    AlreadyCommitted,
    AlreadyFinished,
    BudgetRefused,
    NotDelivered,
)
