"""The node agent of a Ray-placed worker (kernel/rayplace.py ``ServiceAgent``) carries out the
ladder's orders one at a time, in the kernel's order: it is a threaded Ray actor, so calls sent
one after the other may run in any order, and a thaw overtaken by the freeze it follows left the
worker frozen for good.  Each order is numbered by the kernel (``RemoteProcess.signal``); a freeze
or thaw older than the latest one applied is dropped.  Real processes: a local Ray node
(tests/ray_support.py), the agent as the kernel starts it (max_concurrency 4), its service in
this node's enforcer group.  Nothing is timed; every wait is bounded."""

from __future__ import annotations

import random
import signal
import sys
import time

import pytest

from kernel import ladder, rayplace
from tests.ray_support import connect_driver, local_cluster

pytestmark = [pytest.mark.system, pytest.mark.timeout(600)]

#: Bound on each wait (a loaded 2-core machine).
WAIT = 120.0
#: The service: ~20 % of a CPU, so "it runs" shows as CPU that advances; it ends with its agent.
WORK = (
    "import os, time\n"
    "parent = os.getppid()\n"
    "while os.getppid() == parent:\n"
    "    t = time.time()\n"
    "    while time.time() - t < 0.002: pass\n"
    "    time.sleep(0.008)\n"
)


def test_the_node_agents_freeze_times_out_before_the_ladders_kill_grace():
    # a freeze that cannot land must not hold the agent's next order (the thaw, the kill) a whole kill grace
    assert rayplace.NODE_FREEZE_TIMEOUT_S < ladder.Ladder().kill_grace


def _until(cond, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_stale_freeze_or_thaw_is_dropped_and_the_last_order_wins(request):
    cluster = local_cluster(request)
    import ray
    import zmq

    connect_driver(cluster)
    actor = None
    try:
        actor = (
            ray.remote(rayplace.ServiceAgent)
            .options(max_concurrency=4, max_restarts=0, num_cpus=0)
            .remote("spin", "service:spin")
        )
        ray.get(actor.enrol.remote(), timeout=WAIT)
        public = zmq.curve_keypair()[0].decode()
        started = ray.get(
            actor.start.remote([sys.executable, "-c", WORK], {}, public, {"backend": "auto", "limits": {}}),
            timeout=WAIT,
        )
        assert started["enforcer"] is not None, started

        def cpu() -> float:
            return float(ray.get(actor.cpu_seconds.remote(), timeout=WAIT))

        def runs() -> None:
            before = cpu()
            _until(lambda: cpu() > before + 0.02, "the service to run")

        def call(sig: int, seq: int) -> bool:
            return bool(ray.get(actor.signal.remote(int(sig), seq), timeout=WAIT))

        runs()
        assert call(signal.SIGSTOP, 1) and ray.get(actor.frozen.remote(), timeout=WAIT)
        assert call(signal.SIGCONT, 3) and not ray.get(actor.frozen.remote(), timeout=WAIT)
        # the freeze numbered 2 arrives after the thaw numbered 3: stale, dropped
        assert not call(signal.SIGSTOP, 2)
        assert not ray.get(actor.frozen.remote(), timeout=WAIT)
        runs()

        # many freezes and thaws at once, sent in a shuffled order (the actor runs 4 at a time)
        for last, want_frozen in ((signal.SIGCONT, False), (signal.SIGSTOP, True), (signal.SIGCONT, False)):
            base = int(ray.get(actor.__ray_call__.remote(lambda a: a.last_order), timeout=WAIT))
            orders = [(base + 1 + i, signal.SIGSTOP if i % 2 == 0 else signal.SIGCONT) for i in range(39)]
            orders.append((base + 40, last))
            random.Random(base).shuffle(orders)
            refs = [actor.signal.remote(int(sig), seq) for seq, sig in orders]
            ray.get(refs, timeout=WAIT)
            assert ray.get(actor.__ray_call__.remote(lambda a: a.last_order), timeout=WAIT) == base + 40
            assert ray.get(actor.frozen.remote(), timeout=WAIT) is want_frozen, (last, orders)
            if not want_frozen:
                runs()
        ray.get(actor.stop.remote(5.0), timeout=WAIT)
    finally:
        if actor is not None:
            ray.kill(actor, no_restart=True)  # its service dies with it (PR_SET_PDEATHSIG)
        ray.shutdown()
