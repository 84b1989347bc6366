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

import dataclasses
import enum
from typing import Any, Callable, Final

from kernel.errors import BadRequest
from kernel.errors import ErrorCode as ErrorCode  # re-exported: the wire codes belong to the protocol

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
#: Job the request is charged to (str).  Absent: the caller's default job (finite limits from the
#: config; operators share ``default``, every other principal has ``default:<name>``).
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
#: Set by the kernel on the copy it forwards to a worker: the name of the caller's verified
#: principal (a client's own value is replaced).  Services scope per-caller state by it.
H_PRINCIPAL: Final = "principal"
#: A service calling on behalf of the caller of a request it is serving: that caller's principal
#: name (str).  The kernel accepts it only while a worker of the calling principal has a request
#: of that principal in flight, and then forwards it as ``principal`` (issue 24).
H_FOR: Final = "for"


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


#: Keys of a control message's map.  Targets: exactly one of C_TOKEN (the kernel's request token:
#: exact), C_JOB (every request of the job) or C_ID (a client's request id: unique per client only).
C_TOKEN: Final = "token"
C_JOB: Final = "job"
C_ID: Final = "id"
#: A ``cancel`` carries the error code its handler raises (CANCEL_CODES) and a human reason.
C_CODE: Final = "code"
C_REASON: Final = "reason"
#: Codes a ``cancel`` may carry.
CANCEL_CODES: Final = frozenset({ErrorCode.BUDGET_EXCEEDED, ErrorCode.DEADLINE, ErrorCode.CANCELLED})


# -- READY options (reca extension: the optional 4th frame of READY, a msgpack map) ---------------
#: Protocol version of the options map.
R_VERSION: Final = "v"
#: Requests the kernel may dispatch to the worker at once.
R_CAPACITY: Final = "capacity"
#: The worker's process id (shown in mmi.stats, used to measure cpu_ms).
R_PID: Final = "pid"
#: Capacity of a worker that declares none (plain MDP workers), and the largest one accepted.
DEFAULT_CAPACITY: Final = 1
MAX_CAPACITY: Final = 4096


# -- environment of supervised children (and of clients) ------------------------------------------
#: The kernel's ROUTER endpoint (set by the supervisor for its children; read by clients too).
ENV_ENDPOINT: Final = "RECA_ENDPOINT"
#: The kernel's control PUB endpoint.
ENV_CONTROL: Final = "RECA_CONTROL"
#: The child's supervised name (``echo`` or ``echo#0`` for replicas).
ENV_SERVICE: Final = "RECA_SERVICE"
#: Heartbeat interval (seconds) and liveness (intervals) the kernel runs with.
ENV_HEARTBEAT: Final = "RECA_HEARTBEAT_S"
ENV_LIVENESS: Final = "RECA_LIVENESS"
#: The supervisor's pid: a child arms PR_SET_PDEATHSIG and exits if its parent is not this pid.
ENV_PARENT: Final = "RECA_SUPERVISOR_PID"
#: The runtime directory (``{runtime}``): where ipc sockets and the decision log live.
ENV_RUNTIME_DIR: Final = "RECA_RUNTIME_DIR"
#: Log level of the kernel and of every service (``INFO`` when unset).
ENV_LOG_LEVEL: Final = "RECA_LOG_LEVEL"
#: A peer's own secret certificate file (CURVE over tcp://; the supervisor sets it per child).
ENV_CERT: Final = "RECA_CERT"
#: The kernel's public certificate file.
ENV_SERVER_CERT: Final = "RECA_SERVER_CERT"
#: A worker's run number, set by the supervisor per start (:func:`incarnation_at`): strictly
#: larger for each later run of a child, across kernel restarts, so an id a worker handed out in an
#: earlier run (a decode session's) is known as one.
ENV_INCARNATION: Final = "RECA_INCARNATION"
_INCARNATION_EPOCH: Final = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def incarnation_at(now: float, last: int = 0) -> int:
    """The incarnation number of a run started at ``now`` (seconds since the Unix epoch): tenths
    of a second since 2026, and above ``last`` (the child's previous run)."""
    return max(last + 1, int((now - _INCARNATION_EPOCH) * 10))


#: Every name the supervisor sets in a child's environment.
CHILD_ENV: Final = (ENV_ENDPOINT, ENV_CONTROL, ENV_SERVICE, ENV_HEARTBEAT, ENV_LIVENESS, ENV_PARENT)


# -- MMI (8/MMI) and reca's management operations -------------------------------------------------
MMI_PREFIX: Final = "mmi."
MMI_SERVICE: Final = "mmi.service"
MMI_STATS: Final = "mmi.stats"
MMI_JOB_OPEN: Final = "mmi.job.open"
MMI_JOB_CLOSE: Final = "mmi.job.close"
MMI_JOB_STATS: Final = "mmi.job.stats"
MMI_GATE_RESERVE: Final = "mmi.gate.reserve"
MMI_GATE_COMMIT: Final = "mmi.gate.commit"
MMI_GATE_RELEASE: Final = "mmi.gate.release"
MMI_GATE_RENEW: Final = "mmi.gate.renew"
MMI_AUDIT: Final = "mmi.audit"
MMI_PREEMPT: Final = "mmi.preempt"
MMI_RESUME: Final = "mmi.resume"
MMI_CANCEL: Final = "mmi.cancel"
MMI_CONTROL: Final = "mmi.control"
MMI_PROC_STOP: Final = "mmi.proc.stop"
MMI_PROC_CONT: Final = "mmi.proc.cont"
MMI_PROC_NICE: Final = "mmi.proc.nice"
MMI_PROC_AFFINITY: Final = "mmi.proc.affinity"
MMI_RESTART: Final = "mmi.restart"
#: Answers of mmi.service (RFC 8/MMI) and of an unknown ``mmi.*`` name.
MMI_OK: Final = b"200"
MMI_NOT_FOUND: Final = b"404"
MMI_NOT_IMPLEMENTED: Final = b"501"


class Role(enum.StrEnum):
    """Who a principal is (issue 13 authenticates them; this table only declares what each
    operation needs).  Ranked (:data:`ROLES`): an operator may do anything a service may, a service
    anything a client may.  A service principal is written ``service:NAME[,NAME...]``
    (SERVICE_ROLE_PREFIX); ``revoked`` is a connection whose key the kernel no longer knows and
    ``kernel`` the kernel's own key pair (never a peer)."""

    REVOKED = "revoked"  # its key was removed while it was connected: may do nothing
    CLIENT = "client"  # any peer: its own jobs and requests only
    SERVICE = "service"  # a service process: registers as its own services, audits under its own source
    OPERATOR = "operator"  # process control, control orders, any job
    KERNEL = "kernel"  # the kernel's own key pair in a key directory

    @property
    def rank(self) -> int:
        return ROLES[self].rank


@dataclasses.dataclass(frozen=True, slots=True)
class RoleSpec:
    """One row of the roles table."""

    rank: int  # what an operation's ``authority`` is compared with
    peer: bool  # a peer may hold it (``kernel`` is the kernel's own)
    doc: str


#: The one table of roles.  A principal's role text is a member's value, or
#: ``service:NAME[,NAME...]`` for SERVICE.
ROLES: Final[dict[Role, RoleSpec]] = {
    Role.REVOKED: RoleSpec(-1, True, "a connection whose key was revoked: every message is refused"),
    Role.CLIENT: RoleSpec(0, True, "its own jobs, reservations and requests"),
    Role.SERVICE: RoleSpec(1, True, "a client that may also serve its named services and audit as them"),
    Role.OPERATOR: RoleSpec(2, True, "everything"),
    Role.KERNEL: RoleSpec(3, False, "the kernel's own key pair (never a peer)"),
}
SERVICE_ROLE_PREFIX: Final = "service:"


def role_kind(role: str) -> Role:
    """The :class:`Role` of a principal's role text (``service:a,b`` is SERVICE; unknown text
    ranks as REVOKED: it may do nothing)."""
    if role.startswith(SERVICE_ROLE_PREFIX):
        return Role.SERVICE
    try:
        return Role(role)
    except ValueError:
        return Role.REVOKED


# -- budget kinds ------------------------------------------------------------------------------------
#: The kernel's clock-measured kind: busy wall time, accrued continuously by every request in flight.
WALL_MS: Final = "wall_ms"
#: CPU time, measured by the kernel (the worker's process CPU time through the host port) where a
#: job below root limits it, else as the worker reports it.
CPU_MS: Final = "cpu_ms"


@dataclasses.dataclass(frozen=True, slots=True)
class KindSpec:
    """One row of the budget kinds table."""

    name: str
    #: Running out stops the job (its work is cancelled); any kind not in the table is a counted
    #: resource: running out of it only refuses further reservations of it.
    compute: bool
    #: Who measures it: "clock" (the ledger, continuously), "process" (the kernel, from the
    #: worker's CPU time), "worker" (the worker reports it in its status) or "ceiling" (nothing
    #: is spent: the operating system holds the work under it).
    measured_by: str
    #: Limit of the default jobs when the config names none.
    default_limit: float
    #: Root's default limit per core-second of the config's horizon.
    per_core_s: float
    doc: str


#: The one table of budget kinds: a new kind is one row here (the ledger, the admission and the
#: config read it).
BUDGET_KINDS: Final[dict[str, KindSpec]] = {k.name: k for k in (
    KindSpec(WALL_MS, True, "clock", 3_600_000.0, 1000.0, "busy wall time, milliseconds"),
    KindSpec(CPU_MS, True, "process", 3_600_000.0, 1000.0, "CPU time, milliseconds"),
    KindSpec("tokens", True, "worker", 1e8, 1e4, "tokens generated or processed"),
    KindSpec("flops", True, "worker", 1e15, 1e11, "floating-point operations"),
    KindSpec("vm_steps", True, "worker", 1e9, 1e6, "instructions of sparkvm's reasoning tapes (docs/spark.md)"),
    # A ceiling, not an amount spent: it travels in the grant; services that know a request's
    # size refuse over it before allocating (memory_exceeded), the enforcer's memory.max /
    # RLIMIT_AS caps the service's group (kernel/enforce.py, docs/budgets.md).
    KindSpec("mem_bytes", False, "ceiling", 0.0, 0.0, "memory ceiling of the request, bytes"),
)}
#: Kinds whose exhaustion stops the job.
COMPUTE_KINDS: Final = tuple(k for k, spec in BUDGET_KINDS.items() if spec.compute)


def budget_kind_typo(name: str) -> str | None:
    """The budget kind ``name`` is a likely misspelling of, else None.  Any name that is not a
    budget kind is a counted resource (docs/budgets.md), so a misspelt ``flops`` would silently
    limit nothing: a name that is a kind but for case, ``-`` for ``_``, a missing plural ``s``,
    one wrong letter or two swapped neighbours is refused instead.  Other units of a kind
    (``cpu_s``, ``wall_s``: one letter *missing* inside) stay counted resources."""
    if name in BUDGET_KINDS:
        return None
    low = name.lower().replace("-", "_")
    for kind in BUDGET_KINDS:
        if low == kind or low + "s" == kind:
            return kind
        if len(low) == len(kind):
            diff = [i for i, (a, b) in enumerate(zip(low, kind)) if a != b]
            if len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1
                                  and low[diff[0]] == kind[diff[1]] and low[diff[1]] == kind[diff[0]]):
                return kind
    return None


class Scope(enum.StrEnum):
    """What an operation may touch for a caller below OPERATOR."""

    NONE = "none"  # reads or acts on nothing anyone owns (mmi.service, mmi.stats)
    OWN = "own"  # only the caller's own jobs, reservations and requests
    SOURCE = "source"  # a service writes only under its own name (mmi.audit ``source``)
    ANY = "any"  # anything (operator-only operations)


#: Argument kinds of the schema and the Python types each accepts (bool is never a number).
KINDS: Final[dict[str, tuple[type, ...]]] = {
    "str": (str,),
    "int": (int,),
    "number": (int, float),
    "bool": (bool,),
    "map": (dict,),
    "list": (list,),
    "token": (bytes, str),  # a kernel request token: bytes, or hex text (what JSON can carry)
    "rid": (str, int),  # a client's request id
}


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()


@dataclasses.dataclass(frozen=True, slots=True)
class Arg:
    """One field of a management operation's argument map."""

    name: str
    kind: str
    doc: str
    required: bool = False
    default: Any = MISSING  # filled in when the field is absent
    nullable: bool = False  # an explicit nil counts as absent
    min_len: int | None = None  # for str, bytes, list and map (ignored for other kinds)
    max_len: int | None = None
    choices: tuple[Any, ...] | None = None
    items: str | None = None  # kind of every element of a list
    #: Longest element of a list (str elements) or key of a map: every key must be a str of at
    #: most this many characters.
    item_max_len: int | None = None
    #: Bounds of a number (int or number kinds), inclusive.
    min_value: float | None = None
    max_value: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class OpSpec:
    """A management operation: its name, argument, the authority it needs and what it does."""

    name: str
    doc: str
    authority: Role
    scope: Scope
    args: tuple[Arg, ...] = ()
    #: The argument is not a map but a single value of this kind (mmi.service); None: a map.
    scalar: str | None = None
    #: Exactly one of these fields must be given.
    one_of: tuple[str, ...] = ()
    #: The Ledger operation it runs (its inputs are recorded and replayed), None if none.
    ledger_op: str | None = None


def _kind_ok(kind: str, value: Any) -> bool:
    return isinstance(value, KINDS[kind]) and not (isinstance(value, bool) and kind != "bool")


def check_args(spec: OpSpec, arg: Any) -> dict[str, Any]:
    """Validate ``arg`` against ``spec``'s schema: the declared fields that are present (nil
    counts as absent where ``nullable``) plus the defaults of absent ones.  Undeclared fields are
    ignored.  Raises :class:`kernel.errors.BadRequest` naming the operation and the field."""
    if not isinstance(arg, dict):
        arg = {}  # 8/MMI bodies of opaque requests are not maps: they count as an empty map
    out: dict[str, Any] = {}
    for a in spec.args:
        value = arg.get(a.name, MISSING)
        if value is None and a.nullable:
            value = MISSING
        if value is MISSING:
            if a.required:
                raise BadRequest(f"{spec.name} needs {a.name!r} ({a.doc})")
            if a.default is not MISSING:
                out[a.name] = a.default
            continue
        if not _kind_ok(a.kind, value):
            raise BadRequest(f"{spec.name}: {a.name!r} must be of kind {a.kind} ({a.doc}), got {type(value).__name__}")
        if a.items is not None and not all(_kind_ok(a.items, v) for v in value):
            raise BadRequest(f"{spec.name}: every element of {a.name!r} must be of kind {a.items}")
        n = len(value) if isinstance(value, (str, bytes, list, dict)) else None
        if n is not None and ((a.min_len is not None and n < a.min_len) or (a.max_len is not None and n > a.max_len)):
            raise BadRequest(f"{spec.name}: {a.name!r} must have {a.min_len or 0}..{a.max_len} elements or characters")
        if a.item_max_len is not None and not all(isinstance(v, str) and len(v) <= a.item_max_len for v in value):
            raise BadRequest(f"{spec.name}: every {'key' if isinstance(value, dict) else 'element'} of {a.name!r} "
                             f"must be a string of at most {a.item_max_len} characters")
        if (a.min_value is not None or a.max_value is not None) and _kind_ok("number", value) and not (
            (a.min_value is None or value >= a.min_value) and (a.max_value is None or value <= a.max_value)
        ):
            raise BadRequest(f"{spec.name}: {a.name!r} must lie in [{a.min_value}, {a.max_value}]")
        if a.choices is not None and value not in a.choices:
            raise BadRequest(f"{spec.name}: {a.name!r} must be one of {', '.join(map(str, a.choices))}")
        out[a.name] = value
    if spec.one_of and sum(1 for k in spec.one_of if k in out) != 1:
        raise BadRequest(f"{spec.name} needs exactly one of {', '.join(map(repr, spec.one_of))}")
    return out


# -- limits and defaults (every wait has a bound) -------------------------------------------------
#: Heartbeat interval both ways, seconds.  The zguide broker uses 2.5 s; reca defaults lower so
#: a dead worker is noticed within LIVENESS * HEARTBEAT_INTERVAL.
HEARTBEAT_INTERVAL: Final = 1.0
#: Missed intervals after which a peer is dead (18/MDP suggests 3 to 5).
LIVENESS: Final = 3
#: The kernel checks liveness every HEARTBEAT_INTERVAL / SWEEPS_PER_INTERVAL.
SWEEPS_PER_INTERVAL: Final = 4
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
#: At its peer cap the kernel renames each ipc:// socket to PATH + this suffix (no new
#: connections; connected peers stay) and back below it; a client seeing it is told so.
IPC_PAUSED_SUFFIX: Final = ".paused"
#: Descriptors kept free for the kernel's own use (log segments, child pipes, accept races).
FD_RESERVE: Final = 128
#: Requests queued per service before new ones get OVERLOADED.
MAX_QUEUE: Final = 100_000
#: Decision log: bytes per segment before a new one starts (with a snapshot), the fsync policy
#: ("always", "interval", "never"; docs/limits.md) and the interval of "interval", seconds.
LOG_SEGMENT_BYTES: Final = 8 * 1024 * 1024
LOG_FSYNC: Final = "interval"
LOG_FSYNC_INTERVAL: Final = 1.0
#: How long a restarted kernel answers KERNEL_RESTARTED to a retry of a request (same idempotency
#: key) that was in flight when the kernel died, seconds.
INTERRUPTED_TTL: Final = 3600.0
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
#: Messages the kernel handles per readiness callback before letting timers run.
RECV_BATCH: Final = 512
#: Bounds of a header's ``priority`` (and the default).
PRIORITY_MIN: Final = -1000
PRIORITY_MAX: Final = 1000
DEFAULT_PRIORITY: Final = 0
#: A header's ``deadline`` must lie in (0, MAX_DEADLINE_MS) milliseconds.
MAX_DEADLINE_MS: Final = 1e10
#: A job limit (and a [limits] amount) must be a finite number in [0, MAX_LIMIT).
MAX_LIMIT: Final = 1e300
#: A gate reservation's ``amount`` must lie in (0, MAX_AMOUNT).
MAX_AMOUNT: Final = 1e15
#: Longest name the kernel keeps or logs (a job, a resource or budget kind, a reservation id, a
#: service in an order, a client's request id), characters; and most kinds in one budget or
#: limits map, most ids in one ``mmi.gate.renew``.  Every name ends up in the decision log and
#: in the kernel's memory, so none is unbounded.
MAX_NAME: Final = 256
MAX_KINDS: Final = 64
MAX_RENEW: Final = 10_000
#: Most open jobs one principal below operator may own (children and its default job included).
MAX_JOBS_PER_PRINCIPAL: Final = 10_000
#: Most (job, kind) entries the open jobs of one principal below operator hold -- budget limits and
#: kinds charged, each job counting its own (issue 24: 10,000 jobs x 64 long-named kinds filled the
#: log).  Past it ``mmi.job.open`` with limits is ``refused``, and a new kind charged to a job is
#: not kept in its totals (``ledger.kinds_dropped``); a kind that limits something is always charged.
MAX_KINDS_PER_PRINCIPAL: Final = 32_768
#: Reservations one principal below operator may hold at once (issue 24: 100,000 held ones made
#: every snapshot 1.5 GB); beyond, ``mmi.gate.reserve`` of a held reservation is ``refused``.
MAX_HELD_PER_PRINCIPAL: Final = 10_000
#: How long a gate reservation lives without commit, release or renewal, seconds (the default),
#: and the bounds on a lease a holder may ask for.
RESERVATION_LEASE: Final = 30.0
MIN_LEASE: Final = 0.1
MAX_LEASE: Final = 3600.0
#: Bounds on one ``mmi.audit`` call: events per call, length of the source name, and bytes of
#: the events as JSON.
MAX_AUDIT_EVENTS: Final = 512
MAX_AUDIT_SOURCE: Final = 64
MAX_AUDIT_BYTES: Final = 256 * 1024
#: Default audit quota: records one principal may write per minute (config [limits]).
AUDIT_EVENTS_PER_MIN: Final = 60_000
#: Bytes of audit records (as JSON) per principal per minute (issue 24: at the event quota a
#: service key could still write 8.3 GB/h); beyond, ``mmi.audit`` is ``refused`` ("quota").
AUDIT_BYTES_PER_MIN: Final = 16 * 1024 * 1024
#: ``forbidden`` / ``audit_refused`` records per principal per minute; beyond, they are counted
#: (``counters.records_suppressed``) and the next record carries the count as ``suppressed``.
FORBIDDEN_RECORDS_PER_MIN: Final = 60
#: Management calls per principal below operator per second (a bucket of as many): beyond,
#: ``overloaded`` (issue 24: one client looping calls must not take the kernel's one thread).
MMI_CALLS_PER_S: Final = 1000
#: Default longest pause: a request paused longer is resumed by the kernel, seconds (config [limits]).
MAX_PAUSE: Final = 60.0
#: Client-side default bound on one request, seconds, and its default number of retries.
CLIENT_TIMEOUT: Final = 10.0
CLIENT_RETRIES: Final = 2
#: Worker reconnect backoff after DISCONNECT or broker loss: initial and maximum, seconds.
RECONNECT_INITIAL: Final = 0.05
RECONNECT_MAX: Final = 2.0
#: Bound on the READY handshake of a supervised child and of the kernel's own start, seconds.
START_TIMEOUT: Final = 20.0
#: Default wait after SIGTERM before SIGKILL when stopping a child, seconds.
SHUTDOWN_TIMEOUT: Final = 5.0
#: Supervisor defaults: at most RESTART_INTENSITY restarts in RESTART_PERIOD seconds; restart
#: backoff from BACKOFF_INITIAL doubling to BACKOFF_MAX, reset after STABLE_AFTER seconds of run.
RESTART_INTENSITY: Final = 5
RESTART_PERIOD: Final = 10.0
BACKOFF_INITIAL: Final = 0.05
BACKOFF_MAX: Final = 5.0
STABLE_AFTER: Final = 10.0
#: Latency samples kept per service for mmi.stats percentiles.
LATENCY_WINDOW: Final = 2048


# -- the management operations table --------------------------------------------------------------
_JOB = Arg("job", "str", "job name", required=True, min_len=1, max_len=MAX_NAME)
_RESERVATION = Arg("reservation", "str", "a reservation id from mmi.gate.reserve", required=True, max_len=MAX_NAME)
_LEASE = Arg("lease_s", "number", f"lease in seconds, in [{MIN_LEASE:g}, {MAX_LEASE:g}]")
_CHILD = Arg("child", "str", "a supervised child's name", required=True)
_TARGETS = (
    Arg(C_TOKEN, "token", "a request's kernel token (bytes, or hex text): exact", max_len=MAX_NAME),
    Arg(C_JOB, "str", "every request of the job", max_len=MAX_NAME),
    Arg(C_ID, "rid", "a request id of the caller's own requests in flight", max_len=MAX_NAME),
    Arg("service", "str", "only requests of this service", default=CTL_ALL, max_len=MAX_NAME),
)


def _order(name: str, what: str) -> OpSpec:
    return OpSpec(name, f"{what} the targeted request(s) at their next safe point (published on ctl/)",
                  Role.CLIENT, Scope.OWN, _TARGETS, one_of=(C_TOKEN, C_JOB, C_ID))


def _proc(name: str, what: str, *extra: Arg) -> OpSpec:
    return OpSpec(name, what, Role.OPERATOR, Scope.ANY, (_CHILD, *extra))


#: Every management operation the kernel answers, by name.  Any other ``mmi.*`` name is
#: answered MMI_NOT_IMPLEMENTED.  docs/protocol.md lists exactly these (a test checks).
MMI_OPS: Final[dict[str, OpSpec]] = {spec.name: spec for spec in (
    OpSpec(MMI_SERVICE, "'200' if a worker serves the named service, '404' if not",
           Role.CLIENT, Scope.NONE, scalar="str"),
    OpSpec(MMI_STATS, "a summary, one page of services, workers, counters, processes and jobs",
           Role.CLIENT, Scope.NONE, (
               Arg("page", "int", f"which page of services ({STATS_PAGE} per page, by name)", default=0),
               Arg("service", "str", "only this service", nullable=True),
               Arg("jobs_page", "int", f"which page of jobs ({STATS_PAGE} per page; below operator: of the "
                   "caller's own jobs)", default=0),
           )),
    OpSpec(MMI_JOB_OPEN, "open a job; its budget is carved from the parent", Role.CLIENT, Scope.OWN, (
        _JOB,
        Arg("parent", "str", "parent job (default: root)", nullable=True, max_len=MAX_NAME),
        Arg("budget", "map", f"limits: kind -> amount >= 0 (at most {MAX_KINDS} kinds)", nullable=True,
            max_len=MAX_KINDS, item_max_len=MAX_NAME),
        Arg("limits", "map", "alias of budget", nullable=True, max_len=MAX_KINDS, item_max_len=MAX_NAME),
        Arg("priority", "number", "the job's priority (an integer)", default=DEFAULT_PRIORITY),
    ), ledger_op="open"),
    OpSpec(MMI_JOB_CLOSE, "close a job and its children; unspent budget returns", Role.CLIENT, Scope.OWN,
           (Arg("job", "str", "job name", nullable=True, max_len=MAX_NAME),), ledger_op="close"),
    OpSpec(MMI_JOB_STATS, "one job's ledger, or one page of the caller's jobs (an operator: of every job)",
           Role.CLIENT, Scope.OWN, (
               Arg("job", "str", "job name (absent: a page of jobs)", nullable=True, max_len=MAX_NAME),
               Arg("page", "int", f"without job: which page of jobs ({STATS_PAGE} per page; a shorter page "
                   "is the last)", default=0),
           )),
    OpSpec(MMI_GATE_RESERVE, "take units of a counted resource: granted (held or committed) or refused",
           Role.CLIENT, Scope.OWN, (
               Arg("job", "str", "job to reserve in", default="default", max_len=MAX_NAME),
               Arg("resource", "str", "counted resource name", required=True, min_len=1, max_len=MAX_NAME),
               Arg("amount", "number", f"units, in (0, {MAX_AMOUNT:g})", default=1),
               Arg("commit", "bool", "spend at once instead of holding", default=False),
               Arg("up_to", "bool", "grant min(amount, what is left) instead of all or nothing",
                   default=False),
               _LEASE,
           ), ledger_op="reserve"),
    OpSpec(MMI_GATE_COMMIT, "spend a held reservation", Role.CLIENT, Scope.OWN, (_RESERVATION,),
           ledger_op="commit"),
    OpSpec(MMI_GATE_RELEASE, "return a held reservation", Role.CLIENT, Scope.OWN, (_RESERVATION,),
           ledger_op="release"),
    OpSpec(MMI_GATE_RENEW, "extend the lease of held reservations", Role.CLIENT, Scope.OWN, (
        Arg("reservations", "list", f"reservation ids (at most {MAX_RENEW})", required=True,
            max_len=MAX_RENEW, items="str", item_max_len=MAX_NAME),
        Arg("lease_s", "number", _LEASE.doc, default=RESERVATION_LEASE),
    ), ledger_op="renew"),
    OpSpec(MMI_AUDIT, "append a service's own decisions to the kernel's decision log",
           Role.SERVICE, Scope.SOURCE, (
               Arg("source", "str", f"the writer's name (1..{MAX_AUDIT_SOURCE} characters)", required=True,
                   min_len=1, max_len=MAX_AUDIT_SOURCE),
               Arg("events", "list", f"1..{MAX_AUDIT_EVENTS} maps, at most {MAX_AUDIT_BYTES} bytes as JSON; "
                   f"[limits] audit_events_per_min (default {AUDIT_EVENTS_PER_MIN}) per principal per minute",
                   required=True, min_len=1, max_len=MAX_AUDIT_EVENTS, items="map"),
           )),
    _order(MMI_PREEMPT, "pause"),
    _order(MMI_RESUME, "resume"),
    _order(MMI_CANCEL, "cancel"),
    OpSpec(MMI_CONTROL, "relay a fidelity or precision order on ctl/<service>/<op>", Role.OPERATOR, Scope.ANY, (
        Arg("op", "str", "the order", required=True, choices=(ControlOp.FIDELITY.value, ControlOp.PRECISION.value)),
        Arg("service", "str", "the service addressed", default=CTL_ALL, max_len=MAX_NAME),
        Arg("message", "map", "the order itself", required=True),
    )),
    _proc(MMI_PROC_STOP, "SIGSTOP a supervised process group"),
    _proc(MMI_PROC_CONT, "SIGCONT a supervised process group"),
    _proc(MMI_PROC_NICE, "set a supervised process's nice value", Arg("nice", "int", "nice value, in [-20, 19]", required=True,
                                                                      min_value=-20, max_value=19)),
    _proc(MMI_RESTART, "start a given-up (or exited) supervised child again, with a fresh restart "
                       "intensity"),
    _proc(MMI_PROC_AFFINITY, "set a supervised process's CPU set",
          Arg("cpus", "list", "CPU numbers", required=True, items="int", min_len=1, max_len=4096)),
)}


# -- the reca header schema -----------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True, slots=True)
class HeaderField:
    """One field of the reca request header: how a present value is checked and the
    ``bad_request`` text a value that fails gets.  An absent (or nil) field takes ``default``."""

    name: str
    check: Callable[[Any], bool]
    error: str
    default: Any = None


#: The reca request header, checked in this order (the first failing field names the error).
#: kernel.mdp parses a header once against it into a typed ``Header``.
HEADER: Final[tuple[HeaderField, ...]] = (
    HeaderField(H_VERSION, lambda v: v == VERSION, "unsupported protocol version {value!r}"),
    HeaderField(H_ID, lambda v: _is_int(v) or isinstance(v, str) and len(v) <= MAX_NAME,
                f"header field 'id' must be an integer or a string of at most {MAX_NAME} characters"),
    HeaderField(H_JOB, lambda v: isinstance(v, str) and len(v) <= MAX_NAME,
                f"header field 'job' must be a string of at most {MAX_NAME} characters"),
    HeaderField(H_PRIORITY, lambda v: _is_int(v) and PRIORITY_MIN <= v <= PRIORITY_MAX,
                f"header field 'priority' must be an integer in [{PRIORITY_MIN}, {PRIORITY_MAX}]",
                default=DEFAULT_PRIORITY),
    HeaderField(H_DEADLINE, lambda v: _is_number(v) and 0 < v < MAX_DEADLINE_MS,
                "header field 'deadline' must be a positive number of milliseconds"),
    HeaderField(H_BUDGET, lambda v: isinstance(v, dict) and len(v) <= MAX_KINDS and all(
        isinstance(k, str) and len(k) <= MAX_NAME and _is_number(a) and a >= 0 for k, a in v.items()),
        f"header field 'budget' must map at most {MAX_KINDS} kinds to non-negative numbers"),
    HeaderField(H_IDEM, lambda v: isinstance(v, str), "header field 'idem' must be a string"),
    HeaderField(H_TXN, lambda v: isinstance(v, str), "header field 'txn' must be a string"),
    HeaderField(H_FOR, lambda v: isinstance(v, str) and len(v) <= MAX_NAME,
                f"header field 'for' must be a principal name of at most {MAX_NAME} characters"),
)


#: The public API: every name of the wire (constants, enums, tables, ``check_args``).  (``globals()``,
#: not ``dir()``: compiled, the module's top level runs as a function, whose ``dir()`` is its locals.)
__all__ = sorted(
    n for n in globals() if not n.startswith("_") and n not in {"annotations", "dataclasses", "enum", "Any", "Callable", "Final"}
)
