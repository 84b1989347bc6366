"""``python -m kernel`` — the microkernel and its supervisor.

    python -m kernel [--config FILE] [--endpoint ENDPOINT] [--control ENDPOINT] [--no-services]
    python -m kernel replay LOG

Starts the kernel (ROUTER + PUB), then the supervisor, which launches the services of the
config in order.  Prints the endpoints and a line ``reca kernel ready`` once everything is
started.  SIGINT / SIGTERM stop the services in reverse start order (SIGTERM, shutdown
timeout, SIGKILL) and then the kernel; no process is left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

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


async def _run(args: argparse.Namespace) -> int:
    from kernel import supervisor as sv
    from kernel.admission import BudgetAdmission
    from kernel.decisions import DecisionLog
    from kernel.mmi import Management
    from kernel.server import KernelServer

    cfg = load(args.config)
    if args.endpoint:
        cfg.endpoint = args.endpoint
        cfg.control = args.control or default_control_for(args.endpoint)
    elif args.control:
        cfg.control = args.control
    for ep in (cfg.endpoint, cfg.control):
        if ep.startswith("ipc://"):
            os.makedirs(os.path.dirname(ep[len("ipc://"):]) or ".", mode=0o700, exist_ok=True)
    decision_log = None
    if cfg.decision_log:
        os.makedirs(os.path.dirname(cfg.decision_log) or ".", exist_ok=True)
        decision_log = DecisionLog(cfg.decision_log)
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
    admission = BudgetAdmission(decision_log=decision_log)
    server = KernelServer(
        cfg.endpoint,
        cfg.control,
        heartbeat_interval=cfg.heartbeat,
        liveness=cfg.liveness,
        unavailable_wait=cfg.unavailable_wait,
        admission=admission,
        management=Management(admission, supervisor),
        extra_stats=supervisor.stats,
    )
    # The supervisor's children get the endpoints as actually bound (tcp://*:0 resolves here).
    supervisor.env[sv.ENV_ENDPOINT] = server.endpoint.replace("0.0.0.0", "127.0.0.1")
    supervisor.env[sv.ENV_CONTROL] = server.control.replace("0.0.0.0", "127.0.0.1")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    serving = asyncio.ensure_future(server.serve())
    print(f"reca kernel endpoint {server.endpoint}", flush=True)
    print(f"reca kernel control {server.control}", flush=True)
    try:
        await supervisor.start()
        print(f"reca kernel ready ({len(supervisor.children)} service process(es))", flush=True)
        await stop.wait()
    finally:
        logging.getLogger("reca.kernel").info("shutting down")
        await supervisor.shutdown()
        server.stop()
        await serving
        if decision_log is not None:
            decision_log.close()
    print("reca kernel stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "replay":
        from kernel.replay import main as replay_main

        return replay_main(argv[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        import uvloop
    except ImportError:  # uvloop is optional; asyncio's loop works the same, a little slower
        runner = asyncio.run
    else:
        def runner(coro):
            return uvloop.run(coro)
    try:
        return runner(_run(args))
    except ConfigError as exc:
        print(f"reca kernel: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
