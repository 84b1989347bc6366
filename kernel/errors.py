"""reca's exceptions, split by what the caller can do about them.

Every error that crosses the wire carries a stable ``code`` (kernel.protocol.ErrorCode); the
client turns a code back into the matching class with :func:`from_status`.  ``retryable`` says
whether the same request may succeed if sent again (with the same idempotency key).
"""

from __future__ import annotations

import enum
from typing import Any


__all__ = ["AlreadyDone", "BadRequest", "BudgetExceeded", "Cancelled", "DeadlineExceeded", "ErrorCode", "Forbidden", "MemoryExceeded", "SessionLost",
           "IdemConflict", "InternalError", "KernelRestarted", "NotFound", "Overloaded", "RecaError", "Refused", "ServiceError",
           "Timeout", "Unavailable", "WorkerDied", "from_wire", "require_int"]

class ErrorCode(enum.StrEnum):
    """Error codes carried in ``status.error.code``; kernel.errors maps each to an exception.

    A ``StrEnum``: members are the wire strings themselves (they pack, log and compare as str)."""

    BAD_REQUEST = "bad_request"  # malformed frames, header or payload; never retry unchanged
    UNAVAILABLE = "unavailable"  # no worker for the service within the bounded wait
    WORKER_DIED = "worker_died"  # the worker died or missed its liveness window mid-request
    BUDGET_EXCEEDED = "budget_exceeded"  # the job's budget ran out; the job takes no more work
    DEADLINE = "deadline"  # the request's own deadline passed
    CANCELLED = "cancelled"  # cancelled by the kernel or an operator
    REFUSED = "refused"  # a gate refused (counted resource, priority, closed job)
    FORBIDDEN = "forbidden"  # the caller's principal lacks the authority (logged as a decision)
    SERVICE_ERROR = "service_error"  # the service's handler raised
    TIMEOUT = "timeout"  # client side: no reply within the client's own bound
    OVERLOADED = "overloaded"  # the kernel could not queue the request
    KERNEL_RESTARTED = "kernel_restarted"  # in flight when the kernel died; may have run: not re-run
    INTERNAL_ERROR = "internal_error"  # a bug in the kernel's handler of the call; not the caller's fault
    NOT_FOUND = "not_found"  # a control order's target (request, job, token) does not exist
    ALREADY_DONE = "already_done"  # same idempotency key already ran; its answer was too large to keep
    IDEM_CONFLICT = "idem_conflict"  # idempotency key reused with another service or body; not run
    MEMORY_EXCEEDED = "memory_exceeded"  # the request went past its mem_bytes ceiling (the OS killed its worker)
    SESSION_LOST = "session_lost"  # state a worker kept between requests (a session) died with it


class RecaError(Exception):
    """Base of every reca error.  ``code`` is the wire code; ``detail`` extra fields."""

    #: The wire code: an :class:`kernel.protocol.ErrorCode` for the kernel's own errors; services
    #: may define codes of their own (plain strings, e.g. ``services.ttc.errors``).
    code: str = "error"
    retryable = False

    def __init__(self, message: str = "", **detail: Any) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        self.detail = detail

    def to_wire(self) -> dict[str, Any]:
        out = {"code": self.code, "message": self.message}
        out.update(self.detail)
        return out


class BadRequest(RecaError, ValueError):
    """The request, its frames, header or payload are malformed.  Fix the request."""

    code = ErrorCode.BAD_REQUEST


class Unavailable(RecaError):
    """No worker serves the service within the bounded wait.  May succeed later."""

    code = ErrorCode.UNAVAILABLE
    retryable = True


class WorkerDied(RecaError):
    """The worker handling the request died or missed its liveness window."""

    code = ErrorCode.WORKER_DIED
    retryable = True


class BudgetExceeded(RecaError):
    """The job's budget is spent; the kernel refuses further work for it."""

    code = ErrorCode.BUDGET_EXCEEDED


class DeadlineExceeded(RecaError):
    """The request's own deadline passed before it finished."""

    code = ErrorCode.DEADLINE


class Cancelled(RecaError):
    """The request was cancelled by the kernel or an operator."""

    code = ErrorCode.CANCELLED


class Refused(RecaError):
    """A gate refused the request (counted resource exhausted, job closed, ...)."""

    code = ErrorCode.REFUSED


class Forbidden(RecaError):
    """The caller's principal may not do this (not the owner, not an operator, wrong role, or
    an unknown / revoked key).  The refusal is in the decision log; retrying will not help."""

    code = ErrorCode.FORBIDDEN


class ServiceError(RecaError):
    """The service's handler raised while serving the request."""

    code = ErrorCode.SERVICE_ERROR


class Timeout(RecaError, TimeoutError):
    """Client side: no final reply within the client's own bound (after its retries)."""

    code = ErrorCode.TIMEOUT
    retryable = True


class Overloaded(RecaError):
    """The kernel's queue for the service is full."""

    code = ErrorCode.OVERLOADED
    retryable = True


class KernelRestarted(RecaError):
    """The request was in flight when the kernel died; it may have run, so a retry with the same
    idempotency key is not run again."""

    code = ErrorCode.KERNEL_RESTARTED


class InternalError(RecaError):
    """A bug in the kernel while handling the call (logged with its traceback); the caller's
    input was accepted, so retrying unchanged may meet the same bug."""

    code = ErrorCode.INTERNAL_ERROR


class NotFound(Refused):
    """The target of a control order (a request id, a token, a job) does not exist (or is not
    the caller's: the answer is the same, so no one learns of another's work).  A refusal: code
    ``not_found``, and ``isinstance(exc, Refused)`` holds for callers that handle refusals."""

    code = ErrorCode.NOT_FOUND


class AlreadyDone(RecaError):
    """A request with this idempotency key already ran to its FINAL, which was too large to keep
    for retries; it is not run again."""

    code = ErrorCode.ALREADY_DONE


class IdemConflict(RecaError):
    """An idempotency key already in flight or finished was sent with another service or another
    body: a key names one request, so this one is neither run nor answered with the other's FINAL."""

    code = ErrorCode.IDEM_CONFLICT


class MemoryExceeded(RecaError):
    """The request went past its ``mem_bytes`` ceiling: the OS's memory ceiling on its worker's
    group fired (the OOM killer took the worker, which the supervisor restarts), or a service
    refused it up front knowing its size.  Not retryable unchanged."""

    code = ErrorCode.MEMORY_EXCEEDED


class SessionLost(RecaError):
    """The request names state its worker kept between requests (a decode session) that died with
    an earlier run of the worker: the kernel killed it (kernel/ladder.py: another request's
    tombstone passed its ceiling) or it crashed and was restarted.  Never a silent loss: start a
    new session."""

    code = ErrorCode.SESSION_LOST


_BY_CODE: dict[str, type[RecaError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        Unavailable,
        WorkerDied,
        BudgetExceeded,
        DeadlineExceeded,
        Cancelled,
        Refused,
        Forbidden,
        ServiceError,
        Timeout,
        Overloaded,
        KernelRestarted,
        InternalError,
        NotFound,
        AlreadyDone,
        IdemConflict,
        MemoryExceeded,
        SessionLost,
    )
}


def from_wire(error: Any) -> RecaError:
    """Rebuild the exception for a ``status.error`` map (unknown codes become RecaError)."""
    if not isinstance(error, dict):
        return RecaError(f"malformed error: {error!r}")
    code = str(error.get("code", "error"))
    message = str(error.get("message", code))
    detail = {k: v for k, v in error.items() if k not in ("code", "message")}
    cls = _BY_CODE.get(code)
    if cls is None:
        exc = RecaError(message, **detail)
        exc.code = code
        return exc
    return cls(message, **detail)


_NO_DEFAULT: Any = object()


def require_int(payload: dict[str, Any], key: str, default: Any = _NO_DEFAULT, *, lo: int | None = None,
                hi: int | None = None) -> int:
    """``payload[key]`` (or ``default`` when absent) as an int in ``[lo, hi]``; :class:`BadRequest`
    naming the field otherwise (bool is not an int).  The one integer check of request payloads."""
    value = payload.get(key, default)
    if value is _NO_DEFAULT:
        raise BadRequest(f"{key!r} is required (an integer)")
    if isinstance(value, bool) or not isinstance(value, int) or (lo is not None and value < lo) \
            or (hi is not None and value > hi):
        where = f" in [{lo}, {hi}]" if lo is not None and hi is not None else \
            f" >= {lo}" if lo is not None else f" <= {hi}" if hi is not None else ""
        raise BadRequest(f"{key!r} must be an integer{where}, got {value!r}")
    return value
