"""The supervisor's stop-all: every child is signalled before any is waited for, each keeps its
own shutdown timeout and SIGKILL fallback, and nothing a child started outlives the kernel.

No timing: the children themselves prove the stop is concurrent.  Each "barrier" child answers
SIGTERM by waiting until every barrier child has had its SIGTERM (marker files) and only then
exits 0; stopped one after another, the first would wait in vain and exit 3 (bounded).  A
"stubborn" child ignores SIGTERM and leaves a helper in its process group: SIGKILL after its
own (short) timeout takes both.  A "pooled" child closes its own multiprocessing pool when told
to stop: SIGTERM goes to the child, not its group, so its helpers are its own to stop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import psutil

from clients.launch import wait_ended
from kernel.supervisor import ChildSpec, ChildState, Supervisor
from tests.support import KernelProcess, service_block

WAIT = 30.0
#: How long a barrier child waits for the others' SIGTERM before it gives up (exit 3).
BARRIER_S = 20.0
BARRIER = (
    "import os, signal, sys, time\n"
    "d, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])\n"
    "def term(*_):\n"
    "    open(os.path.join(d, name + '.term'), 'w').close()\n"
    f"    deadline = time.monotonic() + {BARRIER_S}\n"
    "    while time.monotonic() < deadline:\n"
    "        seen = sorted(f[:-5] for f in os.listdir(d) if f.endswith('.term'))\n"
    "        if len(seen) == n:\n"
    "            with open(os.path.join(d, name + '.saw'), 'w') as fh:\n"
    "                fh.write(','.join(seen))\n"
    "            os._exit(0)\n"
    "        time.sleep(0.02)\n"
    "    os._exit(3)\n"
    "signal.signal(signal.SIGTERM, term)\n"
    "open(os.path.join(d, name + '.ready'), 'w').close()\n"
    "while True:\n"
    "    signal.pause()\n"
)
STUBBORN = (
    "import os, signal, sys\n"
    "d = sys.argv[1]\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    while True:\n"
    "        signal.pause()\n"
    "with open(os.path.join(d, 'helper.pid'), 'w') as fh:\n"
    "    fh.write(str(pid))\n"
    "open(os.path.join(d, 'stubborn.ready'), 'w').close()\n"
    "while True:\n"
    "    signal.pause()\n"
)
#: A service stand-in with a helper of its own: a multiprocessing pool, closed in its teardown.
#: Its idle worker waits for a task holding the pool's queue lock; had the stop signalled the
#: whole group, the worker would die holding it and pool.terminate() wait for it forever.
POOLED = (
    "import multiprocessing, os, signal, sys, time\n"
    "pool = multiprocessing.get_context('fork').Pool(1)\n"
    "assert pool.apply(abs, (-1,)) == 1\n"
    "got = []\n"
    "signal.signal(signal.SIGTERM, lambda *_: got.append(1))\n"
    "time.sleep(0.2)  # the worker is back waiting for its next task\n"
    "open(os.path.join(sys.argv[1], 'pooled.ready'), 'w').close()\n"
    "while not got:\n"
    "    time.sleep(0.02)\n"
    "pool.terminate()\n"
    "pool.join()\n"
)
NAMES = ("b1", "b2", "b3")


def _barrier_argv(d: str, name: str) -> list[str]:
    return [sys.executable, "-c", BARRIER, d, name, str(len(NAMES))]


def _wait_ready(d: str) -> psutil.Process:
    """Bounded wait until every child has armed its handler; the stubborn child's helper."""
    deadline = time.monotonic() + WAIT
    while not all(os.path.exists(os.path.join(d, f"{n}.ready")) for n in (*NAMES, "stubborn")):
        assert time.monotonic() < deadline, f"children not ready: {sorted(os.listdir(d))}"
        time.sleep(0.02)
    with open(os.path.join(d, "helper.pid")) as fh:
        return psutil.Process(int(fh.read()))


def _check_barrier(d: str) -> None:
    for n in NAMES:
        path = os.path.join(d, f"{n}.saw")
        assert os.path.exists(path), f"{n} never saw every child's SIGTERM: {sorted(os.listdir(d))}"
        with open(path) as fh:
            assert fh.read().split(",") == sorted(NAMES)


async def test_shutdown_signals_every_child_at_once_and_kills_the_stubborn_one_after_its_timeout(tmp_path):
    d = str(tmp_path)
    specs = [ChildSpec(n, _barrier_argv(d, n), shutdown_timeout=60.0) for n in NAMES]
    specs.append(ChildSpec("stubborn", [sys.executable, "-c", STUBBORN, d], shutdown_timeout=0.5))
    sup = Supervisor(specs, env={})
    try:
        await sup.start()
        helper = _wait_ready(d)
        pids = [psutil.Process(c.pid) for c in sup.children]
    finally:
        await sup.shutdown()
    assert all(c.state is ChildState.SHUTDOWN for c in sup.children)
    assert [sup.child(n).last_exit for n in NAMES] == [0, 0, 0]  # each ended on its SIGTERM, none killed
    _check_barrier(d)
    assert sup.child("stubborn").last_exit == -signal.SIGKILL
    assert wait_ended([*pids, helper], WAIT) == []  # its helper went with its group


def test_a_kernel_stops_its_children_together_and_none_outlives_it(tmp_path):
    d = str(tmp_path)
    services = "".join(service_block(n, command=_barrier_argv(d, n), shutdown_timeout_s=60.0) for n in NAMES)
    services += service_block("stubborn", command=[sys.executable, "-c", STUBBORN, d], shutdown_timeout_s=0.5)
    k = KernelProcess(services)
    try:
        helper = _wait_ready(d)
    finally:
        rc = k.stop()  # asserts the kernel ended within its bound and left no process behind
    assert rc == 0
    _check_barrier(d)
    assert wait_ended([helper], WAIT) == []


async def test_a_child_stops_its_own_helpers_before_its_group_is_killed(tmp_path):
    d = str(tmp_path)
    sup = Supervisor([ChildSpec("pooled", [sys.executable, "-c", POOLED, d], shutdown_timeout=10.0)], env={})
    try:
        await sup.start()
        deadline = time.monotonic() + WAIT
        while not os.path.exists(os.path.join(d, "pooled.ready")):
            assert time.monotonic() < deadline, "the pooled child never became ready"
            await asyncio.sleep(0.02)
        kids = psutil.Process(sup.child("pooled").pid).children(recursive=True)
        assert kids, "the pool has no worker"
    finally:
        await sup.shutdown()
    assert sup.child("pooled").last_exit == 0  # its teardown ran to the end, not SIGKILLed at its timeout
    assert wait_ended(kids, WAIT) == []
