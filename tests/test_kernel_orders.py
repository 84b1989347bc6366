"""Control orders answer what they reached (review findings F3, F5): a job order goes only to the
services holding requests of that job and reports how many it reached; an order to a service no
worker serves, or to a job with nothing in flight, is ``not_found``; nothing naming a job is
ever published on ``ctl/all`` (every service key may subscribe to it)."""

from __future__ import annotations

import pytest

from kernel import codec, errors
from kernel import protocol as P
from kernel.admission import BudgetAdmission
from kernel.decisions import DecisionLog
from kernel.mmi import Management
from kernel.policy import Order
from kernel.router import Router
from tests.test_kernel_enforce import ALICE, LIMITS, OP, SVC, W, call, request
from tests.test_kernel_router import Wire

ORDERS = (P.MMI_PREEMPT, P.MMI_RESUME, P.MMI_CANCEL)
ALL_PREFIX = f"{P.CTL_PREFIX}{P.CTL_ALL}/".encode()


@pytest.fixture
def kern(tmp_path):
    log = DecisionLog(str(tmp_path / "d.jsonl"))
    adm = BudgetAdmission(
        decision_log=log,
        root_limits={k: v * 10 for k, v in LIMITS.items()},
        default_limits=LIMITS,
        max_pause=5.0,
        audit_quota=60,
    )
    published: list[tuple[bytes, dict]] = []
    router = Router(
        Wire(),
        admission=adm,
        management=Management(adm),
        heartbeat_interval=100.0,
        publish=lambda topic, msg: published.append((topic, msg)),
    )
    router.on_message([b"W", P.MDPW, W.READY.value, b"echo", codec.pack({"capacity": 4})], 0.0, SVC)
    yield router, published
    log.close()


def test_a_job_order_to_an_unknown_service_or_an_idle_job_is_not_found(kern):
    router, published = kern
    assert call(router, ALICE, P.MMI_JOB_OPEN, {"job": "j1", "budget": {"wall_ms": 1e6}})["ok"]
    for name in ORDERS:
        for arg in ({"job": "j1", "service": "nosuch"}, {"job": "j1"}, {"job": "j1", "service": "echo"}):
            out = call(router, ALICE, name, arg)
            assert isinstance(out, errors.NotFound), (name, arg, out)
    assert published == []  # nothing was published for orders that reached nothing


def test_a_job_order_reports_the_requests_it_reached_on_their_service_topic(kern):
    router, published = kern
    assert call(router, ALICE, P.MMI_JOB_OPEN, {"job": "j1", "budget": {"wall_ms": 1e6}})["ok"]
    request(router, ALICE, b"A", job="j1", rid=1)
    request(router, ALICE, b"A", job="j1", rid=2)
    for name in ORDERS:
        published.clear()
        assert call(router, ALICE, name, {"job": "j1"}) == {"ok": True, "targets": 2}
        op = name[len(P.MMI_PREFIX) :]
        assert published == [(P.control_topic("echo", op), {P.C_JOB: "j1"})]  # once, on echo's topic
        assert call(router, ALICE, name, {"job": "j1", "service": "echo"})["targets"] == 2
        assert isinstance(call(router, ALICE, name, {"job": "j1", "service": "nosuch"}), errors.NotFound)


def test_control_to_a_service_no_worker_serves_is_not_found(kern):
    router, published = kern
    out = call(router, OP, P.MMI_CONTROL, {"service": "nosuch", "op": "fidelity", "message": {"level": 1}})
    assert isinstance(out, errors.NotFound) and "nosuch" in out.message
    assert published == []
    assert call(router, OP, P.MMI_CONTROL, {"service": "echo", "op": "fidelity", "message": {"level": 1}}) == {
        "ok": True
    }
    assert call(router, OP, P.MMI_CONTROL, {"op": "fidelity", "message": {"level": 1}}) == {"ok": True}  # all
    assert [t for t, _ in published] == [P.control_topic("echo", "fidelity"), P.control_topic(P.CTL_ALL, "fidelity")]


def test_an_order_naming_a_job_is_never_broadcast_on_ctl_all(kern):
    router, published = kern
    assert call(router, ALICE, P.MMI_JOB_OPEN, {"job": "secret", "budget": {"wall_ms": 1e6}})["ok"]
    router.order(Order(P.CTL_ALL, "cancel", {P.C_JOB: "secret"}), 0.0)
    assert published == []  # no request of the job: no service hears of it
    request(router, ALICE, b"A", job="secret")
    router.order(Order(P.CTL_ALL, "cancel", {P.C_JOB: "secret"}), 0.1)
    assert published == [(P.control_topic("echo", "cancel"), {P.C_JOB: "secret"})]
    assert not any(t.startswith(ALL_PREFIX) for t, _ in published)
