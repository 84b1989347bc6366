"""The kernel configuration the agent workloads need, and a launcher for benchmarks and tests."""

from __future__ import annotations

from clients.launch import LocalKernel, kernel_config, service_block
from kernel import protocol as P

#: Services the modes use.
SERVICES = ("decode", "ids", "psccr", "scch", "ttc", "cswif", "sim", "cpcs")
#: cswif's default threshold (relative gain per million extra cell updates); the benchmark
#: passes the one chosen on training tasks.
DEFAULT_THRESHOLD = 5e-4


def config(threshold: float = DEFAULT_THRESHOLD, heartbeat: float = P.HEARTBEAT_INTERVAL) -> str:
    blocks = [
        service_block("decode", "services.decode"),
        service_block("ids", "services.ids"),
        service_block("psccr", "services.psccr", args=["--db", "{runtime}/psccr.db"]),
        service_block("scch", "services.scch", args=["--db", "{runtime}/scch.db"]),
        service_block("ttc", "services.ttc", args=["--db", "{runtime}/ttc.db"]),
        service_block("cswif", "services.cswif", args=["--threshold", repr(float(threshold))]),
        service_block("sim", "services.sim"),
        service_block("cpcs", "services.cpcs", args=["--tick-ms", "50"]),
    ]
    # the kernel's own heartbeat and liveness (1 s, 3 beats): every service's idle heartbeats are
    # CPU every mode pays (about 0.044 CPU s per second of wall at 0.5 s, 0.016 at 2 s, 9 processes)
    return kernel_config("".join(blocks), heartbeat=heartbeat, liveness=P.LIVENESS, unavailable_wait=5.0)


def start(threshold: float = DEFAULT_THRESHOLD) -> LocalKernel:
    """``python -m kernel`` with :data:`SERVICES`, each waited for (bounded)."""
    from clients import Client

    k = LocalKernel(config(threshold))
    try:
        with Client(k.endpoint, timeout=30, retries=0) as c:
            for name in SERVICES:
                c.wait_for_service(name, 90)
    except BaseException:
        k.stop()
        raise
    return k


def warm(k: LocalKernel) -> LocalKernel:
    """One-time start-up costs (the SymPy solver child, the model's first forward, a simulation's
    imports) paid before anything is measured, so they land on no mode: a solve outside every
    workload's classes (not cached), a decode, a tiny simulation."""
    from clients import Client

    with Client(k.endpoint, timeout=120, retries=0) as c:
        c.call(
            "scch", {"op": "solve", "subgoal": {"kind": "integrate", "expr": "x*cos(x)", "var": "x"}, "cache": False}
        )
        c.call("decode", {"op": "generate", "prompt": "Q:1+2*3;", "max_new": 12, "keep": False})
        c.call("sim", {"case": "gaussian_diffusion", "blocks": 1, "cells": 4, "level": 0, "max_level": 0})
    return k
