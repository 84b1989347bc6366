"""The kernel's TOML configuration: endpoints, heartbeat, supervisor policy, services.

``{runtime}`` in any string expands to the runtime directory: ``$RECA_RUNTIME_DIR``, else
``$XDG_RUNTIME_DIR/reca``, else ``/tmp/reca-<uid>``.  The shipped default (kernel/default.toml)
runs every service on this machine over ``ipc://`` and needs no set-up.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any

from kernel import protocol as P
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
    ``ipc://DIR/kernel.sock`` -> ``ipc://DIR/control.sock``; ``tcp://H:PORT`` -> ``tcp://H:PORT+1``."""
    if endpoint.startswith("ipc://"):
        base = os.path.dirname(endpoint[len("ipc://"):])
        return f"ipc://{os.path.join(base, 'control.sock')}"
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://"):].rpartition(":")
        if port.isdigit():
            return f"tcp://{host}:{int(port) + 1}"
    raise ConfigError(f"cannot derive a control endpoint from {endpoint!r}; set it explicitly")


@dataclasses.dataclass
class KernelConfig:
    endpoint: str
    control: str
    heartbeat: float = P.HEARTBEAT_INTERVAL
    liveness: int = P.LIVENESS
    unavailable_wait: float = P.UNAVAILABLE_WAIT
    decision_log: str | None = None
    max_peers: int = P.MAX_PEERS
    peer_hwm: int = P.PEER_HWM
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
    audit_quota: int = P.AUDIT_EVENTS_PER_MIN

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


def _limits(table: dict, key: str, default: dict[str, float], where: str) -> dict[str, float]:
    value = table.get(key, default)
    if not isinstance(value, dict):
        raise ConfigError(f"{where}.{key} must be a table of kind = amount")
    out = {}
    for kind, amount in value.items():
        if not isinstance(amount, (int, float)) or isinstance(amount, bool) or not 0 <= amount < 1e300:
            raise ConfigError(f"{where}.{key}.{kind} must be a finite non-negative number, got {amount!r}")
        out[str(kind)] = float(amount)
    missing = [k for k in COMPUTE_KINDS if k not in out]
    if missing:
        raise ConfigError(f"{where}.{key} must limit every compute kind; missing {missing}")
    return out


def _get(table: dict, key: str, kind: type | tuple, default: Any, where: str) -> Any:
    value = table.get(key, default)
    if value is default:
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{where}.{key} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def parse(doc: dict, *, runtime: str | None = None) -> KernelConfig:
    runtime = runtime or runtime_dir()

    def expand(s: str) -> str:
        return s.replace("{runtime}", runtime)

    known = {"kernel", "supervisor", "service", "auth", "limits"}
    unknown = set(doc) - known
    if unknown:
        raise ConfigError(f"unknown top-level table(s): {sorted(unknown)}")
    k = doc.get("kernel", {})
    s = doc.get("supervisor", {})
    a = doc.get("auth", {})
    lim = doc.get("limits", {})
    endpoint = expand(_get(k, "endpoint", str, "ipc://{runtime}/kernel.sock", "kernel"))
    control = _get(k, "control", str, None, "kernel")
    control = expand(control) if control else default_control_for(endpoint)
    log_path = _get(k, "decision_log", str, None, "kernel")
    cfg = KernelConfig(
        endpoint=endpoint,
        control=control,
        heartbeat=_get(k, "heartbeat_s", float, P.HEARTBEAT_INTERVAL, "kernel"),
        liveness=_get(k, "liveness", int, P.LIVENESS, "kernel"),
        unavailable_wait=_get(k, "unavailable_wait_s", float, P.UNAVAILABLE_WAIT, "kernel"),
        decision_log=expand(log_path) if log_path else None,
        max_peers=_get(k, "max_peers", int, P.MAX_PEERS, "kernel"),
        peer_hwm=_get(k, "peer_hwm", int, P.PEER_HWM, "kernel"),
        fsync=_get(k, "fsync", str, P.LOG_FSYNC, "kernel"),
        segment_bytes=_get(k, "log_segment_bytes", int, P.LOG_SEGMENT_BYTES, "kernel"),
        intensity=_get(s, "intensity", int, P.RESTART_INTENSITY, "supervisor"),
        period=_get(s, "period_s", float, P.RESTART_PERIOD, "supervisor"),
        backoff_initial=_get(s, "backoff_initial_s", float, P.BACKOFF_INITIAL, "supervisor"),
        backoff_max=_get(s, "backoff_max_s", float, P.BACKOFF_MAX, "supervisor"),
        runtime=runtime,
        insecure=_get(a, "insecure", bool, False, "auth"),
        max_pause=_get(lim, "max_pause_s", float, P.MAX_PAUSE, "limits"),
        audit_quota=_get(lim, "audit_events_per_min", int, P.AUDIT_EVENTS_PER_MIN, "limits"),
    )
    keys = _get(a, "keys", str, None, "auth")
    cfg.keys = os.path.expanduser(expand(keys)) if keys else None
    server_cert = _get(a, "server_cert", str, None, "auth")
    if server_cert:
        cfg.server_cert = os.path.expanduser(expand(server_cert))
    elif cfg.keys:
        cfg.server_cert = os.path.join(cfg.keys, "kernel.key_secret")
    unknown = set(a) - {"keys", "server_cert", "insecure"}
    if unknown:
        raise ConfigError(f"unknown [auth] key(s): {sorted(unknown)}")
    unknown = set(lim) - {"root", "default", "max_pause_s", "audit_events_per_min"}
    if unknown:
        raise ConfigError(f"unknown [limits] key(s): {sorted(unknown)}")
    cfg.root_limits = _limits(lim, "root", machine_limits(), "limits")
    cfg.default_limits = _limits(lim, "default", DEFAULT_JOB_LIMITS, "limits")
    for kind, amount in cfg.default_limits.items():
        if amount > cfg.root_limits.get(kind, float("inf")):
            raise ConfigError(f"limits.default.{kind} = {amount:g} exceeds limits.root.{kind}")
    if not 0 < cfg.max_pause <= 86400 or cfg.audit_quota < 1:
        raise ConfigError("limits.max_pause_s must be in (0, 86400] and limits.audit_events_per_min >= 1")
    if cfg.heartbeat <= 0 or cfg.liveness < 1 or cfg.unavailable_wait < 0:
        raise ConfigError("kernel.heartbeat_s must be > 0, liveness >= 1, unavailable_wait_s >= 0")
    if cfg.max_peers < 1 or cfg.peer_hwm < 1:
        raise ConfigError("kernel.max_peers and kernel.peer_hwm must be >= 1")
    if cfg.fsync not in ("always", "interval", "never") or cfg.segment_bytes < 4096:
        raise ConfigError('kernel.fsync must be "always", "interval" or "never"; '
                          "kernel.log_segment_bytes >= 4096")
    entries = doc.get("service", [])
    if not isinstance(entries, list):
        raise ConfigError("[[service]] must be an array of tables")
    for n, entry in enumerate(entries):
        where = f"service[{n}]"
        name = _get(entry, "name", str, None, where)
        module = _get(entry, "module", str, None, where)
        command = _get(entry, "command", list, None, where)
        if not name or (module is None) == (command is None):
            raise ConfigError(f"{where} needs a name and exactly one of module or command")
        args = [expand(a) for a in _get(entry, "args", list, [], where)]
        argv = python_module_argv(module, args) if module else [expand(str(a)) for a in command] + args
        try:
            restart = RestartType(_get(entry, "restart", str, "permanent", where))
        except ValueError:
            raise ConfigError(f"{where}.restart must be permanent, transient or temporary") from None
        replicas = _get(entry, "replicas", int, 1, where)
        if replicas < 1:
            raise ConfigError(f"{where}.replicas must be >= 1")
        env = {str(a): expand(str(b)) for a, b in _get(entry, "env", dict, {}, where).items()}
        for r in range(replicas):
            cfg.services.append(ChildSpec(
                name=name if replicas == 1 else f"{name}#{r}",
                argv=argv,
                restart=restart,
                shutdown_timeout=_get(entry, "shutdown_timeout_s", float, P.SHUTDOWN_TIMEOUT, where),
                env=env,
                nice=_get(entry, "nice", int, None, where),
                cpus=_get(entry, "cpus", list, None, where),
            ))
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
    return parse(doc, runtime=runtime)
