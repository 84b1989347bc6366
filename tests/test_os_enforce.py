"""The OS enforcer (kernel/enforce.py) against real processes and real cgroups.

cgroup v1 tests need root and the v1 hierarchies mounted writable (this project's machines);
the cgroup v2 tests use the unified hierarchy's core files (freeze, kill, cpu.stat), which work
without delegated controllers, and a fake tree for the controller files.  Each skips with the
reason where that does not hold.  No test times anything: "frozen" is shown by CPU that does not
advance while this process burns CPU of its own."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from kernel import enforce as E

#: Bound of every wait here (seconds); generous: the machine may be busy.
WAIT = 30.0

BURN = "import os\nif os.fork() == 0:\n    while True: pass\nwhile True: pass\n"


def _v1_skip() -> str | None:
    if os.geteuid() != 0:
        return "cgroup v1 tests need root"
    mounts = E._mounts(E.CGROUP_ROOT)
    missing = [c for c in E.V1_CONTROLLERS if c not in mounts]
    return f"cgroup v1 hierarchies {missing} not mounted" if missing else None


def _v2_skip() -> str | None:
    if os.geteuid() != 0:
        return "cgroup v2 tests need root (or a delegated subtree)"
    if "unified" not in E._mounts(E.CGROUP_ROOT):
        return "no cgroup2 hierarchy mounted"
    return None


V1_SKIP, V2_SKIP = _v1_skip(), _v2_skip()
BACKENDS = [
    pytest.param(E.CGROUP1, marks=pytest.mark.skipif(V1_SKIP is not None, reason=V1_SKIP or "")),
    pytest.param(E.CGROUP2, marks=pytest.mark.skipif(V2_SKIP is not None, reason=V2_SKIP or "")),
    E.SIGNALS,
]


@pytest.fixture(params=BACKENDS)
def enforcer(request):
    # v2 here: core files only (this machine delegates no v2 controllers); v2 limits: fake tree below
    enf = E.open_enforcer(
        request.param,
        name=f"reca-test-{os.getpid()}-{request.node.name[-40:]}".replace("[", "_").replace("]", "_"),
        v2_require=(),
    )
    procs: list[subprocess.Popen] = []
    yield enf, procs
    enf.close()  # first: it kills whole trees (a killed parent's forked child would escape a signals group)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(WAIT)


def _spawn(procs, code: str, **kw) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", code], **kw)
    procs.append(p)
    return p


def _wait(cond, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _burn_own_cpu(seconds: float) -> None:
    t0 = time.process_time()
    while time.process_time() - t0 < seconds:
        pass


def test_limits_are_validated():
    with pytest.raises(ValueError, match="mem_bytes"):
        E.Limits(mem_bytes=10)
    with pytest.raises(ValueError, match="cpu_weight"):
        E.Limits(cpu_weight=0)
    with pytest.raises(ValueError, match="pids_max"):
        E.Limits(pids_max=-1)
    with pytest.raises(ValueError, match="bad group name"):
        E._check_name("../escape")


def test_weight_conversions():
    assert E.weight_to_shares(100) == 1024
    assert E.weight_to_shares(1000) == 10240
    assert E.weight_to_nice(100) == 0
    assert E.weight_to_nice(1000) < 0 < E.weight_to_nice(10)


def test_freeze_stops_a_whole_busy_tree_and_thaw_resumes_it(enforcer):
    enf, procs = enforcer
    p = _spawn(procs, BURN)
    group = enf.place_service("burn", p.pid)
    _wait(lambda: len(group.pids()) == 2, "the forked child to join the group")
    _wait(lambda: group.cpu_seconds() > 0.05, "the tree to burn some CPU")
    group.freeze()
    assert group.frozen()
    before = group.cpu_seconds()
    _burn_own_cpu(0.1)  # the machine ran; a frozen tree did not
    time.sleep(0.05)
    assert group.cpu_seconds() == pytest.approx(before, abs=0.01)
    group.thaw()
    assert not group.frozen()
    _wait(lambda: group.cpu_seconds() > before + 0.05, "the thawed tree to run again")


_CALLER_IN_KERNEL_GROUP = """
import subprocess, sys
from kernel import enforce as E
enf = E.open_enforcer(sys.argv[1], name=sys.argv[2], v2_require=())
p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
enf.place_service("svc", p.pid)
enf.enter_kernel()
if enf.backend != E.SIGNALS:
    try:
        enf.kernel.freeze()
        print("froze itself")
    except E.EnforcerError as exc:
        assert "cannot freeze itself" in str(exc), exc
print("killed", enf.kernel.kill())
enf.close()
print("svc", p.wait(30))
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_with_the_caller_in_the_kernel_group_never_stops_or_kills_the_caller(backend, tmp_path):
    """Run in a process of its own: the caller joins the kernel's group, and in the pytest process
    that would take pytest's other children (a forkserver, a resource tracker) into that group."""
    name = f"reca-test-{os.getpid()}-caller-{backend}"
    out = subprocess.run(
        [sys.executable, "-c", _CALLER_IN_KERNEL_GROUP, backend, name],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split("\n")
    assert "froze itself" not in lines
    assert "killed 0" in lines  # the caller is the only process there, and it is spared
    assert "svc -9" in lines  # close killed the service's tree


def test_kill_ends_every_process_of_the_tree(enforcer):
    enf, procs = enforcer
    p = _spawn(procs, BURN)
    group = enf.place_service("victim", p.pid)
    _wait(lambda: len(group.pids()) == 2, "the forked child to join the group")
    child = [pid for pid in group.pids() if pid != p.pid][0]
    assert group.kill() == 2
    assert p.wait(WAIT) == -9
    _wait(lambda: not E._alive(child) or _zombie(child), "the forked child to die")
    _wait(lambda: group.pids() == [] or all(_zombie(x) for x in group.pids()), "an empty group")


FORK_THEN_SAY = (
    "import os, sys\nif os.fork() == 0:\n    while True: pass\nprint('forked', flush=True)\nwhile True: pass\n"
)


def test_placing_a_process_takes_the_children_it_already_forked(enforcer):
    """A service that forked before it was placed: its child is moved with it (else it would
    escape every freeze, kill and ceiling of the group)."""
    enf, procs = enforcer
    p = _spawn(procs, FORK_THEN_SAY, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "forked"
    child = psutil.Process(p.pid).children()[0].pid
    group = enf.place_service("early", p.pid)
    assert sorted(group.pids()) == sorted([p.pid, child])
    assert group.kill() == 2
    assert p.wait(WAIT) == -9
    _wait(lambda: not E._alive(child) or _zombie(child), "the early child to die")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_cpu_billed_is_what_the_os_measured(enforcer):
    enf, procs = enforcer
    code = (
        "import sys, time\nsys.stdin.readline()\nt0 = time.process_time()\n"
        "while time.process_time() - t0 < 0.4: pass\n"
        "print(t0, time.process_time(), flush=True)\nsys.stdin.read()\n"
    )
    p = _spawn(procs, code, stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
    group = enf.place_service("meter", p.pid)
    p.stdin.write("go\n")  # placed before it burns: everything it burns is the group's
    p.stdin.flush()
    start, end = map(float, p.stdout.readline().split())
    billed = group.cpu_seconds()
    # at least the burn, at most its whole life (interpreter start-up included), each within 5%
    assert (end - start) * 0.95 <= billed <= end * 1.05 + 0.02
    p.stdin.close()
    p.wait(WAIT)


def test_a_child_joins_a_helper_group_of_its_service(enforcer):
    enf, procs = enforcer
    if enf.backend == E.SIGNALS:
        pytest.skip("the signals backend has no shared groups: a helper keeps only its rlimits")
    service = enf.service("svc")
    env = dict(os.environ, **{E.ENV_GROUP: service.handle(), "PYTHONPATH": os.getcwd()})
    code = (
        "from kernel import enforce as E\nE.join_group('tool')\nprint('in', flush=True)\nimport sys; sys.stdin.read()\n"
    )
    p = _spawn(procs, code, env=env, stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "in"
    assert p.pid in service.pids()
    assert p.pid in service.sub("tool").pids()
    enf.remove_service("svc")  # kills what is left and removes the groups
    assert p.wait(WAIT) == -9


@pytest.mark.skipif(V1_SKIP is not None, reason=V1_SKIP or "")
def test_v1_memory_ceiling_kills_the_process_past_it_and_counts_it():
    enf = E.open_enforcer(E.CGROUP1, name=f"reca-test-{os.getpid()}-mem")
    try:
        group = enf.service("hog", E.Limits(mem_bytes=64 << 20))
        p = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; sys.stdin.readline(); b = bytearray(300 << 20)"
                "\nfor i in range(0, len(b), 4096): b[i] = 1\nprint('survived')",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        group.sub("main").place(p.pid)
        p.stdin.write("go\n")
        p.stdin.flush()
        out, _ = p.communicate(timeout=WAIT)
        assert p.returncode == -9 and "survived" not in out
        stat = group.memory()
        assert stat.limit == 64 << 20 and stat.oom_kills >= 1
    finally:
        enf.close()


@pytest.mark.skipif(V1_SKIP is not None, reason=V1_SKIP or "")
def test_v1_pids_max_stops_a_fork_bomb():
    enf = E.open_enforcer(E.CGROUP1, name=f"reca-test-{os.getpid()}-pids")
    try:
        group = enf.service("bomb", E.Limits(pids_max=4))
        code = (
            "import os, sys\nsys.stdin.readline()\nmade = 0\nfor _ in range(20):\n    try:\n"
            "        pid = os.fork()\n    except BlockingIOError:\n        break\n"
            "    if pid == 0:\n        import time; time.sleep(60); os._exit(0)\n    made += 1\n"
            "print(made, flush=True)\n"
        )
        p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        group.sub("main").place(p.pid)
        p.stdin.write("go\n")
        p.stdin.flush()
        made = int(p.stdout.readline())
        assert made == 3  # the parent plus three children fill pids.max = 4
        group.kill()
        p.wait(WAIT)
    finally:
        enf.close()


@pytest.mark.skipif(V1_SKIP is not None, reason=V1_SKIP or "")
def test_v1_kernel_group_has_a_higher_weight_and_close_removes_every_group():
    name = f"reca-test-{os.getpid()}-close"
    enf = E.open_enforcer(E.CGROUP1, name=name)
    home = E._own_cgroups()
    try:
        kernel = enf.enter_kernel()
        assert (kernel.dirs["cpu"] / "cpu.shares").read_text().strip() == str(E.weight_to_shares(E.KERNEL_WEIGHT))
        assert os.getpid() in kernel.pids()
        enf.service("a", E.Limits(cpu_weight=E.DEFAULT_WEIGHT))
    finally:
        enf.close()
    assert E._own_cgroups() == home
    assert not any(d.exists() for d in enf.root.dirs.values())


def test_a_named_backend_that_is_missing_refuses_with_the_reason(tmp_path):
    with pytest.raises(E.EnforcerUnavailable, match="not mounted under") as info:
        E.open_enforcer(E.CGROUP1, root=str(tmp_path))
    assert info.value.backend == E.CGROUP1
    with pytest.raises(E.EnforcerUnavailable, match="no cgroup2"):
        E.open_enforcer(E.CGROUP2, root=str(tmp_path))
    with pytest.raises(ValueError, match="backend must be"):
        E.open_enforcer("cgroup3")


def test_auto_falls_back_to_signals_loudly_with_every_reason(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="reca.enforce"):
        enf = E.open_enforcer("auto", root=str(tmp_path))
    assert enf.backend == E.SIGNALS
    assert "FALLBACK" in enf.reason and "cgroup1" in enf.reason and "cgroup2" in enf.reason
    assert any("FALLBACK" in r.message for r in caplog.records)
    enf.close()


def test_signals_memory_ceiling_is_rlimit_as(tmp_path):
    enf = E.open_enforcer(E.SIGNALS)
    try:
        code = (
            "import sys\nsys.stdin.readline()\ntry:\n    b = bytearray(800 << 20)\nexcept MemoryError:\n"
            "    print('MemoryError', flush=True)\n"
        )
        p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        group = enf.place_service("capped", p.pid, E.Limits(mem_bytes=400 << 20))
        assert group.memory().limit == 400 << 20
        p.stdin.write("go\n")
        p.stdin.flush()
        out, _ = p.communicate(timeout=WAIT)
        assert out.strip() == "MemoryError"
    finally:
        enf.close()


def test_v2_limits_are_written_to_a_fake_tree(tmp_path):
    """The controller files of a delegated v2 subtree (none is delegated on this machine)."""
    root = tmp_path / "reca"
    root.mkdir()
    (root / "cgroup.subtree_control").write_text("")
    group = E.CgroupV2Group("reca", root, frozenset({"cpu", "memory", "pids"}))
    svc = group.sub("svc", E.Limits(mem_bytes=256 << 20, cpu_weight=50, pids_max=32))
    assert set((root / "cgroup.subtree_control").read_text().split()) == {"+cpu", "+memory", "+pids"}
    assert (svc.path / "memory.max").read_text() == str(256 << 20)
    assert (svc.path / "cpu.weight").read_text() == "50"
    assert (svc.path / "pids.max").read_text() == "32"
    bare = E.CgroupV2Group("bare", tmp_path, frozenset())
    with pytest.raises(E.EnforcerError, match="not enabled"):
        bare.set_limits(E.Limits(mem_bytes=1 << 30))
    handle = json.loads(svc.handle())
    assert handle == {"backend": "cgroup2", "path": str(svc.path), "controllers": ["cpu", "memory", "pids"]}


def test_kill_of_a_frozen_group_lands_without_waiting_for_a_freeze(enforcer):
    """The ladder's last rung on a frozen worker: SIGKILL every process, then thaw (a frozen v1
    task dies only once thawed) -- the whole tree dies and the group is left thawed."""
    enf, procs = enforcer
    p = _spawn(procs, BURN)
    group = enf.place_service("frozen", p.pid)
    _wait(lambda: len(group.pids()) == 2, "the forked child to join the group")
    group.freeze()
    assert group.kill() == 2
    assert p.wait(WAIT) == -9
    _wait(lambda: not group.pids(), "the frozen tree to die")
    assert not group.frozen()


_STALE_KERNEL = """
import subprocess, sys
from kernel import enforce as E
enf = E.open_enforcer(sys.argv[1], name=sys.argv[2], v2_require=())
p = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
enf.place_service("svc", p.pid).freeze()
print(p.pid, flush=True)
import os
os._exit(0)  # no exit handler runs: as if the kernel were killed with SIGKILL
"""


@pytest.mark.skipif(V1_SKIP is not None, reason=V1_SKIP or "")
def test_a_frozen_service_left_by_a_dead_kernel_is_thawed_and_killed_at_the_next_start():
    name = f"reca-{(1 << 22) + os.getpid()}"  # a kernel pid that cannot be alive (above any pid_max)
    out = subprocess.run(
        [sys.executable, "-c", _STALE_KERNEL, E.CGROUP1, name],
        capture_output=True,
        text=True,
        timeout=WAIT,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert out.returncode == 0, out.stderr
    orphan = int(out.stdout.split()[0])
    try:
        assert E._alive(orphan)  # frozen, outliving its kernel
        mounts, own = E._mounts(E.CGROUP_ROOT), E._own_cgroups()
        bases = [E._under(mounts[c], own.get(c, "/")) for c in E.V1_CONTROLLERS]  # freezer first
        for base in bases:  # what the next kernel's start does
            E._sweep_stale(base)
        _wait(lambda: not E._alive(orphan) or _zombie(orphan), "the orphan to die")
        assert not any((base / name).exists() for base in bases)
    finally:
        if E._alive(orphan):
            os.kill(orphan, 9)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except OSError:
        return True


@pytest.mark.skipif(V1_SKIP is not None, reason=V1_SKIP or "")
def test_a_v1_group_is_boosted_with_its_ancestors_and_gets_its_own_weights_back():
    """A boost (a freeze until it lands, a preempt until the worker pauses) gives the group and
    the subtree's root the largest cpu.shares; the freeze's ends once the group is frozen (it needs
    no CPU, and the boosted root would run the subtree's other groups ahead of the machine); a
    weight set while boosted applies at the unboost."""
    enf = E.open_enforcer(E.CGROUP1, name=f"reca-test-{os.getpid()}-boost")
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        group = enf.place_service("svc", p.pid, E.Limits(cpu_weight=50))
        shares = group.dirs["cpu"] / "cpu.shares"
        root = enf.root.dirs["cpu"] / "cpu.shares"
        own_root = root.read_text().strip()
        assert shares.read_text().strip() == str(E.weight_to_shares(50))
        group.boost("preempt")
        assert shares.read_text().strip() == root.read_text().strip() == str(E.SHARES_MAX)
        group.set_limits(E.Limits(cpu_weight=200))  # a new weight while boosted applies at the unboost
        assert shares.read_text().strip() == str(E.SHARES_MAX)
        group.freeze()  # boosted already: its own freeze boost ends when it lands, the preempt's holds
        assert shares.read_text().strip() == str(E.SHARES_MAX)
        group.unboost("preempt")
        assert shares.read_text().strip() == str(E.weight_to_shares(200)) and root.read_text().strip() == own_root
        group.thaw()
        group.freeze()
        assert shares.read_text().strip() == str(E.weight_to_shares(200))  # frozen: no boost left
        assert group.kill() == 1
        assert shares.read_text().strip() == str(E.weight_to_shares(200)) and root.read_text().strip() == own_root
    finally:
        enf.close()
        if p.poll() is None:
            p.kill()
        p.wait(WAIT)


THREADS = "import threading\nfor _ in range(3):\n    threading.Thread(target=lambda: [0 for _ in iter(int, 1)], daemon=True).start()\nwhile True: pass\n"


def _policies(pids: list[int]) -> dict[int, int]:
    out = {}
    for pid in pids:
        for t in psutil.Process(pid).threads():
            try:
                out[t.id] = os.sched_getscheduler(t.id)
            except OSError:  # gone
                pass
    return out


def test_a_freeze_raises_the_tasks_to_real_time_only_until_it_lands(enforcer):
    """A freeze runs the group's tasks at SCHED_FIFO once it is written, so that they run at once
    into it (kernel/enforce.py ``_fifo``); when it lands every task is back at its own policy -- a
    thawed task never runs at real-time priority -- and a task its owner set to SCHED_BATCH is left
    alone.  On cgroup v1 the real-time budget the group borrowed goes back to the subtree's root."""
    enf, procs = enforcer
    busy = _spawn(procs, THREADS)
    batch = _spawn(procs, "while True: pass")
    os.sched_setscheduler(batch.pid, os.SCHED_BATCH, os.sched_param(0))
    group = enf.place_service("busy", busy.pid)
    enf.place_service("busy", batch.pid)  # the same group: two processes in <busy>/main
    _wait(lambda: len(psutil.Process(busy.pid).threads()) == 4, "the worker's threads")
    for _ in range(5):
        group.freeze()
        assert group.frozen()
        pols = _policies([busy.pid, batch.pid])
        assert pols[batch.pid] == os.SCHED_BATCH
        assert {p for t, p in pols.items() if t != batch.pid} == {os.SCHED_OTHER}, pols
        if isinstance(group, E.CgroupV1Group):
            assert (group.dirs["cpu"] / "cpu.rt_runtime_us").read_text().strip() == "0"
            assert (group.dirs["cpu"] / "main" / "cpu.rt_runtime_us").read_text().strip() == "0"
        group.thaw()
        assert set(_policies([busy.pid]).values()) == {os.SCHED_OTHER}
    if isinstance(group, E.CgroupV1Group):
        root_rt = enf.root.dirs["cpu"] / "cpu.rt_runtime_us"
        if root_rt.exists():
            assert root_rt.read_text().strip() == str(E.RT_BUDGET_US)
    before = group.cpu_seconds()
    _wait(lambda: group.cpu_seconds() > before + 0.05, "the thawed group to run again")


@pytest.mark.skipif(os.geteuid() != 0, reason="raising a task to real-time priority needs root")
def test_fifo_raises_ordinary_tasks_and_unfifo_puts_them_back():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    batch = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        os.sched_setscheduler(batch.pid, os.SCHED_BATCH, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, sleeper.pid, 5)
        raised = E._fifo([sleeper.pid, batch.pid, 2**22 + 7])
        if not raised:
            pytest.skip("this process's cpu cgroup has no real-time budget: the freeze falls back to its boost")
        assert raised == [sleeper.pid]  # the batch task kept its policy, a gone tid skipped
        assert os.sched_getscheduler(sleeper.pid) & ~getattr(os, "SCHED_RESET_ON_FORK", 0) == os.SCHED_FIFO
        E._unfifo([sleeper.pid])
        assert os.sched_getscheduler(sleeper.pid) == os.SCHED_OTHER
        assert os.getpriority(os.PRIO_PROCESS, sleeper.pid) == 5  # its nice value survives
        assert os.sched_getscheduler(batch.pid) == os.SCHED_BATCH
        # a thread id that is not at what _fifo set (a recycled id of another process) is left alone
        E._unfifo([batch.pid])
        assert os.sched_getscheduler(batch.pid) == os.SCHED_BATCH
        os.sched_setscheduler(batch.pid, os.SCHED_FIFO, os.sched_param(2))
        E._unfifo([batch.pid])
        assert os.sched_getscheduler(batch.pid) == os.SCHED_FIFO
    finally:
        for p in (sleeper, batch):
            p.kill()
            p.wait(WAIT)


# -- a freeze that lands after its caller stopped waiting gives back what it raised (Landing) ------


def test_landing_gives_the_budget_back_when_the_freeze_lands():
    land = E.Landing(since=10.0, hold=0.02, watch=1.0)
    assert land.step(10.005, landed=False) == (False, False)  # still landing, within its hold
    assert land.step(10.006, landed=True) == (True, True)  # landed: all of it back at once
    assert not land.rt


def test_landing_gives_the_budget_back_at_its_hold_then_the_rest_when_it_lands():
    land = E.Landing(since=0.0, hold=0.02, watch=1.0)
    assert land.step(0.019, landed=False) == (False, False)
    assert land.step(0.02, landed=False) == (True, False)  # the budget goes back; the boost takes over
    assert land.step(0.5, landed=False) == (False, False)  # given once
    assert land.step(0.6, landed=True) == (False, True)  # landed: the boost ends


def test_landing_stops_watching_a_freeze_that_never_lands():
    land = E.Landing(since=0.0, hold=0.02, watch=1.0)
    assert land.step(1.0, landed=False) == (True, True)  # never past its watch, the budget with it
    land = E.Landing(since=0.0, rt=False)  # a boosted freeze (no budget): only the boost to end
    assert land.step(0.5, landed=False) == (False, False)
    assert land.step(0.6, landed=True) == (False, True)


@pytest.mark.skipif(V1_SKIP is not None, reason=V1_SKIP or "")
def test_a_v1_freeze_that_outlasts_its_wait_gives_its_real_time_budget_back_without_a_thaw():
    """The ladder waits 5 ms for a freeze; one that lands later kept the real-time budget it
    borrowed (and its tasks at SCHED_FIFO) until the thaw a second later.  Here the freeze
    cannot land at once: a thread of the group runs at SCHED_IDLE beside a busy process of the
    same cpu group on one CPU, so it is scheduled rarely.  The budget must come back while the
    group is still frozen (or freezing), with no thaw: bounded waits, nothing timed."""
    enf = E.open_enforcer(E.CGROUP1, name=f"reca-test-{os.getpid()}-landing")
    procs: list[subprocess.Popen] = []
    try:
        slow = _spawn(
            procs,
            "import threading, time\n"
            "threading.Thread(target=lambda: [0 for _ in iter(int, 1)], daemon=True).start()\n"
            "time.sleep(600)\n",
        )
        burner = _spawn(procs, "while True: pass")
        group = enf.place_service("slow", slow.pid)
        cpu_rt = group.dirs["cpu"] / "cpu.rt_runtime_us"
        if not cpu_rt.exists():
            pytest.skip("no real-time group scheduling here: a freeze borrows no budget")
        _wait(lambda: len(psutil.Process(slow.pid).threads()) == 2, "the spinning thread")
        spin = next(t.id for t in psutil.Process(slow.pid).threads() if t.id != slow.pid)
        one = {min(os.sched_getaffinity(0))}
        os.sched_setaffinity(spin, one)
        os.sched_setaffinity(burner.pid, one)
        os.sched_setscheduler(spin, os.SCHED_IDLE, os.sched_param(0))
        (group.dirs["cpu"] / "main" / "cgroup.procs").write_text(str(burner.pid))  # its cpu group only
        state = group.dirs["freezer"] / "freezer.state"
        for _ in range(20):  # the idle thread may be the one running at the write: then it lands at once
            try:
                group.freeze(timeout=0.0)
            except E.FreezeTimeout:
                break
            group.thaw()
        else:
            pytest.skip("every freeze landed within its wait here")
        # the budget comes back, and the main thread the freeze raised is back at SCHED_OTHER
        _wait(
            lambda: (
                cpu_rt.read_text().strip() == "0"
                and (group.dirs["cpu"] / "main" / "cpu.rt_runtime_us").read_text().strip() == "0"
            ),
            "the budget back",
        )
        assert os.sched_getscheduler(slow.pid) == os.SCHED_OTHER
        assert state.read_text().strip() in ("FREEZING", "FROZEN")  # no thaw came
        _wait(lambda: state.read_text().strip() == "FROZEN", "the freeze to land")  # it does, on its own
        _wait(lambda: E._LANDER.pending() == 0, "the lander to let the group go")
        assert "freeze" not in group._boosts  # the boost that took over ended when it landed
        # The spinner back to an ordinary thread on every CPU: at SCHED_IDLE beside a burner on one
        # busy CPU it may wait seconds for its first tick, and whether it runs again is the question.
        os.sched_setscheduler(spin, os.SCHED_OTHER, os.sched_param(0))
        os.sched_setaffinity(spin, os.sched_getaffinity(0))
        group.thaw()
        before = group.cpu_seconds()
        _wait(lambda: group.cpu_seconds() > before + 0.05, "the thawed group to run again")
    finally:
        for p in procs[1:]:  # the burner first: it is in the group's cpu hierarchy only
            p.kill()
            p.wait(WAIT)
        enf.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(WAIT)
