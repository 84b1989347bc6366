"""What the sync and async clients share: building requests and reading replies (no sockets)."""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Iterator
from typing import Any

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
