"""bench routing's measuring parts: CPU read around slices (/proc schedstat), the extra arms from
the environment, the processes' environment and the pure core's queued path.  Nothing here
judges a figure: only that each part measures what it says (no timed assertion)."""

import collections
import glob
import os
import subprocess
import sys
import threading

import pytest

from bench import _core_loop, routing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_snap_reads_every_thread_and_a_gone_process_reads_empty():
    started, stop = threading.Event(), threading.Event()

    def idle():
        started.set()
        stop.wait()

    t = threading.Thread(target=idle)
    t.start()
    try:
        started.wait()
        ns, user, system = routing._snap(os.getpid())
        assert t.native_id in ns and threading.main_thread().native_id in ns
        assert all(v >= 0 for v in ns.values()) and user >= 0 and system >= 0
    finally:
        stop.set()
        t.join()
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert routing._snap(int(done.stdout)) == ({}, 0, 0)  # exited: nothing to read, no error


def test_spent_counts_new_threads_and_never_goes_negative():
    a = ({1: 1_000, 2: 5_000, 3: 9_000}, 10, 2)
    # thread 2 exited, thread 4 started, thread 3's id was reused by a new thread (value below the old)
    b = ({1: 3_000, 3: 400, 4: 600}, 13, 3)
    run, user, system = routing._spent(a, b)
    assert run == pytest.approx((2_000 + 400 + 600) / 1e9)
    assert (user, system) == ((13 - 10) / routing._TICK, (3 - 2) / routing._TICK)
    assert routing._spent(b, b) == (0.0, 0.0, 0.0)


def test_meter_sums_only_the_slices_it_is_read_around(monkeypatch):
    clock = {"ns": 0}
    monkeypatch.setattr(routing, "_snap", lambda pid: ({pid: clock["ns"]}, 0, 0))
    m = routing._Meter([7])
    for _ in range(3):
        m.start()
        clock["ns"] += 1_000  # the system's own slice
        m.stop()
        clock["ns"] += 1_000_000  # idle while the other systems are measured: not charged
    assert m.total == [[pytest.approx(3e-6), 0.0, 0.0]]


def test_arms_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("RECA_BENCH_BASELINE", raising=False)
    monkeypatch.delenv("RECA_BENCH_COMPILED", raising=False)
    assert [a[0] for a in routing._arms()] == [""]
    assert routing._arms()[0][3] == {"RECA_COMPILED": None}  # the plain arm is the pure path
    monkeypatch.setenv("RECA_BENCH_BASELINE", str(tmp_path))
    with pytest.raises(ValueError, match="not a source tree"):
        routing._arms()
    (tmp_path / "kernel").mkdir()
    monkeypatch.setenv("RECA_BENCH_COMPILED", str(tmp_path / "build"))
    with pytest.raises(ValueError, match="not a directory"):
        routing._arms()
    (tmp_path / "build").mkdir()
    arms = routing._arms()
    assert [(s, tree) for s, _, tree, _ in arms] == [("", None), ("_baseline", str(tmp_path)), ("_compiled", None)]
    assert arms[1][3] == {"RECA_COMPILED": None} and arms[2][3] == {"RECA_COMPILED": str(tmp_path / "build")}


def test_procs_start_sets_tree_and_drops_a_stray_compiled_core(monkeypatch, tmp_path):
    monkeypatch.setenv("RECA_COMPILED", "/nonexistent/build")
    out = tmp_path / "env.txt"
    code = (
        "import os, sys; open(sys.argv[1], 'w').write(repr((os.environ.get('RECA_COMPILED'), os.getcwd(), "
        "os.environ['PYTHONPATH'], os.environ['RECA_RUNTIME_DIR'])))"
    )
    procs = routing.Procs()
    try:
        procs.start("-c", code, str(out), tree=str(tmp_path), env=routing.PURE).wait(60)
        assert eval(out.read_text()) == (None, str(tmp_path), str(tmp_path), procs.dir)
        procs.start("-c", code, str(out), env={"RECA_COMPILED": "/b"}, runtime=str(tmp_path)).wait(60)
        assert eval(out.read_text()) == ("/b", os.getcwd(), os.getcwd(), str(tmp_path))
        procs.start("-c", code, str(out)).wait(60)  # other benchmarks: the environment as it is
        assert eval(out.read_text())[0] == "/nonexistent/build"
    finally:
        procs.close()


def test_queued_core_loop_queues_and_dispatches_every_request(monkeypatch, tmp_path):
    import tempfile

    from kernel.logstore import read_stream

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    got = _core_loop.measure(_core_loop.ROUND, queued=True)
    assert got["requests"] == _core_loop.ROUND and got["queued"] is True
    (log,) = glob.glob(str(tmp_path / "reca-core-*" / "decisions.log"))
    with open(log, "rb") as fh:
        records = read_stream(fh.read())[0]
    ops = collections.Counter(r["op"] if isinstance(r, dict) else r[2] for r in records)
    n = _core_loop.ROUND
    # the request the worker holds before the first turn is admitted and dispatched without queueing
    assert (ops["admit"], ops["queue"], ops["dispatch"], ops["finish"]) == (n + 1, n, n, n)


def test_pure_core_runs_this_driver_against_another_tree():
    got = routing.pure_core(_core_loop.ROUND, "--queued", tree=ROOT)
    assert got["requests"] == _core_loop.ROUND and got["queued"] is True and got["cpu_us_per_req"] > 0
