"""The supervisor with an OS enforcer: each child in a group of its own, helpers beside it, the
group frozen, killed whole (then restarted) and removed on shutdown.  Real processes; the cgroup
v1 backend where this machine offers it (root, hierarchies mounted), else signals.  No timing."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import pytest

from kernel import enforce as E
from kernel.supervisor import ChildSpec, ChildState, Supervisor

WAIT = 30.0
#: A service stand-in: forks a helper that joins the helper group "tool", then both spin.
SERVICE = (
    "import os\n"
    "if os.fork() == 0:\n"
    "    from kernel import enforce as E\n"
    "    E.join_group('tool')\n"
    "    while True: pass\n"
    "while True: pass\n"
)


def _backend() -> str:
    if os.geteuid() == 0 and all(c in E._mounts(E.CGROUP_ROOT) for c in E.V1_CONTROLLERS):
        return E.CGROUP1
    return E.SIGNALS


async def _until(cond, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_children_live_in_their_groups_which_freeze_kill_restart_and_go_away():
    enf = E.open_enforcer(_backend(), name=f"reca-test-{os.getpid()}-sup")
    spec = ChildSpec("svc", [sys.executable, "-c", SERVICE], mem_bytes=512 << 20, cpu_weight=100, pids_max=64)
    sup = Supervisor([spec], env={"PYTHONPATH": os.getcwd()}, enforcer=enf, backoff_initial=0.01)
    try:
        await sup.start()
        child = sup.child("svc")
        group = child.group
        assert group is not None and sup.stats()["enforcer"]["backend"] == enf.backend
        first = child.pid
        if enf.backend != E.SIGNALS:
            assert first in group.sub("main").pids()
            await _until(lambda: len(group.sub("tool").pids()) == 1, "the helper to join its group")
            assert group.memory().limit == 512 << 20
        await _until(lambda: (sup.cpu_seconds("svc") or 0) > 0.05, "the service to burn CPU")
        assert sup.group_cpu_of_pid(child.pid) >= sup.cpu_seconds("svc") * 0.99  # what the kernel's host bills
        assert sup.group_cpu_of_pid(os.getpid()) is None  # not a supervised child
        sup.freeze("svc")
        assert child.state is ChildState.STOPPED
        before = sup.cpu_seconds("svc")
        t0 = time.process_time()
        while time.process_time() - t0 < 0.1:  # the machine runs; the frozen group does not
            pass
        assert sup.cpu_seconds("svc") == pytest.approx(before, abs=0.01)
        sup.resume("svc")
        assert sup.kill_group("svc") >= 1  # service and helper alike; then the supervisor restarts it
        await _until(lambda: child.pid not in (None, first) and child.state is ChildState.RUNNING, "a restart")
        assert child.restarts == 1
        if enf.backend != E.SIGNALS:
            assert child.pid in group.sub("main").pids()
    finally:
        await sup.shutdown()
        enf.close()
    if enf.backend == E.CGROUP1:
        assert not any(d.exists() for d in enf.root.dirs.values())


def test_status_shows_the_backend_and_each_childs_group():
    from clients.__main__ import render_status

    out = render_status(
        {
            "children": [
                {
                    "name": "echo",
                    "state": "running",
                    "pid": 1,
                    "restarts": 0,
                    "last_exit": None,
                    "restart": "permanent",
                    "group": "reca-1/echo",
                }
            ],
            "enforcer": {"backend": "cgroup1", "reason": "cgroup v1: mounted writable"},
        }
    )
    assert "reca-1/echo" in out
    assert "ENFORCER  cgroup1: cgroup v1: mounted writable" in out
