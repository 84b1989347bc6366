"""``python -m kernel`` — the microkernel and its supervisor.

    python -m kernel [--config FILE] [--endpoint ENDPOINT] [--control ENDPOINT] [--no-services]
    python -m kernel replay LOG
    python -m kernel keys new NAME --role ROLE [--dir DIR] | keys list [--dir DIR]

Starts the kernel (ROUTER + PUB), then the supervisor, which launches the services of the
config in order.  Prints the endpoints and a line ``reca kernel ready`` once everything is
started.  SIGINT / SIGTERM stop the services in reverse start order (SIGTERM, shutdown
timeout, SIGKILL) and then the kernel; no process is left behind.

Security at start (docs/security.md): the runtime directory is created private (0700) or, if it
exists, must be a real directory of this user closed to group and others; a ``tcp://`` endpoint
needs CURVE (``[auth] keys``) unless ``[auth] insecure = true``.  Either refusal exits with
status 2 and says why.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from kernel import protocol as P
from kernel.config import ConfigError, default_control_for, load


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kernel", description="reca microkernel and supervisor")
    p.add_argument("--config", help="TOML config (default: the shipped embedded default)")
    p.add_argument("--endpoint", help="where clients and workers connect (ipc:// or tcp://)")
    p.add_argument("--control", help="control PUB endpoint (default: derived from --endpoint)")
    p.add_argument("--no-services", action="store_true", help="run the kernel without starting services")
    p.add_argument("--log-level", default=os.environ.get(P.ENV_LOG_LEVEL, "INFO"))
    return p


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
    for child, role in auth.child_principals(spec.name for spec in cfg.services).items():
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


async def _run(args: argparse.Namespace) -> int:
    from kernel import supervisor as sv
    from kernel.admission import BudgetAdmission
    from kernel.auth import ENV_CERT, ENV_SERVER_CERT
    from kernel.decisions import DecisionLog
    from kernel.host import SystemHost
    from kernel.mmi import Management
    from kernel.peers import raise_fd_limit
    from kernel.replay import restore
    from kernel.server import KernelServer

    cfg = load(args.config)
    soft, hard = raise_fd_limit()
    logging.getLogger("reca.kernel").info("descriptor limit %d (hard %d)", soft, hard)
    if args.endpoint:
        cfg.endpoint = args.endpoint
        cfg.control = args.control or default_control_for(args.endpoint)
    elif args.control:
        cfg.control = args.control
    server_keys, principals, certs = _security(cfg, logging.getLogger("reca.kernel"))
    if certs:
        for spec in cfg.services:
            spec.env = {**spec.env, ENV_CERT: certs["children"][spec.name], ENV_SERVER_CERT: certs["server"]}
    decision_log = restored = None
    restore_s = 0.0
    if cfg.decision_log:
        try:
            t0 = time.perf_counter()
            restored = restore(cfg.decision_log)  # never through a planted symlink
            restore_s = time.perf_counter() - t0
            decision_log = DecisionLog(cfg.decision_log, fsync=cfg.fsync, segment_bytes=cfg.segment_bytes,
                                       restored=restored is not None)
        except (OSError, PermissionError) as exc:  # UnsafeRuntimeDir: a planted symlink, another's file
            raise _Refused(f"decision log {cfg.decision_log}: {exc}") from exc
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
    )
    # With a log that held state, the admission continues it (restore through replay) and applies
    # [limits] over it only where the ledger allows; otherwise [limits] is the first decision.
    host = SystemHost(owns_pid=supervisor.owns_pid)  # the one port to the machine the core uses
    admission = BudgetAdmission(decision_log=decision_log, root_limits=cfg.root_limits, host=host,
                                default_limits=cfg.default_limits, max_pause=cfg.max_pause,
                                audit_quota=cfg.audit_quota, restored=restored, restored_at=time.monotonic())
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
        extra_stats=supervisor.stats,
        server_keys=server_keys,
        principals=principals,
        max_peers=cfg.max_peers,
        peer_hwm=cfg.peer_hwm,
    )
    # The supervisor's children get the endpoints as actually bound (tcp://*:0 resolves here).
    supervisor.env[sv.ENV_ENDPOINT] = server.endpoint.replace("0.0.0.0", "127.0.0.1")
    supervisor.env[sv.ENV_CONTROL] = server.control.replace("0.0.0.0", "127.0.0.1")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"reca kernel endpoint {server.endpoint}", flush=True)
    print(f"reca kernel control {server.control}", flush=True)
    try:
        async with asyncio.TaskGroup() as tasks:  # the server task is owned: awaited before we return
            tasks.create_task(server.serve())
            try:
                await supervisor.start()
                print(f"reca kernel ready ({len(supervisor.children)} service process(es))", flush=True)
                await stop.wait()
            finally:
                logging.getLogger("reca.kernel").info("shutting down")
                await supervisor.shutdown()
                server.stop()
    finally:
        if decision_log is not None:
            decision_log.close()
    print("reca kernel stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "replay":
        from kernel.replay import main as replay_main

        return replay_main(argv[1:])
    if argv and argv[0] == "keys":
        from kernel.keys import main as keys_main

        return keys_main(argv[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
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
