"""ttc's tool runs on another host (issue 28): the session's two-node cluster (tests/ray_support.py:
the worker node in a second network namespace; the coordinator's workdir is in the cluster's
``host_only`` directory, which that node does not see, as on a separate machine).  Runs pinned to that node
by label get their request as the task's argument, run in a scratch directory of the node, and
send the result back in the task's return value; the log and the independent checker are the
same as for a local run.  Skipped, with the reason, only where namespaces cannot be made."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from kernel.rayplace import source_ip, token_env
from services.ttc import checker
from services.ttc.logic import ABORTED, DONE
from services.ttc.runner import Coordinator, tagged_processes
from tests.ray_support import netns_cluster, netns_prefix
from tests.support import REPO

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]

SETTLE_S = 180.0
SAT = {"n_vars": 120, "seed": 3}
LONG_SIM = {"n": 64, "steps": 10_000_000, "checkpoint_every": 2000}
ON_WORKER = {"label_selector": {"reca-node": "w1"}}


@pytest.fixture(scope="module")
def cluster(request):
    """The two-node cluster, this process connected to it as a driver for the module."""
    import ray
    from ray._raylet import Config  # type: ignore[attr-defined]

    got = netns_cluster(request)
    os.environ.update(token_env(got.token))
    Config.initialize("")  # Ray re-reads RAY_AUTH_MODE
    ray.init(
        address=got.address,
        _node_ip_address=source_ip(got.address),
        log_to_driver=False,
        logging_level="ERROR",
        runtime_env={"env_vars": {"PYTHONPATH": REPO}},
    )
    request.addfinalizer(ray.shutdown)
    return got


def _host_only(cluster, tmp_path):
    """A fresh directory under the cluster's ``host_only`` (the worker node does not see it)."""
    import pathlib
    import tempfile

    if cluster.host_only is None or netns_prefix(cluster.ns)[0] != "nsenter" or not shutil.which("unshare"):
        pytest.skip("cannot hide a directory from the worker node here (no nsenter/unshare)")
    return pathlib.Path(tempfile.mkdtemp(dir=cluster.host_only))


def test_a_run_on_a_host_without_the_workdir_ships_its_files(cluster, tmp_path):
    tmp_path = _host_only(cluster, tmp_path)
    values = {}
    for runner, opts in (("local", None), ("ray", ON_WORKER)):
        db = str(tmp_path / f"{runner}.db")
        with Coordinator(db, runner=runner, ray_task_options=opts) as c:
            cid = c.prepare("sat", SAT, 5.0, ["s"], 60)
            c.commit(cid)
            if runner == "ray":
                proc = None
                deadline = time.monotonic() + SETTLE_S
                while proc is None or proc.outcome is None:  # keep the outcome: where it ran
                    assert time.monotonic() < deadline, "the Ray run never ended"
                    c.step()
                    procs = list(c.running().values())
                    proc = procs[0] if procs else proc
                    c.wait(0.2)
                assert proc.outcome["shipped"] is True and proc.outcome["node_ip"] == cluster.ns_addr, proc.outcome
            out = c.run_until_settled([cid], SETTLE_S)[cid]
            assert out.state == DONE, out
            (d,) = c.deliver("s")
            values[runner] = (d.ok, d.value)
            assert c.attach(cid, "s")
            run = c.store.one("SELECT pid, end_status, cpu_s FROM runs WHERE call_id=?", (cid,))
            assert run["end_status"] == "exit:0" and run["pid"] is not None and run["cpu_s"] > 0
        assert checker.check(db).total() == 0
    assert values["ray"] == values["local"] and values["ray"][0] is True


def test_abort_of_a_run_on_another_host(cluster, tmp_path):
    """``ray.cancel(force=True)`` reaches the task on the other node; its tool-worker follows
    (PDEATHSIG); no result; checker 0."""
    tmp_path = _host_only(cluster, tmp_path)
    db = str(tmp_path / "abort.db")
    with Coordinator(db, runner="ray", ray_task_options=ON_WORKER) as c:
        cid = c.prepare("diffusion", LONG_SIM, 30.0, ["s"], 120)
        c.commit(cid)
        tag = f"{c.store.store_id}/{cid}/"
        deadline = time.monotonic() + SETTLE_S
        while not tagged_processes(tag):  # one pid namespace: the node's tool-worker is visible
            assert time.monotonic() < deadline, "the tool-worker never started on the node"
            c.step()
            c.wait(0.2)
        c.abort(cid)
        out = c.run_until_settled([cid], SETTLE_S)[cid]
        assert out.state == ABORTED
        deadline = time.monotonic() + SETTLE_S
        while tagged_processes(tag):
            assert time.monotonic() < deadline, "the tool-worker outlived the cancel"
            time.sleep(0.2)
        assert c.store.one("SELECT COUNT(*) AS n FROM results WHERE call_id=?", (cid,))["n"] == 0
    assert checker.check(db).total() == 0


def test_the_task_body_ships_the_files_where_the_workdir_is_missing(tmp_path):
    """The Ray task's body (services.ttc.rayrun._run_tool) called directly on this host with a
    workdir that does not exist here: it runs the tool in a scratch directory, writes nothing
    under the missing path, and returns the result, pid and start token (``shipped``)."""
    from services.ttc.rayrun import _run_tool
    from services.ttc.runner import _ROOT
    from services.ttc.tools import random_3sat

    missing = str(tmp_path / "not-on-this-node" / "runs")
    req = {
        "entry": "services.ttc.tools:run_sat",
        "inputs": {"n_vars": 120, "seed": 1},
        "call_id": "c1",
        "attempt": 1,
        "checkpoint_dir": str(tmp_path / "not-on-this-node" / "ckpt" / "c1"),
        "result_path": missing + "/t.result.json",
        "cpu_limit_s": 60,
        "mem_bytes": 1 << 30,
    }
    out = _run_tool(req, missing + "/t.req.json", missing + "/t.pid.json", "s/c1/1", "/no/such/python", _ROOT)
    assert out["shipped"] is True and out["status"] == "exit:0" and out["result"]["ok"] is True, out
    assert out["pid"] > 0 and out["token"] is not None
    assert out["result"]["value"]["sat"] is True  # satisfiable instance (tests/test_ttc_ray.py's)
    model = {abs(lit): lit > 0 for lit in out["result"]["value"]["model"]}
    assert all(any(model[abs(lit)] == (lit > 0) for lit in cl) for cl in random_3sat(120, 4.26, 1))
    assert not os.path.exists(str(tmp_path / "not-on-this-node"))  # nothing written on the missing path
