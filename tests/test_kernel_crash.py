"""Durable enforcement, system tests (issue 14): SIGKILL a real kernel and start another on the
same runtime directory; a crash is never a way around a budget, and a request in flight at the
crash is not run twice.  Written against the wire only."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading

import pytest

from clients import Client
from kernel import errors
from kernel import protocol as P
from tests.support import REPO, KernelProcess, service_block, short_tmpdir

pytestmark = pytest.mark.system


def _kernel(runtime: str) -> KernelProcess:
    return KernelProcess(service_block("echo", "services.echo"), runtime_dir=runtime)


def test_a_kernel_crash_resets_no_budget():
    runtime = short_tmpdir()
    k = _kernel(runtime)
    try:
        with Client(k.endpoint, timeout=10, retries=0) as c:
            c.wait_for_service("echo", 20)
            c.open_job("exp", {"flops": 10_000, "units": 5})
            c.call("echo", {"steps": 3, "step_ms": 1}, job="exp")  # spends 3,000 flops
            c.mmi(P.MMI_PREFIX + "gate.reserve", {"job": "exp", "resource": "units", "amount": 2, "lease_s": 600})
            before = c.mmi(P.MMI_PREFIX + "job.stats", {"job": "exp"})
    finally:
        k.kill()
    k2 = _kernel(runtime)
    try:
        with Client(k2.endpoint, timeout=10, retries=0) as c:
            c.wait_for_service("echo", 20)
            after = c.mmi(P.MMI_PREFIX + "job.stats", {"job": "exp"})
            assert after["spent"]["flops"] == before["spent"]["flops"] == 3000
            assert after["remaining"]["units"] == 3  # the held reservation came back with its lease
            with pytest.raises(errors.Refused):
                c.reserve("exp", "units", 4)
            with pytest.raises(errors.BadRequest):
                c.open_job("exp", {"flops": 1e9})  # no fresh budget by re-opening
            assert c.call("echo", {"steps": 2, "step_ms": 1}, job="exp") is not None  # not "unknown job"
            assert c.mmi(P.MMI_PREFIX + "job.stats", {"job": "exp"})["spent"]["flops"] == 5000
        assert any("restored" in line for line in k2.lines)
        out = subprocess.run([sys.executable, "-m", "kernel", "replay", k2.decision_log], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "divergences 0" in out.stdout
    finally:
        k2.stop()
        shutil.rmtree(runtime, ignore_errors=True)


def test_a_request_in_flight_at_the_crash_is_not_run_twice():
    runtime = short_tmpdir()
    k = _kernel(runtime)
    result: dict = {}
    try:
        with Client(k.endpoint, timeout=10, retries=0) as c:
            c.wait_for_service("echo", 20)

            def call() -> None:
                with Client(k.endpoint, timeout=3, retries=6) as slow:
                    try:
                        result["value"] = slow.call("echo", {"steps": 100, "step_ms": 100}, idem="once-only")
                    except errors.RecaError as exc:
                        result["error"] = exc

            t = threading.Thread(target=call)
            t.start()
            while c.stats()["services"]["echo"]["inflight"] < 1:
                pass  # bounded by the pytest timeout; the call starts within milliseconds
            k.kill()
        k = _kernel(runtime)
        t.join(60)
        assert not t.is_alive()
        assert getattr(result.get("error"), "code", None) == "kernel_restarted", result
        with Client(k.endpoint, timeout=10, retries=0) as c:
            assert c.stats()["ledger"].get("interrupted_retries", 0) >= 1
    finally:
        k.stop()
        shutil.rmtree(runtime, ignore_errors=True)
