"""MDP/0.2 in both dialects, parsed once into typed events, and the replies encoded back.

:func:`parse` turns one multipart message as the ROUTER socket delivered it (identity first)
into one event: a client :class:`Request`, a worker :class:`Ready`, :class:`Reply`,
:class:`Heartbeat` or :class:`Disconnect`, or a malformed message (:class:`BadClient`,
:class:`BadWorker`, :class:`Unreadable`) whose ``why`` is the error text the peer gets.  Worker
commands are parsed from a table (:data:`_WORKER`; a FINAL directly); the reca header of a request is decoded once
(:func:`kernel.codec.reca_header`) and checked once against the declared schema
(:data:`kernel.protocol.HEADER`) into a :class:`Header`.  The router handles events and never
looks at frame offsets; the encoders here (:func:`to_client`, :func:`to_worker`,
:func:`request_to_worker`) write each peer's own dialect.

Pure: no sockets, no clock.  docs/protocol.md is the normative text.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable, Final, Union

from kernel import codec, errors
from kernel import protocol as P

__all__ = [
    "BadClient",
    "BadWorker",
    "Disconnect",
    "Event",
    "Form",
    "Header",
    "Heartbeat",
    "Ready",
    "Reply",
    "Request",
    "Unreadable",
    "parse",
    "parse_header",
    "request_to_worker",
    "to_client",
    "to_worker",
]

_EMPTY: Final = b""
MMI: Final = P.MMI_PREFIX.encode()
#: A worker's FINAL command byte: parse takes it before the table (every request's answer).
_FINAL: Final = P.WorkerCmd.FINAL.value


class Form(enum.Enum):
    """Which MDP dialect a peer speaks; replies use the peer's own form."""

    SPEC = "spec"  # 18/MDP as written: no leading empty frame
    MAJORTOMO = "majortomo"  # leading empty frame, worker command codes on the client side


# -- the reca header ----------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Header:
    """A reca request header checked against :data:`kernel.protocol.HEADER`.  ``raw`` is the map
    as sent (forwarded to the worker with the kernel's own fields added)."""

    raw: dict[str, Any]
    id: str | int | None = None
    job: str | None = None
    priority: int = P.DEFAULT_PRIORITY
    deadline: float | None = None  # milliseconds from receipt
    budget: dict[str, float] | None = None
    idem: str | None = None
    txn: str | None = None
    on_behalf: str | None = None  # header ``for``: checked by the router against what it serves


_HEADER_ATTR = {
    P.H_VERSION: None,
    P.H_ID: "id",
    P.H_JOB: "job",
    P.H_PRIORITY: "priority",
    P.H_DEADLINE: "deadline",
    P.H_BUDGET: "budget",
    P.H_IDEM: "idem",
    P.H_TXN: "txn",
    P.H_FOR: "on_behalf",
}


#: Schema field name -> (field, Header attribute): the fast path looks up only the fields a
#: header carries (most carry two or three of the nine).
_FIELDS = {f.name: (f, _HEADER_ATTR[f.name]) for f in P.HEADER}
_VERSION_FIELD = _FIELDS[P.H_VERSION][0]


def parse_header(raw: dict[str, Any]) -> Header:
    """``raw`` checked field by field against the schema; :class:`kernel.errors.BadRequest` with
    the schema's text for the first field (in schema order) that fails."""
    h = Header(raw)
    # Fast path: check only the fields present (unknown keys are ignored, as the schema walk
    # ignores them); on any failure the schema walk below names the first failing field.
    if _VERSION_FIELD.check(raw.get(P.H_VERSION)):
        fields = _FIELDS
        for key, value in raw.items():
            entry = fields.get(key)
            if entry is None or value is None:
                continue
            field, attr = entry
            if not field.check(value):
                break
            if attr is not None:
                setattr(h, attr, value)
        else:
            return h
        h = Header(raw)
    for field in P.HEADER:
        value = raw.get(field.name)
        if value is None and field.name != P.H_VERSION:
            continue
        if not field.check(value):
            raise errors.BadRequest(field.error.format(value=value))
        attr = _HEADER_ATTR[field.name]
        if attr is not None:
            setattr(h, attr, value)
    return h


# -- events -------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Request:
    """A client REQUEST.  ``header``: the decoded reca header map (None: an opaque MDP body);
    ``checked``: it checked against the schema (None: opaque, or it failed: then ``bad`` says why)."""

    identity: bytes
    form: Form
    service: bytes
    body: list[bytes]
    header: dict[str, Any] | None
    checked: Header | None
    bad: errors.BadRequest | None

    @property
    def rid(self) -> Any:
        """The request id every status echoes: the header's, or None where it is not a valid id
        (a header that failed its check may carry anything there; docs/protocol.md: str or int)."""
        if self.header is None:
            return None
        rid = self.header.get(P.H_ID)
        return rid if self.checked is not None or rid is None or _FIELDS[P.H_ID][0].check(rid) else None

    @property
    def mmi(self) -> bool:
        return self.service.startswith(MMI)


@dataclasses.dataclass(slots=True)
class Ready:
    identity: bytes
    form: Form
    service: bytes
    capacity: int
    pid: int | None


@dataclasses.dataclass(slots=True)
class Reply:
    """A worker's PARTIAL (``final`` False) or FINAL for the request with ``token``."""

    identity: bytes
    form: Form
    token: bytes
    body: list[bytes]
    final: bool


@dataclasses.dataclass(slots=True)
class Heartbeat:
    identity: bytes
    form: Form


@dataclasses.dataclass(slots=True)
class Disconnect:
    identity: bytes
    form: Form


@dataclasses.dataclass(slots=True)
class BadClient:
    """A client message that is not a well-formed REQUEST (answered ``bad_request``).
    ``service`` and ``header``: what could be read of them (a revoked peer's answer carries its id)."""

    identity: bytes
    form: Form
    why: str
    service: bytes = b""
    header: dict[str, Any] | None = None


@dataclasses.dataclass(slots=True)
class BadWorker:
    """A worker message that breaks the protocol (the worker is dropped and sent DISCONNECT)."""

    identity: bytes
    form: Form
    why: str


@dataclasses.dataclass(slots=True)
class Unreadable:
    """Not MDP at all (too few frames, an unknown protocol header).  ``answer``: whether the peer
    is answered ``bad_request`` (a message of one frame has nowhere to go)."""

    identity: bytes
    form: Form
    why: str
    answer: bool = True


Event = Union[Request, Ready, Reply, Heartbeat, Disconnect, BadClient, BadWorker, Unreadable]
#: Events that come from a worker (a revoked worker is dropped; any other is answered as a client).
WORKER_EVENTS: Final = (Ready, Reply, Heartbeat, Disconnect, BadWorker)


def parse(frames: list[bytes]) -> Event:
    """The one event ``frames`` (identity first) carries."""
    if len(frames) < 2:
        return Unreadable(frames[0] if frames else b"", Form.SPEC, "fewer than two frames", answer=False)
    identity = frames[0]
    if len(frames) > P.MAX_FRAMES:
        return Unreadable(identity, Form.SPEC, f"more than {P.MAX_FRAMES} frames")
    if frames[1] == _EMPTY:
        form, i = Form.MAJORTOMO, 2
    else:
        form, i = Form.SPEC, 1
    if i >= len(frames):
        return Unreadable(identity, form, "empty message")
    proto = frames[i]
    if proto == P.MDPC:
        return _client(identity, form, frames, i + 1)
    if proto == P.MDPW:
        if i + 1 >= len(frames):
            return BadWorker(identity, form, "worker message without command")
        if frames[i + 1] == _FINAL:  # every request's answer: no table, no closure
            return _parse_reply(identity, form, frames, i + 2, True)
        cmd = _WORKER.get(frames[i + 1])
        if cmd is None:
            return BadWorker(identity, form, f"unknown worker command {frames[i + 1]!r}")
        return cmd(identity, form, frames, i + 2)
    return Unreadable(identity, form, "unknown protocol header; expected MDPC02 or MDPW02")


# (plain bytes, not a table keyed by Form: an Enum's hash is a Python call)
_SPEC_REQUEST: Final = P.ClientCmd.REQUEST.value
_MT_REQUEST: Final = P.MajortomoClientCmd.REQUEST.value


def _client(identity: bytes, form: Form, frames: list[bytes], i: int) -> Event:
    n = len(frames)
    if i >= n:
        return BadClient(identity, form, "client message without command")
    cmd = frames[i]
    if cmd != (_SPEC_REQUEST if form is Form.SPEC else _MT_REQUEST):
        return _bad_client(identity, form, frames, i, f"unexpected client command {cmd!r}")
    if i + 1 >= n or not frames[i + 1] or len(frames[i + 1]) > P.MAX_NAME:
        return _bad_client(identity, form, frames, i, f"REQUEST without a service name of 1..{P.MAX_NAME} bytes")
    body = frames[i + 2 :]
    header = codec.reca_header(body)
    checked: Header | None = None
    bad: errors.BadRequest | None = None
    if header is not None:
        try:
            checked = parse_header(header)
        except errors.BadRequest as exc:
            bad = exc
    return Request(identity, form, frames[i + 1], body, header, checked, bad)


def _bad_client(identity: bytes, form: Form, frames: list[bytes], i: int, why: str) -> BadClient:
    service = frames[i + 1] if i + 1 < len(frames) else b""
    return BadClient(identity, form, why, service, codec.reca_header(frames[i + 2 :]))


def _ready(identity: bytes, form: Form, frames: list[bytes], i: int) -> Event:
    if i >= len(frames) or not frames[i] or frames[i].startswith(MMI) or len(frames[i]) > P.MAX_NAME:
        return BadWorker(identity, form, "READY without a valid service name")
    capacity, pid = P.DEFAULT_CAPACITY, None
    if i + 1 < len(frames):
        try:
            opts = codec.unpack(frames[i + 1])
            capacity = int(opts.get(P.R_CAPACITY, P.DEFAULT_CAPACITY))
            pid = opts.get(P.R_PID)
            if not 1 <= capacity <= P.MAX_CAPACITY:
                raise ValueError("capacity out of range")
        except Exception:
            return BadWorker(identity, form, "malformed READY options")
    return Ready(
        identity, form, frames[i], capacity, pid if isinstance(pid, int) and not isinstance(pid, bool) else None
    )


def _parse_reply(identity: bytes, form: Form, frames: list[bytes], i: int, final: bool) -> Event:
    """A PARTIAL or FINAL (a module function, not a closure per command: mypyc compiles nested
    functions into generic callable objects)."""
    if i + 1 >= len(frames) or frames[i + 1] != _EMPTY:
        return BadWorker(identity, form, "reply from an unregistered worker or without envelope")
    return Reply(identity, form, frames[i], frames[i + 2 :], final)


def _partial(identity: bytes, form: Form, frames: list[bytes], i: int) -> Event:
    return _parse_reply(identity, form, frames, i, False)


def _final(identity: bytes, form: Form, frames: list[bytes], i: int) -> Event:
    return _parse_reply(identity, form, frames, i, True)


def _heartbeat(identity: bytes, form: Form, frames: list[bytes], i: int) -> Event:
    return Heartbeat(identity, form)


def _disconnect(identity: bytes, form: Form, frames: list[bytes], i: int) -> Event:
    return Disconnect(identity, form)


#: Worker command byte -> its parser (the MDP command table).
_WORKER: dict[bytes, Callable[[bytes, Form, list[bytes], int], Event]] = {
    P.WorkerCmd.READY.value: _ready,
    P.WorkerCmd.PARTIAL.value: _partial,
    P.WorkerCmd.FINAL.value: _final,  # (parse takes a FINAL directly, before the table)
    P.WorkerCmd.HEARTBEAT.value: _heartbeat,
    P.WorkerCmd.DISCONNECT.value: _disconnect,
}


# -- encoders -----------------------------------------------------------------------------------

_SPEC_PARTIAL: Final = P.ClientCmd.PARTIAL.value
_SPEC_FINAL: Final = P.ClientCmd.FINAL.value
_MT_PARTIAL: Final = P.MajortomoClientCmd.PARTIAL.value
_MT_FINAL: Final = P.MajortomoClientCmd.FINAL.value


def to_client(identity: bytes, form: Form, service: bytes, final: bool, body: list[bytes]) -> list[bytes]:
    """A PARTIAL or FINAL for a client, in its dialect (majortomo's carries no service frame)."""
    if form is Form.SPEC:
        return [identity, P.MDPC, _SPEC_FINAL if final else _SPEC_PARTIAL, service, *body]
    return [identity, _EMPTY, P.MDPC, _MT_FINAL if final else _MT_PARTIAL, *body]


def to_worker(identity: bytes, form: Form, cmd: P.WorkerCmd) -> list[bytes]:
    """A HEARTBEAT or DISCONNECT for a worker, in its dialect."""
    if form is Form.SPEC:
        return [identity, P.MDPW, cmd.value]
    return [identity, _EMPTY, P.MDPW, cmd.value]


_REQ: Final = P.WorkerCmd.REQUEST.value


def request_to_worker(identity: bytes, form: Form, token: bytes, body: list[bytes]) -> list[bytes]:
    """A REQUEST for a worker: ``token`` rides where MDP puts the client's address."""
    if form is Form.SPEC:
        return [identity, P.MDPW, _REQ, token, _EMPTY, *body]
    return [identity, _EMPTY, P.MDPW, _REQ, token, _EMPTY, *body]
