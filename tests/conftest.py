"""Shared fixtures.  Strict by design: sockets closed with linger 0, temporary ipc paths,
short heartbeats, every wait bounded (pytest-timeout as the global bound)."""

from __future__ import annotations

import inspect

import pytest
import zmq

from clients.launch import LocalKernel
from tests.support import KernelProcess, service_block

#: How many of a kernel's last output lines a failing test's report carries.
KERNEL_LINES_ON_FAILURE = 80


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test's report carries the last lines each kernel it used printed (its log: a
    traceback the kernel logged, an ``internal_error``'s cause), so that a failure seen once under
    load -- in CI, say -- can be read, not only re-run."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for name, value in getattr(item, "funcargs", {}).items():
        if isinstance(value, LocalKernel):
            lines = value.lines[-KERNEL_LINES_ON_FAILURE:]
            if lines:
                report.sections.append((f"output of the kernel {name!r} (last {len(lines)} lines)",
                                        "\n".join(lines)))


@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_pycollect_makeitem(collector, name, obj):
    """pytest-asyncio runs in strict mode (pyproject) so that tests marked ``anyio`` run under
    anyio's plugin, on asyncio *and* trio; every other async test gets the ``asyncio`` mark here,
    as auto mode would give it.  (trylast: this wrapper is the innermost, so the mark is there
    before pytest-asyncio looks for it.)"""
    outcome = yield
    items = outcome.get_result()
    for item in items if isinstance(items, list) else [items]:
        if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(getattr(item, "obj", None)) \
                and item.get_closest_marker("anyio") is None and item.get_closest_marker("asyncio") is None:
            item.add_marker("asyncio")


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
