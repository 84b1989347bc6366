"""Issue 8 item 3 under a real kernel: the growth gate is the runtime's.

A GRBFN+Plastic stream runs with :class:`kernel.gate.KernelGate` against a ``python -m kernel``
job whose ``prototypes`` budget is N, and the same stream runs offline with ``LocalGate`` cap N.
Checked: spawns never exceed N (also with two models racing on one job), the kernel's count equals
the model's growth, and the two runs are identical (predictions, unit counts, final state).

No adapter is needed: the models only ever call ``reserve`` (they are built without
``release_on_removal``), and KernelGate's commit-on-grant is exactly "spawned units are spent".
A kernel round trip happens per spawn attempt (granted or refused), never per step.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import zmq

from clients import Client
from kernel.gate import KernelGate
from bench.experiments import grbfn_plastic, run_classifier
from sims.grbfn.gate import PROTOTYPES, LocalGate
from sims.streams import classification_stream
from tests.support import KernelProcess

pytestmark = pytest.mark.system

STEPS = 2500
CAP = 8  # spawns; binds well inside STEPS (3 initial units + 8 spawns)


@pytest.fixture(scope="module")
def kern():
    k = KernelProcess("")  # the kernel alone: the gate lives in its ledger
    try:
        yield k
    finally:
        k.stop()


@pytest.fixture(scope="module")
def stream():
    s = classification_stream()
    return s.X[:STEPS], s.y[:STEPS]


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        np.array_equal(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k] for k in a)


def test_kernel_gate_run_equals_offline_run_and_never_exceeds_the_cap(kern, stream):
    X, y = stream
    offline_gate = LocalGate({PROTOTYPES: CAP})
    offline = grbfn_plastic("classification", gate=offline_gate)
    ref = run_classifier(offline, X, y)

    with Client(kern.endpoint, timeout=10, retries=0, context=zmq.Context.instance()) as c:
        c.open_job("grbfn", {PROTOTYPES: CAP})
        gate = KernelGate(c, "grbfn")
        model = grbfn_plastic("classification", gate=gate)
        run = run_classifier(model, X, y)
        stats = c.call("mmi.job.stats", {"job": "grbfn"})

    assert offline.spawned == CAP and offline_gate.refused[PROTOTYPES] > 0  # the cap binds
    assert model.spawned == gate.grants == stats["spent"][PROTOTYPES] == CAP
    assert stats["remaining"][PROTOTYPES] == 0
    assert gate.refusals == offline_gate.refused[PROTOTYPES] == model.refused
    assert np.array_equal(run.correct, ref.correct) and np.array_equal(run.units, ref.units)
    assert run.accuracy == ref.accuracy
    assert _same_state(model.state(), offline.state())
    assert int(run.units.max()) <= 3 + CAP
    # round trips per spawn attempt only, not per step
    assert gate.grants + gate.refusals < STEPS


def test_two_models_racing_on_one_job_share_the_cap_exactly(kern, stream):
    X, y = stream
    n = 1500
    with Client(kern.endpoint, timeout=10, retries=0) as c:
        c.open_job("grbfn-race", {PROTOTYPES: CAP})
    models, clients = [], []
    for _ in range(2):
        cl = Client(kern.endpoint, timeout=10, retries=0)
        clients.append(cl)
        models.append(grbfn_plastic("classification", gate=KernelGate(cl, "grbfn-race")))
    threads = [threading.Thread(target=run_classifier, args=(m, X[:n], y[:n])) for m in models]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        spent = clients[0].call("mmi.job.stats", {"job": "grbfn-race"})["spent"][PROTOTYPES]
    finally:
        for cl in clients:
            cl.close()
    assert sum(m.spawned for m in models) == spent == CAP
    assert all(m.t == n for m in models)
