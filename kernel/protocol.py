"""The reca wire protocol in one module: MDP/0.2 frames, reca's header and status fields,
error codes, control topics and default intervals.

docs/protocol.md is the normative text; this module is its executable form.  Frames are listed
after the ROUTER identity frame.

MDP/0.2 (ZeroMQ RFC 18/MDP), spec-exact form (no leading empty frame)::

    client  REQUEST   [MDPC, 0x01, service, body...]
    broker  PARTIAL   [MDPC, 0x02, service, body...]
    broker  FINAL     [MDPC, 0x03, service, body...]
    worker  READY     [MDPW, 0x01, service, (reca: options)]
    broker  REQUEST   [MDPW, 0x02, route, b"", body...]
    worker  PARTIAL   [MDPW, 0x03, route, b"", body...]
    worker  FINAL     [MDPW, 0x04, route, b"", body...]
    both    HEARTBEAT [MDPW, 0x05]
    both    DISCONNECT[MDPW, 0x06]

The ``majortomo`` variant (PyPI ``majortomo`` 0.2.0) prefixes every message with an empty frame,
its client sends REQUEST as 0x02 and expects PARTIAL 0x03 / FINAL 0x04 with no service frame.  The
kernel accepts both and answers each peer in the form that peer used.

``route`` is the opaque client address of MDP.  The kernel puts a request token there (not the
client's socket identity): a worker echoes it untouched, so replies are matched to requests
exactly, whatever the worker's concurrency and whatever the body holds.

reca's own fields ride in the body: a request body whose first frame is a msgpack map carrying
``"v": VERSION`` is a reca request ``[header, payload]``; a reply body is ``[status, payload]``.
Any other body is an opaque MDP body, routed unchanged with the default budget.
"""

from __future__ import annotations

import enum
from typing import Final

#: Protocol version carried in every reca header and status map (field ``v``).
VERSION: Final = 1

#: MDP/0.2 protocol header of client messages.
MDPC: Final = b"MDPC02"
#: MDP/0.2 protocol header of worker messages.
MDPW: Final = b"MDPW02"


class ClientCmd(bytes, enum.Enum):
    """Client-side command bytes of 18/MDP (spec-exact form)."""

    REQUEST = b"\x01"
    PARTIAL = b"\x02"
    FINAL = b"\x03"


class MajortomoClientCmd(bytes, enum.Enum):
    """Client-side command bytes used by the ``majortomo`` client (it reuses the worker codes)."""

    REQUEST = b"\x02"
    PARTIAL = b"\x03"
    FINAL = b"\x04"


class WorkerCmd(bytes, enum.Enum):
    """Worker-side command bytes of 18/MDP (the same in both forms)."""

    READY = b"\x01"
    REQUEST = b"\x02"
    PARTIAL = b"\x03"
    FINAL = b"\x04"
    HEARTBEAT = b"\x05"
    DISCONNECT = b"\x06"


# -- reca header fields (request body frame 0, a msgpack map) -------------------------------------
#: Protocol version; its presence with value VERSION marks a reca body.
H_VERSION: Final = "v"
#: Client-chosen request id (str or int), echoed in every status map of the reply.
H_ID: Final = "id"
#: Job the request is charged to (str).  Absent: the default job, which has no limits.
H_JOB: Final = "job"
#: Budget the request asks for: map of kind -> amount (``wall_ms``, ``cpu_ms``, ``tokens``,
#: ``flops`` or a named counted resource).  The kernel clamps it to what the job has left.
H_BUDGET: Final = "budget"
#: Scheduling priority, int; higher runs first and may preempt lower (default 0).
H_PRIORITY: Final = "priority"
#: Relative deadline in milliseconds from the kernel's receipt of the request.
H_DEADLINE: Final = "deadline"
#: Idempotency key (str): retries of one logical request reuse it.
H_IDEM: Final = "idem"
#: Transaction id (str) for the transaction manager.
H_TXN: Final = "txn"
#: Set by the kernel on the copy it forwards to a worker: the budget actually granted.
H_GRANTED: Final = "granted"

HEADER_FIELDS: Final = (H_VERSION, H_ID, H_JOB, H_BUDGET, H_PRIORITY, H_DEADLINE, H_IDEM, H_TXN)

# -- reca status fields (reply body frame 0, a msgpack map) ---------------------------------------
#: Request id, as sent in the header.
S_ID: Final = "id"
#: One of STATUS_OK, STATUS_PARTIAL, STATUS_PAUSED, STATUS_ERROR.
S_STATUS: Final = "status"
#: What the request spent: map of kind -> amount.  Workers report ``tokens``, ``flops``,
#: counted resources; the kernel adds ``wall_ms`` it measured itself.
S_SPENT: Final = "spent"
#: On errors: ``{"code": ERROR_CODE, "message": str, ...}``.
S_ERROR: Final = "error"

STATUS_OK: Final = "ok"
STATUS_PARTIAL: Final = "partial"
STATUS_PAUSED: Final = "paused"
#: A PARTIAL sent when a paused request continues (its payload carries ``resumed_at``).
STATUS_RESUMED: Final = "resumed"
STATUS_ERROR: Final = "error"


class ErrorCode(str, enum.Enum):
    """Error codes carried in ``status.error.code``; kernel.errors maps each to an exception."""

    BAD_REQUEST = "bad_request"  # malformed frames, header or payload; never retry unchanged
    UNAVAILABLE = "unavailable"  # no worker for the service within the bounded wait
    WORKER_DIED = "worker_died"  # the worker died or missed its liveness window mid-request
    BUDGET_EXCEEDED = "budget_exceeded"  # the job's budget ran out; the job takes no more work
    DEADLINE = "deadline"  # the request's own deadline passed
    CANCELLED = "cancelled"  # cancelled by the kernel or an operator
    REFUSED = "refused"  # a gate refused (counted resource, priority, closed job)
    SERVICE_ERROR = "service_error"  # the service's handler raised
    TIMEOUT = "timeout"  # client side: no reply within the client's own bound
    OVERLOADED = "overloaded"  # the kernel could not queue the request


# -- control topics on the kernel's PUB socket ----------------------------------------------------
#: Topic prefix of control messages; a message is ``[topic, msgpack map]``.
CTL_PREFIX: Final = "ctl/"
#: Topic addressing every service.
CTL_ALL: Final = "all"


class ControlOp(str, enum.Enum):
    """Control operations published on ``ctl/<service>/<op>`` and ``ctl/all/<op>``."""

    PREEMPT = "preempt"  # pause at the next safe point: {"token", "id"} (one request) or {"job"}
    RESUME = "resume"  # continue from the same state
    CANCEL = "cancel"  # stop and answer CANCELLED / BUDGET_EXCEEDED
    FIDELITY = "fidelity"  # simulation fidelity orders
    PRECISION = "precision"  # per-operator precision orders


def control_topic(service: str, op: ControlOp | str) -> bytes:
    """The PUB topic for ``op`` addressed to ``service`` (or CTL_ALL)."""
    op = op.value if isinstance(op, ControlOp) else op
    return f"{CTL_PREFIX}{service}/{op}".encode()


# -- MMI (8/MMI) ----------------------------------------------------------------------------------
MMI_PREFIX: Final = "mmi."
MMI_SERVICE: Final = "mmi.service"
MMI_STATS: Final = "mmi.stats"
MMI_OK: Final = b"200"
MMI_NOT_FOUND: Final = b"404"
MMI_NOT_IMPLEMENTED: Final = b"501"

# -- defaults (every wait has a bound) ------------------------------------------------------------
#: Heartbeat interval both ways, seconds.  The zguide broker uses 2.5 s; reca defaults lower so
#: a dead worker is noticed within LIVENESS * HEARTBEAT_INTERVAL.
HEARTBEAT_INTERVAL: Final = 1.0
#: Missed intervals after which a peer is dead (18/MDP suggests 3 to 5).
LIVENESS: Final = 3
#: How long a request for a service with no worker waits before UNAVAILABLE, seconds.
UNAVAILABLE_WAIT: Final = 2.0
#: Largest frame the kernel accepts (ZMQ_MAXMSGSIZE: libzmq checks it against the frame's length
#: field before allocating, and drops the peer's connection).
MAX_FRAME_SIZE: Final = 4 * 1024 * 1024
#: Largest total size of one message (all frames); checked frame by frame as the kernel receives
#: it, and frames past the bound are discarded without being copied (docs/limits.md says what
#: libzmq buffers before that).
MAX_MESSAGE_SIZE: Final = 16 * 1024 * 1024
#: Largest number of frames in one message the kernel will look at.
MAX_FRAMES: Final = 64
#: Messages buffered per peer connection each way (ZMQ_SNDHWM / ZMQ_RCVHWM); with the size
#: bounds above this bounds what one peer can make the kernel hold.
PEER_HWM: Final = 1000
#: Concurrent peer connections the kernel accepts (config ``kernel.max_peers``).
MAX_PEERS: Final = 4096
#: Descriptors kept free for the kernel's own use (log segments, child pipes, accept races).
FD_RESERVE: Final = 128
#: Requests queued per service before new ones get OVERLOADED.
MAX_QUEUE: Final = 100_000
#: Services with no worker, no queue and nothing in flight are forgotten after this many seconds.
SERVICE_IDLE_EXPIRY: Final = 60.0
#: Bytes of request bodies the kernel holds in all service queues together; past it new
#: requests that must wait are answered OVERLOADED.
MAX_QUEUED_BYTES: Final = 32 * 1024 * 1024
#: Services without a worker the kernel keeps state for (a request naming yet another one is
#: answered UNAVAILABLE at once).
MAX_WORKERLESS_SERVICES: Final = 1000
#: Services listed per ``mmi.stats`` page (``{"page": n}`` asks for others).
STATS_PAGE: Final = 100
#: Client-side default bound on one request, seconds.
CLIENT_TIMEOUT: Final = 10.0
#: Worker reconnect backoff after DISCONNECT or broker loss: initial and maximum, seconds.
RECONNECT_INITIAL: Final = 0.05
RECONNECT_MAX: Final = 2.0
#: Bound on the READY handshake of a supervised child and of the kernel's own start, seconds.
START_TIMEOUT: Final = 20.0
#: Default wait after SIGTERM before SIGKILL when stopping a child, seconds.
SHUTDOWN_TIMEOUT: Final = 5.0
#: Latency samples kept per service for mmi.stats percentiles.
LATENCY_WINDOW: Final = 2048
