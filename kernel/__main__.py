"""``python -m kernel`` — the microkernel and its supervisor.

    python -m kernel [--config FILE] [--endpoint ENDPOINT] [--control ENDPOINT] [--no-services]
    python -m kernel replay LOG
    python -m kernel fsck LOG_OR_DIR [--repair] [--discard-after-damage]
    python -m kernel keys new NAME --role ROLE [--dir DIR] | keys list [--dir DIR]
    python -m kernel --help                    (every option and subcommand)

Starts the kernel (ROUTER + PUB), then the supervisor, which launches the services of the
config in order.  Prints the endpoints and a line ``reca kernel ready`` once everything is
started.  SIGINT / SIGTERM stop the services all at once (SIGTERM, each its shutdown
timeout, SIGKILL) and then the kernel; no process is left behind.

Security at start (docs/security.md): the runtime directory is created private (0700) or, if it
exists, must be a real directory of this user closed to group and others; a ``tcp://`` endpoint
needs CURVE (``[auth] keys``) unless ``[auth] insecure = true``.  Either refusal exits with
status 2 and says why.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from kernel import protocol as P
from kernel.config import ConfigError, default_control_for, load


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(text: str) -> str:
    level = str(text).upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"unknown log level {text!r}; one of {', '.join(LOG_LEVELS)}")
    return level


_EPILOG = """\
subcommands (each has its own --help):
  python -m kernel replay LOG...                     re-run the ledger on a decision log; exit 1 on a divergence
  python -m kernel logcat LOG...                     a decision log's records as JSON lines (either format)
  python -m kernel keys new NAME --role ROLE [--dir DIR]
                                                     a principal's CURVE certificate pair (ROLE: operator,
                                                     client or service:NAME[,NAME...])
  python -m kernel keys list [--dir DIR]             the principals of a key directory
  python -m kernel config-doc                        the configuration reference (docs/config.md), from the schema

the kernel prints `reca kernel endpoint E`, `reca kernel control C` and `reca kernel ready` once it serves;
`reca kernel degraded: ...` while it has given up on a permanent service.  Each service's output goes to
{runtime}/logs/NAME.log (python -m clients logs NAME).  Configuration keys: docs/config.md.

environment: RECA_RUNTIME_DIR (the runtime directory, {runtime} in the config), RECA_LOG_LEVEL,
RECA_ENDPOINT (what clients connect to).  Exit status: 0 stopped cleanly, 2 config error or refused to
start (unsafe runtime directory, tcp:// without CURVE, unreadable keys).
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kernel", epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="reca microkernel and supervisor: routes requests between clients and "
                                            "services, enforces budgets, and starts the services of its config.",
                                usage="python -m kernel [options] | python -m kernel {replay,keys,config-doc} ...")
    p.add_argument("--config", metavar="FILE",
                   help="TOML config (default: the shipped kernel/default.toml; keys in docs/config.md)")
    p.add_argument("--endpoint", help="where clients and workers connect, ipc://PATH or tcp://HOST:PORT "
                                      "(overrides [kernel] endpoint)")
    p.add_argument("--control", help="control PUB endpoint (default: derived from --endpoint: control.sock "
                                     "beside it, or PORT+1)")
    p.add_argument("--no-services", action="store_true", help="run the kernel without starting services")
    p.add_argument("--log-level", default=os.environ.get(P.ENV_LOG_LEVEL, "INFO"), type=_log_level,
                   help=f"one of {', '.join(LOG_LEVELS)} (any case)")
    p.add_argument("--fresh", action="store_true",
                   help="move an existing decision log aside (LOG.old-STAMP/) and start with no state; "
                        "without it a log that cannot be restored whole refuses the start")
    return p


def _durability(cfg) -> dict:
    """What ``status`` says about the decision log: where it is, or that there is none."""
    if cfg.decision_log:
        return {"decision_log": cfg.decision_log, "fsync": cfg.fsync, "replay": True}
    return {"decision_log": None, "replay": False,
            "why": "decision_log = false in the config: no durability, nothing restored after a restart"}


class _Refused(Exception):
    """The kernel refuses to start (unsafe runtime directory, tcp:// without CURVE, bad keys)."""


def _security(cfg, log: logging.Logger):
    """Check the runtime directories and set up CURVE: returns ``(server_keys, principals,
    child_certs)`` (all None/empty over ipc:// or insecure tcp://)."""
    import zmq

    from kernel import auth

    dirs = {cfg.runtime}
    dirs.update(os.path.dirname(ep[len("ipc://"):]) for ep in (cfg.endpoint, cfg.control) if ep.startswith("ipc://"))
    if cfg.decision_log:
        dirs.add(os.path.dirname(os.path.abspath(cfg.decision_log)))
    try:
        for d in sorted(d for d in dirs if d):
            auth.ensure_private_dir(d)
    except (auth.UnsafeRuntimeDir, OSError) as exc:
        raise _Refused(str(exc)) from exc
    if not cfg.tcp:
        return None, None, {}
    if cfg.keys is None:
        if not cfg.insecure:
            raise _Refused("a tcp:// endpoint needs CURVE: set [auth] keys to a key directory made with "
                           "`python -m kernel keys new NAME --role ROLE` (or [auth] insecure = true on a "
                           "trusted host only)")
        log.warning("!" * 78)
        log.warning("INSECURE: tcp:// WITHOUT CURVE. Every peer that can reach %s is the OPERATOR:", cfg.endpoint)
        log.warning("it can stop processes, cancel any job and read every control message.")
        log.warning("!" * 78)
        print("reca kernel WARNING: insecure tcp:// without CURVE; every peer is the operator", flush=True)
        return None, None, {}
    try:
        public, secret = auth.load_secret(cfg.server_cert)
        principals = auth.Principals(cfg.keys)
    except (auth.AuthError, OSError) as exc:
        raise _Refused(str(exc)) from exc
    # The supervisor hands each child a certificate of its own, role service:<its service>.
    cert_dir = auth.ensure_private_dir(os.path.join(cfg.runtime, "certs"))
    server_public = os.path.join(cert_dir, "kernel.key")
    if os.path.lexists(server_public):
        os.unlink(server_public)
    auth.write_public_certificate(server_public, auth.KERNEL_ROLE, public)
    child_certs = {}
    local = (spec.name for spec in cfg.services if spec.placement == "local")  # Ray replicas enrol their own
    for child, role in auth.child_principals(local).items():
        name = f"{auth.CHILD_PREFIX}{child}"
        for suffix in (".key", ".key_secret"):
            path = os.path.join(cert_dir, name + suffix)
            if os.path.lexists(path):
                os.unlink(path)
        keypair = zmq.curve_keypair()
        _, secret_path = auth.write_certificate(cert_dir, name, role, keypair)
        principals.add_child(name, role, keypair[0])
        child_certs[child] = secret_path
    return auth.ServerKeys(public, secret), principals, {"server": server_public, "children": child_certs}


def _enforcer(cfg):
    """The OS enforcer of the config's backend, with the kernel in its own group at the kernel
    weight.  A named backend that is not available refuses to start (with the reason)."""
    from kernel import enforce

    try:
        enf = enforce.open_enforcer(cfg.enforce_backend)
    except enforce.EnforcerUnavailable as exc:
        raise _Refused(f"{exc} (set [enforce] backend = \"auto\" to fall back)") from exc
    try:
        enf.enter_kernel(cfg.kernel_weight)
    except (enforce.EnforcerError, OSError) as exc:
        logging.getLogger("reca.kernel").warning("the kernel stays outside its group: %s", exc)
    print(f"reca kernel enforcer {enf.backend}: {enf.reason}", flush=True)
    return enf


def _ray_placement(cfg, principals):
    """The Ray placement of the config's ``placement = "ray"`` services (None when there are none).
    A replica's key is authorised as a child principal when its actor enrols, revoked when it is
    replaced (docs/cluster.md)."""
    if cfg.ray is None or not any(spec.placement == "ray" for spec in cfg.services):
        return None
    from kernel.rayplace import RayCluster, RayPlacement

    authorise = revoke = None
    if principals is not None:
        def authorise(name: str, role: str, public: bytes) -> None:
            principals.add_child(name, role, public)

        revoke = principals.remove_child
    limits = {spec.name: spec.limits() for spec in cfg.services if spec.placement == "ray"}
    return RayPlacement(RayCluster(cfg.ray), cfg.ray_resources, authorise=authorise, revoke=revoke,
                        limits=limits, enforce_backend=cfg.enforce_backend)


def _log_dir(cfg) -> str | None:
    """``{runtime}/logs``: each service's output in its own file there (None: cannot be made)."""
    from kernel import auth

    path = os.path.join(cfg.runtime, "logs")
    try:
        return auth.ensure_private_dir(path)
    except (auth.UnsafeRuntimeDir, OSError) as exc:
        logging.getLogger("reca.kernel").warning("no per-service logs (%s): services write to the kernel's output", exc)
        return None


def _announce_health(health: str, child: Any) -> None:
    """The supervisor's health changed: say so on the kernel's output (``reca kernel degraded: ...``
    while a permanent service is given up, ``reca kernel ready`` once an operator restarted it)."""
    if health == "degraded":
        print(f"reca kernel degraded: gave up on {child.spec.name} ({child.reason}); "
              f"`python -m clients logs {child.spec.name}`, then `python -m clients restart {child.spec.name}`",
              flush=True)
    else:
        print(f"reca kernel {health}", flush=True)


async def _run(args: argparse.Namespace) -> int:
    from kernel import supervisor as sv
    from kernel.admission import BudgetAdmission
    from kernel.auth import ENV_CERT, ENV_SERVER_CERT
    from kernel.decisions import DecisionLog
    from kernel.host import SystemHost
    from kernel.ladder import ANSWER_CAP_S, Ladder, Wake
    from kernel.ladder import run as run_ladder
    from kernel.logstore import LogCorrupt, move_aside
    from kernel.mmi import Management
    from kernel.peers import bound_allocator, raise_fd_limit
    from kernel.replay import restore
    from kernel.server import KernelServer

    cfg = load(args.config)
    if not bound_allocator():
        logging.getLogger("reca.kernel").warning("no glibc mallopt: memory a flood of large frames "
                                                 "allocates may stay with the kernel")
    soft, hard = raise_fd_limit()
    logging.getLogger("reca.kernel").info("descriptor limit %d (hard %d)", soft, hard)
    if args.endpoint:
        cfg.endpoint = args.endpoint
        cfg.control = args.control or default_control_for(args.endpoint)
    elif args.control:
        cfg.control = args.control
    server_keys, principals, certs = _security(cfg, logging.getLogger("reca.kernel"))
    if certs:
        for spec in (s for s in cfg.services if s.placement == "local"):
            spec.env = {**spec.env, ENV_CERT: certs["children"][spec.name], ENV_SERVER_CERT: certs["server"]}
    decision_log = restored = None
    restore_s = 0.0
    if cfg.decision_log:
        try:
            if args.fresh:
                moved = move_aside(cfg.decision_log, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
                if moved:
                    print(f"reca kernel: --fresh: the decision log moved to {moved}; starting with no state",
                          file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            restored = restore(cfg.decision_log)  # never through a planted symlink
            restore_s = time.perf_counter() - t0
            for note in restored.recovery.notes if restored is not None else ():
                print(f"reca kernel: decision log: {note}", file=sys.stderr, flush=True)
                logging.getLogger("reca.kernel").warning("decision log: %s", note)
            decision_log = DecisionLog(cfg.decision_log, fsync=cfg.fsync, segment_bytes=cfg.segment_bytes,
                                       restored=restored is not None,
                                       snapshot_soon=restored is not None and restored.recovery.fell_back)
        except LogCorrupt as exc:
            raise _Refused(f"decision log {exc}; nothing was restored. `python -m kernel fsck "
                           f"{cfg.decision_log}` shows and repairs it; --fresh moves it aside and starts "
                           "with no state") from exc
        except (OSError, PermissionError) as exc:  # UnsafeRuntimeDir: a planted symlink, another's file
            raise _Refused(f"decision log {cfg.decision_log}: {exc}") from exc
    enforcer = _enforcer(cfg)  # closed below; a kernel that dies leaves groups the next start sweeps
    supervisor = sv.Supervisor(
        [] if args.no_services else cfg.services,
        env={
            sv.ENV_ENDPOINT: cfg.endpoint,
            sv.ENV_CONTROL: cfg.control,
            sv.ENV_HEARTBEAT: str(cfg.heartbeat),
            sv.ENV_LIVENESS: str(cfg.liveness),
        },
        intensity=cfg.intensity,
        period=cfg.period,
        backoff_initial=cfg.backoff_initial,
        backoff_max=cfg.backoff_max,
        enforcer=enforcer,
        log_dir=_log_dir(cfg),
    )
    supervisor.on_health = _announce_health
    placement = _ray_placement(cfg, principals) if not args.no_services else None
    supervisor.remote = placement
    # With a log that held state, the admission continues it (restore through replay) and applies
    # [limits] over it only where the ledger allows; otherwise [limits] is the first decision.
    host = SystemHost(owns_pid=supervisor.owns_pid, group_cpu=supervisor.group_cpu_of_pid)  # the one port to the machine the core uses
    admission = BudgetAdmission(decision_log=decision_log, root_limits=cfg.root_limits, host=host,
                                default_limits=cfg.default_limits, max_pause=cfg.max_pause,
                                audit_quota=cfg.audit_quota, restored=restored, restored_at=time.monotonic(),
                                weights=cfg.principal_weights, pause_slot=cfg.pause_slot)
    if restored is not None and admission.restored is not None:
        done = admission.restored
        print(f"reca kernel restored {done['jobs']} job(s), {done['reservations']} reservation(s), "
              f"{done['interrupted']} interrupted request(s) from {cfg.decision_log} in {restore_s:.3f} s"
              + (f" ({len(restored.divergences)} replay divergence(s))" if restored.divergences else ""),
              flush=True)
    server = KernelServer(
        cfg.endpoint,
        cfg.control,
        heartbeat_interval=cfg.heartbeat,
        liveness=cfg.liveness,
        unavailable_wait=cfg.unavailable_wait,
        admission=admission,
        management=Management(admission, supervisor),
        host=host,
        extra_stats=lambda: {**supervisor.stats(), "durability": _durability(cfg)},
        server_keys=server_keys,
        principals=principals,
        max_peers=cfg.max_peers,
        peer_hwm=cfg.peer_hwm,
        peer_out_bytes=cfg.peer_out_bytes,
        peer_in_bytes=cfg.peer_in_bytes,
        peer_out_grace=cfg.peer_out_grace,
        peers_out_bytes=cfg.peers_out_bytes,
        peers_in_bytes=cfg.peers_in_bytes,
        inbound_rss_ceiling=cfg.inbound_rss_ceiling,
    )
    # The supervisor's children get the endpoints as actually bound (tcp://*:0 resolves here).
    supervisor.env[sv.ENV_ENDPOINT] = server.endpoint.replace("0.0.0.0", "127.0.0.1")
    supervisor.env[sv.ENV_CONTROL] = server.control.replace("0.0.0.0", "127.0.0.1")
    if placement is not None:
        placement.set_kernel(server.endpoint, server.control, None if server_keys is None else server_keys.public)
    # Start-up is over: what it built (modules, config, the restored ledger, sockets) lives as long
    # as the kernel.  Frozen out of the collector's generations, full passes stop walking it
    # (behaviour unchanged: refcounting still frees; a frozen cycle that later becomes garbage
    # stays, bounded by what exists now).  Collected first, so no garbage of start-up is frozen.
    gc.collect()
    gc.freeze()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # each a clean shutdown: groups thawed, services stopped
        loop.add_signal_handler(sig, stop.set)
    print(f"reca kernel endpoint {server.endpoint}", flush=True)
    print(f"reca kernel control {server.control}", flush=True)
    try:
        async with asyncio.TaskGroup() as tasks:  # the server task is owned: awaited before we return
            tasks.create_task(server.serve())
            if os.environ.get("RECA_LADDER") != "0":  # on by default; RECA_LADDER=0 turns it off (docs/budgets.md)
                supervisor.remote_answer_grace = cfg.remote_answer_grace_ms / 1000.0
                # The cap bounds the round-trip part of a remote answer window: the configured
                # grace itself is the operator's, never cut (kernel/ladder.py ANSWER_CAP_S).
                ladder = Ladder(cfg.freeze_grace_ms / 1000.0, cfg.kill_grace_ms / 1000.0,
                                cpu_ceiling=cfg.cpu_ceiling_ms / 1000.0, hold_ceiling=cfg.hold_ceiling_s,
                                answer_cap=supervisor.remote_answer_grace + ANSWER_CAP_S)
                # It sleeps while there is nothing to watch: the router wakes it (Router.ladder_wake).
                tasks.create_task(run_ladder(server.router, supervisor, ladder, admission.record, stop,
                                             admission=admission, wake=Wake()))
            try:
                await supervisor.start()
                if supervisor.log_dir and supervisor.children:
                    print(f"reca kernel service logs in {supervisor.log_dir} (python -m clients logs NAME)", flush=True)
                print(f"reca kernel ready ({len(supervisor.children)} service process(es))", flush=True)
                await stop.wait()
            finally:
                logging.getLogger("reca.kernel").info("shutting down")
                await supervisor.shutdown()
                if placement is not None:
                    placement.shutdown()  # a local Ray cluster stops with the kernel
                server.stop()
    finally:
        if decision_log is not None:
            decision_log.close()
        enforcer.close()
    print("reca kernel stopped", flush=True)
    return 0


_CONFIG_DOC_HEAD = """\
# Configuration reference

<!-- Generated by `python -m kernel config-doc > docs/config.md` from kernel/config.py's SCHEMA;
     tests/test_docs.py checks that this file is what the schema generates.  Do not edit by hand. -->

`python -m kernel --config FILE` reads one TOML file; without `--config` it runs the shipped
[kernel/default.toml](../kernel/default.toml), which starts every service on this machine over
`ipc://`.  A key that is not listed here, a value of the wrong type, or one out of its range is an
error that names the key, the table and the file: the kernel does not start on a config it does
not understand.

`{runtime}` in any string is the runtime directory: `$RECA_RUNTIME_DIR`, else
`$XDG_RUNTIME_DIR/reca`, else `/tmp/reca-<uid>`.  It holds the sockets, the decision log, each
service's log file (`logs/NAME.log`, `python -m clients logs NAME`) and the live view's URL.

A minimal config with one service of your own (docs/services.md walks through it):

```toml
[kernel]
endpoint = "ipc://{runtime}/kernel.sock"

[[service]]
name = "hello"
module = "myservices.hello"   # run as python -m myservices.hello
replicas = 2
```
"""

_TABLE_NOTES = {
    "[kernel]": "The kernel's endpoints, heartbeats, peer limits and decision log.",
    "[supervisor]": "How the supervisor restarts service processes (Erlang/OTP one_for_one).",
    "[auth]": "Who may talk to the kernel over tcp:// (docs/security.md).",
    "[limits]": "Budgets no client can get around (docs/budgets.md).  A `limits` value is a table of budget "
                "kind = amount, e.g. `{ wall_ms = 3_600_000, cpu_ms = 3_600_000, tokens = 1e8, flops = 1e15 }`.",
    "[ray]": "The Ray cluster that `placement = \"ray\"` services run on (docs/cluster.md).",
    "[enforce]": "The OS backstop under the kernel's budgets: cgroups (or signals) freeze and kill what a "
                 "budget or a cancel no longer allows.",
    "[[service]]": "One table per service; each becomes `replicas` supervised processes.  Exactly one of "
                   "`module` and `command`.",
}


def _toml_value(value: Any) -> str:
    """A default as it is written in TOML (``"text"``, ``true``, ``[1, 2]``, ``{ k = v }``)."""
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }" if value else "{}"
    return repr(value)


def _number(value: float) -> str:
    """A bound as written: ``1048576`` (not ``1.04858e+06``), ``0.5``."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


def config_doc() -> str:
    """docs/config.md, from kernel/config.py's schema (``SCHEMA``, one row per key)."""
    from kernel import config

    rows = []
    for setting in config.SCHEMA:
        kind = setting.type if not setting.choices else " | ".join(f'"{c}"' for c in setting.choices)
        bounds = []
        if setting.low is not None:
            bounds.append(f"{'>' if setting.low_open else '>='} {_number(setting.low)}")
        if setting.high is not None:
            bounds.append(f"<= {_number(setting.high)}")
        rows.append({"table": "[[service]]" if setting.table == "service" else f"[{setting.table}]",
                     "key": setting.key, "type": kind + (f" ({', '.join(bounds)})" if bounds else ""),
                     "default": "—" if setting.default is None else _toml_value(setting.default),
                     "meaning": setting.meaning})
    out = [_CONFIG_DOC_HEAD]
    tables: list[str] = []
    for row in rows:
        if row["table"] not in tables:
            tables.append(row["table"])
    for table in tables:
        out.append(f"\n## {table}\n")
        if table in _TABLE_NOTES:
            out.append(_TABLE_NOTES[table] + "\n")
        out.append("| key | type | default | meaning |\n|---|---|---|---|")
        for row in rows:
            if row["table"] == table:
                cells = [f"`{row['key']}`", row["type"].replace("|", "\\|"),
                         row["default"].replace("|", "\\|") if row["default"] == "—" else f"`{row['default']}`",
                         row["meaning"].replace("|", "\\|")]
                out.append("| " + " | ".join(cells) + " |")
    out.append("\n## Environment\n")
    out.append("| variable | meaning |\n|---|---|")
    for name, meaning in (
        (P.ENV_RUNTIME_DIR, "the runtime directory (`{runtime}`)"),
        (P.ENV_ENDPOINT, "the endpoint clients connect to (`python -m clients`, `clients.Client()`)"),
        (P.ENV_LOG_LEVEL, "log level of the kernel and of the services it starts"),
        (P.ENV_CERT, "a client's or service's own secret certificate (tcp://)"),
        (P.ENV_SERVER_CERT, "the kernel's public certificate (tcp://)"),
    ):
        out.append(f"| `{name}` | {meaning} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "config-doc":
        from kernel import config

        if not hasattr(config, "SCHEMA"):
            print("python -m kernel config-doc: kernel/config.py has no SCHEMA (the declarative schema)",
                  file=sys.stderr)
            return 2
        sys.stdout.write(config_doc())
        return 0
    if argv and argv[0] == "replay":
        from kernel.replay import main as replay_main

        return replay_main(argv[1:])
    if argv and argv[0] == "fsck":
        from kernel.fsck import main as fsck_main

        return fsck_main(argv[1:])
    if argv and argv[0] == "logcat":
        from kernel.fsck import logcat_main

        return logcat_main(argv[1:])
    if argv and argv[0] == "keys":
        from kernel.keys import main as keys_main

        return keys_main(argv[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    runner: Callable[[Coroutine[Any, Any, int]], int] = asyncio.run
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # uvloop is optional; asyncio's loop works the same, a little slower
        pass
    try:
        return runner(_run(args))
    except ConfigError as exc:
        print(f"reca kernel: config error: {exc}", file=sys.stderr)
        return 2
    except _Refused as exc:
        print(f"reca kernel: refusing to start: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
