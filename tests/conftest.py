"""Shared fixtures.  Strict by design: sockets closed with linger 0, temporary ipc paths,
short heartbeats, every wait bounded (pytest-timeout as the global bound)."""

from __future__ import annotations

import pytest
import zmq

from tests.support import KernelProcess, service_block


@pytest.fixture
def zctx():
    """A private ZeroMQ context; fails the test if a socket is left open."""
    ctx = zmq.Context()
    yield ctx
    leftover = [s for s in list(ctx._sockets) if not s.closed] if hasattr(ctx, "_sockets") else []
    ctx.destroy(linger=0)
    assert not leftover, f"{len(leftover)} socket(s) left open"


@pytest.fixture
def kernel_echo():
    """A kernel with two echo workers (heartbeat 0.2 s, liveness 3)."""
    k = KernelProcess(service_block("echo", "services.echo", replicas=2))
    try:
        yield k
    finally:
        k.stop()
