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
    intensity: int = P.RESTART_INTENSITY
    period: float = P.RESTART_PERIOD
    backoff_initial: float = P.BACKOFF_INITIAL
    backoff_max: float = P.BACKOFF_MAX
    services: list[ChildSpec] = dataclasses.field(default_factory=list)
    runtime: str = ""


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

    known = {"kernel", "supervisor", "service"}
    unknown = set(doc) - known
    if unknown:
        raise ConfigError(f"unknown top-level table(s): {sorted(unknown)}")
    k = doc.get("kernel", {})
    s = doc.get("supervisor", {})
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
        intensity=_get(s, "intensity", int, P.RESTART_INTENSITY, "supervisor"),
        period=_get(s, "period_s", float, P.RESTART_PERIOD, "supervisor"),
        backoff_initial=_get(s, "backoff_initial_s", float, P.BACKOFF_INITIAL, "supervisor"),
        backoff_max=_get(s, "backoff_max_s", float, P.BACKOFF_MAX, "supervisor"),
        runtime=runtime,
    )
    if cfg.heartbeat <= 0 or cfg.liveness < 1 or cfg.unavailable_wait < 0:
        raise ConfigError("kernel.heartbeat_s must be > 0, liveness >= 1, unavailable_wait_s >= 0")
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
