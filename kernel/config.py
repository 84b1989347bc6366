"""The kernel's TOML configuration: endpoints, heartbeat, supervisor policy, services.

``{runtime}`` in any string expands to the runtime directory: ``$RECA_RUNTIME_DIR``, else
``$XDG_RUNTIME_DIR/reca``, else ``/tmp/reca-<uid>``.  The shipped default (kernel/default.toml)
runs every service on this machine over ``ipc://`` and needs no set-up.

Strict: :data:`SCHEMA` lists every key of every table (type, default, meaning); a key not in it,
a value of the wrong type, out of range or outside its choices is a :class:`ConfigError` naming
the key, the table and the file.  The decision log is kept (``{runtime}/decisions.jsonl``) unless
a config says ``decision_log = false`` explicitly; ``status`` says which.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import tomllib
from pathlib import Path
from typing import Any

from kernel import protocol as P
from kernel import quotas
from kernel.rayplace import RayClusterConfig, RayResources, parse_label
from kernel.supervisor import ChildSpec, RestartType, python_module_argv


class ConfigError(ValueError):
    """The configuration file is malformed; the message names the offending key."""


def runtime_dir() -> str:
    explicit = os.environ.get(P.ENV_RUNTIME_DIR)
    if explicit:
        return explicit
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return os.path.join(xdg, "reca")
    return f"/tmp/reca-{os.getuid()}"


def default_control_for(endpoint: str) -> str:
    """The control (PUB) endpoint that goes with a client/worker endpoint by convention:
    ``ipc://DIR/kernel.sock`` -> ``ipc://DIR/control.sock``; ``tcp://H:PORT`` -> ``tcp://H:PORT+1``;
    ``tcp://H:0`` (a port the OS picks) -> ``tcp://H:0`` too: PORT+1 would be the fixed port 1, so
    two such kernels at once collided (the second failed to start: "Address already in use")."""
    if endpoint.startswith("ipc://"):
        base = os.path.dirname(endpoint[len("ipc://"):])
        return f"ipc://{os.path.join(base, 'control.sock')}"
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://"):].rpartition(":")
        if port.isdigit():
            return f"tcp://{host}:{int(port) + 1 if int(port) else 0}"
    raise ConfigError(f"cannot derive a control endpoint from {endpoint!r}; set it explicitly")


@dataclasses.dataclass
class KernelConfig:
    endpoint: str
    control: str
    heartbeat: float = P.HEARTBEAT_INTERVAL
    liveness: int = P.LIVENESS
    unavailable_wait: float = P.UNAVAILABLE_WAIT
    #: None only when a config says ``decision_log = false`` (no durability, no replay).
    decision_log: str | None = None
    max_peers: int = P.MAX_PEERS
    peer_hwm: int = P.PEER_HWM
    #: Per-connection byte budgets (kernel.quotas, docs/limits.md).
    peer_out_bytes: int = quotas.PEER_OUT_BYTES
    peer_in_bytes: int = quotas.PEER_IN_BYTES
    peer_out_grace: float = quotas.PEER_OUT_GRACE_S
    peers_out_bytes: int = quotas.PEERS_OUT_BYTES
    peers_in_bytes: int = quotas.PEERS_IN_BYTES
    inbound_rss_ceiling: int | None = None
    fsync: str = P.LOG_FSYNC
    segment_bytes: int = P.LOG_SEGMENT_BYTES
    intensity: int = P.RESTART_INTENSITY
    period: float = P.RESTART_PERIOD
    backoff_initial: float = P.BACKOFF_INITIAL
    backoff_max: float = P.BACKOFF_MAX
    services: list[ChildSpec] = dataclasses.field(default_factory=list)
    runtime: str = ""
    #: [auth]: the key directory (public certificates of the principals), the kernel's secret
    #: certificate (default ``{keys}/kernel.key_secret``), and ``insecure`` (tcp:// without CURVE).
    keys: str | None = None
    server_cert: str | None = None
    insecure: bool = False
    #: [limits]: finite limits of the ``root`` and ``default`` jobs, the longest a request may stay
    #: paused (then the kernel resumes it), and the mmi.audit records per principal per minute.
    root_limits: dict[str, float] = dataclasses.field(default_factory=dict)
    default_limits: dict[str, float] = dataclasses.field(default_factory=dict)
    max_pause: float = P.MAX_PAUSE
    pause_slot: float = 1.0
    audit_quota: int = P.AUDIT_EVENTS_PER_MIN
    #: [enforce]: the OS backend (``auto``, ``cgroup2``, ``cgroup1``, ``signals``), the escalation
    #: ladder's graces and the kernel's cpu weight (docs/budgets.md; read by kernel.enforce).
    enforce_backend: str = "auto"
    freeze_grace_ms: float = 10.0
    kill_grace_ms: float = 1000.0
    cpu_ceiling_ms: float = 5000.0
    hold_ceiling_s: float = 30.0
    remote_answer_grace_ms: float = 500.0
    kernel_weight: int = 1000
    #: principal -> weight in the fair share of each service's slots (kernel.fairq; default 1).
    principal_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    #: [ray]: the Ray cluster Ray-placed services run on (None: no [ray] table).
    ray: RayClusterConfig | None = None
    #: What each Ray-placed [[service]] (by name) asks of Ray.
    ray_resources: dict[str, RayResources] = dataclasses.field(default_factory=dict)

    @property
    def tcp(self) -> bool:
        return self.endpoint.startswith("tcp://") or self.control.startswith("tcp://")


#: The machine's capacity over this horizon is the default limit of the ``root`` job, seconds.
ROOT_HORIZON_S = 7 * 86400.0
#: Default limits of the ``default`` job (plain MDP requests and requests without a job): the
#: budget kinds table's (kernel.protocol.BUDGET_KINDS).
DEFAULT_JOB_LIMITS = {k.name: k.default_limit for k in P.BUDGET_KINDS.values() if k.compute}
COMPUTE_KINDS = P.COMPUTE_KINDS


def machine_limits(horizon_s: float = ROOT_HORIZON_S) -> dict[str, float]:
    """The ``root`` job's default limits: what this machine's cores can do in ``horizon_s`` (each
    compute kind at its table rate per core-second)."""
    cores = os.cpu_count() or 1
    return {k.name: cores * k.per_core_s * horizon_s for k in P.BUDGET_KINDS.values() if k.compute}


# -- the schema: one row per setting ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setting:
    """One configuration key: the table it belongs to, its type, its default and what it means.
    ``type``: ``str``, ``int``, ``float``, ``bool``, ``enum`` (one of ``choices``), ``str|false``,
    ``list[str]``, ``list[int]``, ``map[str]`` (a table of strings), ``limits`` (a table of budget
    kind = amount).  ``low``/``high`` bound a number (``low_open``: strictly above ``low``);
    ``field``: the :class:`KernelConfig` attribute (default: the key)."""

    table: str
    key: str
    type: str
    default: Any
    meaning: str
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    field: str | None = None


_FSYNC = ("always", "interval", "never")
_RESTART = tuple(r.value for r in RestartType)

#: Every key of every table.  docs/config.md is generated from this table; parse() reads nothing
#: else, and refuses any key not in it.
SCHEMA: tuple[Setting, ...] = (
    Setting("kernel", "endpoint", "str", "ipc://{runtime}/kernel.sock",
            "where clients and workers connect (ipc:// or tcp://)"),
    Setting("kernel", "control", "str", None,
            "the control (PUB) endpoint; default: control.sock beside an ipc:// endpoint, port + 1 for tcp:// "
            "(port 0, an OS-picked port, gets an OS-picked port of its own)"),
    Setting("kernel", "heartbeat_s", "float", P.HEARTBEAT_INTERVAL, "heartbeat interval, seconds",
            low=0, low_open=True, field="heartbeat"),
    Setting("kernel", "liveness", "int", P.LIVENESS, "missed heartbeats before a peer is dead", low=1),
    Setting("kernel", "unavailable_wait_s", "float", P.UNAVAILABLE_WAIT,
            "how long a request waits for a worker of its service before `unavailable`, seconds", low=0,
            field="unavailable_wait"),
    Setting("kernel", "decision_log", "str|false", "{runtime}/decisions.jsonl",
            "the decision log (durability, restore after a restart, replay); false: none, said by `status`"),
    Setting("kernel", "max_peers", "int", P.MAX_PEERS, "concurrent peer connections; more are refused", low=1),
    Setting("kernel", "peer_hwm", "int", P.PEER_HWM, "messages buffered per peer connection each way", low=1),
    Setting("kernel", "peer_out_bytes", "int", quotas.PEER_OUT_BYTES,
            "bytes of replies held for one connection not yet out of the process; past it for "
            "peer_out_grace_s (or twice it) the peer is dropped", low=65536),
    Setting("kernel", "peer_in_bytes", "int", quotas.PEER_IN_BYTES,
            "bytes of one connection's queued requests, and (tcp) bytes it sent the kernel has not yet "
            "seen; past either the peer is dropped", low=65536),
    Setting("kernel", "peer_out_grace_s", "float", quotas.PEER_OUT_GRACE_S,
            "how long a connection may stay past peer_out_bytes, seconds", low=0, field="peer_out_grace"),
    Setting("kernel", "peers_out_bytes", "int", quotas.PEERS_OUT_BYTES,
            "peer_out_bytes over every connection together; past it the one holding the most is dropped",
            low=65536),
    Setting("kernel", "peers_in_bytes", "int", quotas.PEERS_IN_BYTES,
            "bytes sent the kernel has not yet seen, over every tcp connection together; past it the one "
            "holding the most is dropped", low=65536),
    Setting("kernel", "inbound_rss_ceiling", "int", None,
            "bytes the kernel's resident set may grow above its baseline (the least seen) before the tcp "
            "connection holding the most unread bytes (sent, not yet seen by the kernel) is cut, again after 0.5 s until under "
            "it (libzmq's per-frame cost the wire meter does not see); default 2 x peers_in_bytes, at least 64 MiB", low=1 << 20),
    Setting("kernel", "fsync", "enum", P.LOG_FSYNC, "when the decision log is flushed to disk", choices=_FSYNC),
    Setting("kernel", "log_segment_bytes", "int", P.LOG_SEGMENT_BYTES,
            "a new log segment, opened by a snapshot, past this size", low=4096, field="segment_bytes"),
    Setting("supervisor", "intensity", "int", P.RESTART_INTENSITY,
            "at most this many restarts of one child within period_s, else it is given up", low=1),
    Setting("supervisor", "period_s", "float", P.RESTART_PERIOD, "the window of intensity, seconds",
            low=0, low_open=True, field="period"),
    Setting("supervisor", "backoff_initial_s", "float", P.BACKOFF_INITIAL, "first restart delay, seconds",
            low=0, field="backoff_initial"),
    Setting("supervisor", "backoff_max_s", "float", P.BACKOFF_MAX, "longest restart delay, seconds", low=0,
            field="backoff_max"),
    Setting("auth", "keys", "str", None, "directory of the principals' public certificates (CURVE over tcp://)"),
    Setting("auth", "server_cert", "str", None,
            "the kernel's secret certificate; default: {keys}/kernel.key_secret"),
    Setting("auth", "insecure", "bool", False, "tcp:// without CURVE, every peer the operator (trusted hosts only)"),
    Setting("limits", "root", "limits", None,
            "finite limits of the root job (default: what this machine's cores do in 7 days)",
            field="root_limits"),
    Setting("limits", "default", "limits", None,
            "limits of the default job (plain MDP requests and requests without a job)", field="default_limits"),
    Setting("limits", "max_pause_s", "float", P.MAX_PAUSE,
            "longest a request stays paused before the kernel resumes it, seconds", low=0, low_open=True,
            high=86400, field="max_pause"),
    Setting("limits", "pause_slot_s", "float", 1.0,
            "a request its owner paused gives its slot back after this long when others queue, seconds "
            "(its owner's resume runs it again; the worker then owes the slot)", low=0, high=86400,
            field="pause_slot"),
    Setting("limits", "audit_events_per_min", "int", P.AUDIT_EVENTS_PER_MIN,
            "audit records (mmi.audit) one principal may write per minute", low=1, field="audit_quota"),
    Setting("enforce", "backend", "enum", "auto",
            "the OS backstop: auto (cgroup v2, else v1, else signals), or one named (refused if unavailable)",
            choices=("auto", "cgroup2", "cgroup1", "signals"), field="enforce_backend"),
    Setting("enforce", "freeze_grace_ms", "float", 10.0,
            "a worker still holding a cancelled/over-budget request this long, and burning CPU on it, is frozen",
            low=0, high=60_000),
    Setting("enforce", "kill_grace_ms", "float", 1000.0, "... and still this long after the freeze: killed",
            low=0, high=600_000),
    Setting("enforce", "cpu_ceiling_ms", "float", 5000.0,
            "a worker spared for others (live requests, kept state) is killed once one answered request burnt this "
            "much CPU past its answer (at least twice its service's grace_ms)", low=1, high=3_600_000),
    Setting("enforce", "hold_ceiling_s", "float", 30.0,
            "... or was held this long past its answer, seconds", low=0.001, high=86_400),
    Setting("enforce", "remote_answer_grace_ms", "float", 500.0,
            "a worker on another node (placement = \"ray\") thawed after its freeze has this long, plus twice the "
            "longest recent round trip to its node agent, to answer before the kill (local workers: 100 ms)",
            low=0, high=600_000),
    Setting("enforce", "kernel_weight", "int", 1000, "the kernel's cpu weight (services: 100)", low=1,
            high=10_000),
    Setting("enforce", "weights", "map[str]", {},
            "principal name = weight (0.001 to 1e6, default 1): its share of each service's slots when several "
            "principals queue (deficit round robin; priority orders only within a principal)",
            field="principal_weights"),
    Setting("ray", "address", "str", None,
            "HOST:PORT of an existing Ray cluster's GCS (ray start --head --port ...) for Ray-placed services"),
    Setting("ray", "local", "bool", False, "no address: python -m kernel starts a local Ray cluster (stopped with it)"),
    Setting("ray", "num_cpus", "int", 1, "CPUs of a local cluster", low=1),
    Setting("ray", "object_store_mb", "int", 100, "object store of a local cluster, MiB", low=78),
    Setting("ray", "token_path", "str", None,
            "Ray's token file (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH): token authentication to the cluster"),
    Setting("ray", "kernel_host", "str", None,
            "the address Ray nodes reach the kernel at (default: the endpoint's host)"),
    Setting("ray", "temp_dir", "str", None, "a local cluster's session directory (short: unix sockets live there)"),
    Setting("ray", "connect_timeout_s", "float", 60.0,
            "longest wait for the cluster to answer (a local head gets twice this): past it the Ray-placed "
            "services are unavailable with the reason", low=0.5, high=3600.0),
    Setting("service", "name", "str", None, "the service name workers register (required; unique, no `/`)"),
    Setting("service", "module", "str", None, "a Python module run as `python -m MODULE` (or command)"),
    Setting("service", "command", "list[str]", None, "an argv to run (or module)"),
    Setting("service", "args", "list[str]", [], "arguments appended to the module's or command's argv"),
    Setting("service", "restart", "enum", "permanent",
            "permanent: always restarted; transient: after an abnormal exit; temporary: never", choices=_RESTART),
    Setting("service", "replicas", "int", 1, "processes of this service (named NAME#i when more than one)",
            low=1, high=256),
    Setting("service", "env", "map[str]", {}, "environment variables of the child"),
    Setting("service", "shutdown_timeout_s", "float", P.SHUTDOWN_TIMEOUT,
            "grace after SIGTERM before SIGKILL, seconds", low=0, low_open=True),
    Setting("service", "nice", "int", None, "the child's nice value", low=-20, high=19),
    Setting("service", "cpus", "list[int]", None, "CPU affinity of the child (core numbers)", low=0),
    Setting("service", "mem_bytes", "int", None, "memory ceiling of the service's group (>= 1 MiB)", low=1 << 20),
    Setting("service", "cpu_weight", "int", None, "cpu weight of the service's group (default 100)", low=1,
            high=10_000),
    Setting("service", "pids_max", "int", None, "most processes in the service's group", low=1),
    Setting("service", "grace_ms", "float", None,
            "the grace the service declares: how much CPU it may burn on an answered (cancelled, over-budget) "
            "request before the ladder freezes it, ms (default: its module's, scch 21000, decode 2000, else 0)",
            low=0, high=600_000),
    Setting("service", "keeps_state", "bool", None,
            "the service keeps state between requests (sessions): the ladder spares its worker, killing it only "
            "past [enforce] cpu_ceiling_ms / hold_ceiling_s (default: its module's, decode, sim, kvtp and ttc true)"),
    Setting("service", "placement", "enum", "local",
            "local: a process of this machine; ray: a Ray actor on the [ray] cluster (docs/cluster.md)",
            choices=("local", "ray")),
    Setting("service", "ray_num_cpus", "float", 1.0, "CPUs each Ray-placed replica reserves", low=0),
    Setting("service", "ray_num_gpus", "float", 0.0, "GPUs each Ray-placed replica reserves", low=0),
    Setting("service", "ray_memory_bytes", "int", None, "memory each Ray-placed replica reserves", low=1 << 20),
    Setting("service", "ray_label", "str", None,
            "only Ray nodes with this label: VALUE (ray start --labels reca-node=VALUE) or KEY=VALUE"),
)
#: [[service]] keys that are group ceilings (passed to the supervisor's ChildSpec when it has them).
CEILINGS = ("mem_bytes", "cpu_weight", "pids_max", "grace_ms", "keeps_state")

TABLES = ("kernel", "supervisor", "auth", "limits", "enforce", "ray", "service")
_BY_TABLE: dict[str, dict[str, Setting]] = {t: {s.key: s for s in SCHEMA if s.table == t} for t in TABLES}


def schema_rows() -> list[dict[str, str]]:
    """The schema as rows ``{table, key, type, default, meaning}`` (for docs/config.md)."""
    out = []
    for s in SCHEMA:
        kind = s.type if not s.choices else " | ".join(f'"{c}"' for c in s.choices)
        out.append({"table": "[[service]]" if s.table == "service" else f"[{s.table}]", "key": s.key,
                    "type": kind, "default": "—" if s.default is None else repr(s.default), "meaning": s.meaning})
    return out


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


class _Reader:
    """Reads the tables of one document against :data:`SCHEMA`; every error names the key, the
    table and the file."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, key: str | None, message: str) -> ConfigError:
        at = f"{where}.{key}" if key else where
        return ConfigError(f"{self.source}: {at}: {message}")

    def table(self, doc: dict, name: str, where: str) -> dict:
        """The table ``name`` of ``doc`` (``{}`` when absent) with its keys checked."""
        value = doc.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{self.source}: [{name}] must be a table, got {type(value).__name__}")
        return self.keys(value, name, where)

    def keys(self, table: dict, name: str, where: str) -> dict:
        known = _BY_TABLE[name]
        for key in table:
            if key not in known:
                raise ConfigError(f"{self.source}: unknown key {key!r} in {where}; "
                                  f"known keys: {', '.join(sorted(known))}")
        return table

    def get(self, table: dict, name: str, key: str, where: str, default: Any = ...) -> Any:
        s = _BY_TABLE[name][key]
        if key not in table:
            return s.default if default is ... else default
        value = table[key]
        t = s.type
        if t == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise self.fail(where, key, f"must be a finite number, got {value!r}")
            value = float(value)
        elif t == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.fail(where, key, f"must be an integer, got {value!r}")
        elif t == "bool":
            if not isinstance(value, bool):
                raise self.fail(where, key, f"must be true or false, got {value!r}")
        elif t == "str":
            if not isinstance(value, str) or not value:
                raise self.fail(where, key, f"must be a non-empty string, got {value!r}")
        elif t == "str|false":
            if value is not False and (not isinstance(value, str) or not value):
                raise self.fail(where, key, f"must be a path or false, got {value!r}")
        elif t == "enum":
            if value not in s.choices:
                raise self.fail(where, key, f"must be one of {', '.join(map(repr, s.choices))}, got {value!r}")
        elif t.startswith("list["):
            item = str if t == "list[str]" else int
            if not isinstance(value, list) or not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
                raise self.fail(where, key, f"must be a list of {item.__name__}, got {value!r}")
            if item is int and s.low is not None and any(v < s.low for v in value):
                raise self.fail(where, key, f"items must be >= {_num(s.low)}")
            return value
        elif t == "map[str]":
            if not isinstance(value, dict) or not all(isinstance(v, (str, int, float)) for v in value.values()):
                raise self.fail(where, key, f"must be a table of strings, got {value!r}")
            return value
        if t in ("int", "float"):
            if s.low is not None and (value <= s.low if s.low_open else value < s.low):
                raise self.fail(where, key, f"must be {'>' if s.low_open else '>='} {_num(s.low)}, got {value!r}")
            if s.high is not None and value > s.high:
                raise self.fail(where, key, f"must be <= {_num(s.high)}, got {value!r}")
        return value

    def limits(self, table: dict, key: str, default: dict[str, float]) -> dict[str, float]:
        value = table.get(key, default)
        where = "[limits]"
        if not isinstance(value, dict):
            raise self.fail(where, key, "must be a table of kind = amount")
        out = {}
        for kind, amount in value.items():
            if not isinstance(amount, (int, float)) or isinstance(amount, bool) or not 0 <= amount < 1e300:
                raise self.fail(where, f"{key}.{kind}", f"must be a finite non-negative number, got {amount!r}")
            out[str(kind)] = float(amount)
        # A compute kind the table leaves out keeps its shipped default (finite: nothing is ever
        # unlimited), so a config written before a kind existed still starts.
        missing = [k for k in COMPUTE_KINDS if k not in out]
        for kind in missing:
            if kind not in default:
                raise self.fail(where, key, f"must limit every compute kind; missing {missing}")
            out[kind] = float(default[kind])
        return out


def parse(doc: dict, *, runtime: str | None = None, source: str = "config") -> KernelConfig:
    """A :class:`KernelConfig` from a parsed TOML document; ``source`` names the file in errors.
    Raises :class:`ConfigError` naming the key, the table and the file for an unknown key, a value
    of the wrong type or out of range, or a setting outside its choices."""
    runtime = runtime or runtime_dir()
    rd = _Reader(source)

    def expand(s: str) -> str:
        return s.replace("{runtime}", runtime)

    unknown = sorted(set(doc) - set(TABLES))
    if unknown:
        raise ConfigError(f"{source}: unknown table(s) {unknown}; known tables: {', '.join(TABLES)}")
    k = rd.table(doc, "kernel", "[kernel]")
    s = rd.table(doc, "supervisor", "[supervisor]")
    a = rd.table(doc, "auth", "[auth]")
    lim = rd.table(doc, "limits", "[limits]")
    enf = rd.table(doc, "enforce", "[enforce]")
    ray_t = rd.table(doc, "ray", "[ray]")
    endpoint = expand(rd.get(k, "kernel", "endpoint", "[kernel]"))
    control = rd.get(k, "kernel", "control", "[kernel]")
    control = expand(control) if control else default_control_for(endpoint)
    log_path = rd.get(k, "kernel", "decision_log", "[kernel]")
    cfg = KernelConfig(endpoint=endpoint, control=control, runtime=runtime,
                       decision_log=expand(log_path) if log_path else None)
    for table, name in ((k, "kernel"), (s, "supervisor"), (lim, "limits"), (enf, "enforce")):
        for setting in _BY_TABLE[name].values():
            if setting.type in ("int", "float", "enum"):
                setattr(cfg, setting.field or setting.key, rd.get(table, name, setting.key, f"[{name}]"))
    weights = rd.get(enf, "enforce", "weights", "[enforce]")
    for who, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or not 1e-3 <= w <= 1e6:
            raise rd.fail("[enforce]", f"weights.{who}", f"= {w!r}: a weight is a number in [0.001, 1e6]")
    cfg.principal_weights = {str(who): float(w) for who, w in weights.items()}
    cfg.insecure = rd.get(a, "auth", "insecure", "[auth]")
    keys = rd.get(a, "auth", "keys", "[auth]")
    cfg.keys = os.path.expanduser(expand(keys)) if keys else None
    server_cert = rd.get(a, "auth", "server_cert", "[auth]")
    if server_cert:
        cfg.server_cert = os.path.expanduser(expand(server_cert))
    elif cfg.keys:
        cfg.server_cert = os.path.join(cfg.keys, "kernel.key_secret")
    if "ray" in doc:
        rget = functools.partial(rd.get, ray_t, "ray", where="[ray]")
        cfg.ray = RayClusterConfig(
            address=rget(key="address"), local=rget(key="local"), num_cpus=rget(key="num_cpus"),
            object_store_bytes=rget(key="object_store_mb") * 1024 * 1024,
            token_path=os.path.expanduser(expand(rget(key="token_path"))) if rget(key="token_path") else None,
            kernel_host=rget(key="kernel_host"),
            temp_dir=expand(rget(key="temp_dir")) if rget(key="temp_dir") else None,
            connect_timeout_s=rget(key="connect_timeout_s"))
        if cfg.ray.address and cfg.ray.local:
            raise rd.fail("[ray]", "local", "= true with an address: say one of them")
    cfg.root_limits = rd.limits(lim, "root", machine_limits())
    cfg.default_limits = rd.limits(lim, "default", DEFAULT_JOB_LIMITS)
    for kind, amount in cfg.default_limits.items():
        if amount > cfg.root_limits.get(kind, float("inf")):
            raise rd.fail("[limits]", f"default.{kind}", f"= {amount:g} exceeds limits.root.{kind}")
    entries = doc.get("service", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"{source}: [[service]] must be an array of tables")
    services: set[str] = set()  # [[service]] names, and the process names they expand to
    names: set[str] = set()
    for n, entry in enumerate(entries):
        where = f"[[service]] #{n}" + (f" ({entry['name']})" if isinstance(entry.get("name"), str) else "")
        rd.keys(entry, "service", where)
        get = functools.partial(rd.get, entry, "service", where=where)
        name, module, command = get(key="name"), get(key="module"), get(key="command")
        if not name or (module is None) == (command is None):
            raise ConfigError(f"{source}: {where} needs a name and exactly one of module or command")
        if "/" in name:  # a name is a control topic level (ctl/<name>/<op>) and a log file name
            raise rd.fail(where, "name", f"= {name!r}: a service name may not contain '/'")
        args = [expand(x) for x in get(key="args")]
        argv = python_module_argv(module, args) if module else [expand(str(x)) for x in command] + args
        restart = RestartType(get(key="restart"))
        replicas = get(key="replicas")
        children = [name] if replicas == 1 else [f"{name}#{r}" for r in range(replicas)]
        clash = sorted(names.intersection(children))
        if name in services or clash:  # two children of one name: one would shadow the other
            raise rd.fail(where, "name", f"= {name!r}: a second [[service]] of that name"
                          + (f" (process name(s) {', '.join(clash)} already taken)" if clash else ""))
        services.add(name)
        names.update(children)
        env = {str(x): expand(str(y)) for x, y in get(key="env").items()}
        ceilings = {key: get(key=key) for key in CEILINGS if key in entry}
        if ceilings and not set(ceilings) <= {f.name for f in dataclasses.fields(ChildSpec)}:
            raise ConfigError(f"{source}: {where}: {', '.join(sorted(ceilings))}: this build's supervisor "
                              "has no group ceilings")
        placement = get(key="placement")
        if placement == "ray":
            label = get(key="ray_label")
            if label is not None:
                try:
                    parse_label(label)
                except ValueError as exc:
                    raise rd.fail(where, "ray_label", str(exc)) from None
            cfg.ray_resources[name] = RayResources(get(key="ray_num_cpus"), get(key="ray_num_gpus"),
                                                   get(key="ray_memory_bytes"), label)
        elif any(k.startswith("ray_") for k in entry):
            raise rd.fail(where, sorted(k for k in entry if k.startswith("ray_"))[0],
                          'only with placement = "ray"')
        for r in range(replicas):
            cfg.services.append(ChildSpec(
                placement=placement,
                name=name if replicas == 1 else f"{name}#{r}",
                argv=argv,
                restart=restart,
                shutdown_timeout=get(key="shutdown_timeout_s"),
                env=env,
                nice=get(key="nice"),
                cpus=get(key="cpus"),
                **ceilings,
            ))
    if cfg.ray is None and any(spec.placement == "ray" for spec in cfg.services):
        raise ConfigError(f"{source}: a [[service]] with placement = \"ray\" needs a [ray] table "
                          "(address = \"HOST:PORT\" or local = true)")
    return cfg


def load(path: str | None, *, runtime: str | None = None) -> KernelConfig:
    """Load ``path`` (or the shipped default when None)."""
    try:
        if path is None:
            text = (Path(__file__).parent / "default.toml").read_text(encoding="utf-8")
        else:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        doc = tomllib.loads(text)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config {path or 'default'}: {exc}") from exc
    return parse(doc, runtime=runtime, source=path or "the embedded default (kernel/default.toml)")
