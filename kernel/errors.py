"""reca's exceptions, split by what the caller can do about them.

Every error that crosses the wire carries a stable ``code`` (kernel.protocol.ErrorCode); the
client turns a code back into the matching class with :func:`from_status`.  ``retryable`` says
whether the same request may succeed if sent again (with the same idempotency key).
"""

from __future__ import annotations

from typing import Any

from kernel.protocol import ErrorCode


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
        ServiceError,
        Timeout,
        Overloaded,
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
