"""Exactly-once requests through a real ``python -m kernel`` (issue 25): a client killed mid-call
whose retry (same idempotency key, a new process) finds the work ran once; a call with no
partials that outlives the client's timeout is retried and still runs once; a retry after the
FINAL gets the stored FINAL, also after the kernel restarts.  "Ran" is read from the kernel's
own decision log (one ``run`` record per dispatch of a key), never from timing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from clients import Client
from clients.launch import REPO
from tests.support import KernelProcess, service_block, short_tmpdir
from kernel.logstore import read_records

pytestmark = pytest.mark.system

WORK = {"steps": 150, "step_ms": 20}  # 3 s of work, no partials


def runs_of(client: Client, kern: KernelProcess, idem: str) -> int:
    client.stats()  # flushes the kernel's decision log
    return sum(1 for r in read_records(kern.decision_log) if r["op"] == "run" and r.get("in", {}).get("idem") == idem)


def in_flight(client: Client, service: str = "echo") -> int:
    return sum(w["inflight"] for w in client.stats()["workers"] if w["service"] == service)


@pytest.fixture(scope="module")
def kern():  # one kernel for the module (suite time): each test uses its own idempotency keys
    k = KernelProcess(service_block("echo", "services.echo", replicas=2), heartbeat=0.2, liveness=10)
    try:
        with Client(k.endpoint, timeout=30, retries=0) as c:
            c.wait_for_service("echo", 60)
        yield k
    finally:
        k.stop()


def test_a_killed_client_retries_and_the_work_ran_once(kern):
    idem = uuid.uuid4().hex
    script = (
        "import sys; from clients import Client\n"
        "with Client(sys.argv[1], timeout=60, retries=0) as c:\n"
        f"    c.call('echo', {WORK!r}, idem=sys.argv[2])\n"
    )
    victim = subprocess.Popen(
        [sys.executable, "-c", script, kern.endpoint, idem], cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}
    )
    try:
        with Client(kern.endpoint, timeout=60, retries=0) as c:
            deadline = time.monotonic() + 60
            while in_flight(c) == 0:  # the kernel's own record: the call is running
                assert time.monotonic() < deadline and victim.poll() is None, "the call never ran"
                time.sleep(0.02)
            victim.send_signal(signal.SIGKILL)
            victim.wait(30)
            out = c.call("echo", WORK, idem=idem)  # the retry from another process, same key
            assert out["steps_done"] == WORK["steps"]
            assert runs_of(c, kern, idem) == 1
            assert c.stats()["dedup"]["attached"] >= 1
            again = c.call("echo", WORK, idem=idem)  # after the FINAL: the stored one
            assert again == out and runs_of(c, kern, idem) == 1
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait(30)


def test_a_call_without_partials_outliving_the_timeout_runs_once(kern):
    """The client's timeout (1 s) is shorter than the work (3 s): each retry attaches to the
    running attempt, and the FINAL reaches whichever attempt is current."""
    idem = uuid.uuid4().hex
    with Client(kern.endpoint, timeout=1.0, retries=60) as c:
        out = c.call("echo", WORK, idem=idem)
        assert out["steps_done"] == WORK["steps"]
        assert runs_of(c, kern, idem) == 1


def test_the_stored_final_survives_a_kernel_restart():
    runtime = short_tmpdir("reca-once-")
    idem = uuid.uuid4().hex
    k = KernelProcess(service_block("echo", "services.echo"), heartbeat=0.2, runtime_dir=runtime)
    try:
        with Client(k.endpoint, timeout=30, retries=0) as c:
            c.wait_for_service("echo", 60)
            first = c.call("echo", {"steps": 3, "step_ms": 1}, idem=idem)
            assert runs_of(c, k, idem) == 1
    finally:
        k.stop()
    k = KernelProcess(service_block("echo", "services.echo"), heartbeat=0.2, runtime_dir=runtime)
    try:
        with Client(k.endpoint, timeout=30, retries=0) as c:
            c.wait_for_service("echo", 30)
            assert c.call("echo", {"steps": 3, "step_ms": 1}, idem=idem) == first
            assert runs_of(c, k, idem) == 1  # the log holds both kernels' decisions: still one run
    finally:
        k.stop()
