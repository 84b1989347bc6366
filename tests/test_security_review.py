"""Holes found by the security review of issue 13, each played as the hostile client would, on
the kernel's pure parts (Router + BudgetAdmission + Management, fake clock, real decision log)."""

from __future__ import annotations

import os

import pytest

from kernel import codec
from kernel import protocol as P
from tests.test_kernel_enforce import ALICE, BOB, OP, call, error_of, kern, request  # noqa: F401 (fixture)
from tests.test_security_why import sec  # noqa: F401 (fixture: a real CURVE kernel)


def test_an_empty_job_name_is_the_callers_default_not_the_shared_one(kern):
    """Bob named the job "" and reserved (and ran) in the operators' shared ``default`` job,
    exhausting it for every operator and ipc:// peer."""
    router, wire, adm, log = kern
    out = call(router, BOB, P.MMI_GATE_RESERVE, {"job": "", "resource": "tokens", "amount": 10, "commit": True})
    assert out["ok"]
    jobs = adm.ledger.snapshot(0.0)
    assert "tokens" not in jobs["default"]["spent"]
    assert jobs["default:bob"]["spent"]["tokens"] == 10
    request(router, BOB, b"B", job="")
    assert [r.job for r in router.inflight.values()] == ["default:bob"]


def test_no_client_opens_another_principals_default_job(kern):
    """Bob opened ``default:alice`` before alice's first request: alice was then forbidden her
    own default job (and so every request and reservation without a job)."""
    router, wire, adm, log = kern
    for name in ("default:alice", "default", "root"):
        out = call(router, BOB, P.MMI_JOB_OPEN, {"job": name})
        assert out.code == P.ErrorCode.BAD_REQUEST and "reserved" in out.message
    request(router, ALICE, b"A")
    assert error_of(wire, b"A") is None
    assert router.inflight and all(r.job == "default:alice" for r in router.inflight.values())
    assert call(router, ALICE, P.MMI_GATE_RESERVE, {"resource": "gpu"})["ok"]


@pytest.mark.parametrize("name,arg", [
    (P.MMI_JOB_OPEN, {"job": "x" * (P.MAX_NAME + 1)}),
    (P.MMI_JOB_OPEN, {"job": "j", "budget": {"k" * (P.MAX_NAME + 1): 1}}),
    (P.MMI_JOB_OPEN, {"job": "j", "budget": {f"k{i}": 1 for i in range(P.MAX_KINDS + 1)}}),
    (P.MMI_JOB_OPEN, {"job": "j", "parent": "p" * (P.MAX_NAME + 1)}),
    (P.MMI_GATE_RESERVE, {"resource": "r" * (P.MAX_NAME + 1)}),
    (P.MMI_GATE_RELEASE, {"reservation": "r" * (P.MAX_NAME + 1)}),
    (P.MMI_GATE_RENEW, {"reservations": ["a"] * (P.MAX_RENEW + 1)}),
    (P.MMI_GATE_RENEW, {"reservations": ["a" * (P.MAX_NAME + 1)]}),
    (P.MMI_CANCEL, {"id": "i" * (P.MAX_NAME + 1)}),
])
def test_names_the_kernel_keeps_or_logs_are_bounded(kern, name, arg):
    """A 5 MB job name (or resource, reservation id, budget kind) was accepted, kept in the
    ledger and written whole into the decision log, on every call, by any client."""
    router, wire, adm, log = kern
    log.flush()
    before = os.path.getsize(log.path)
    out = call(router, BOB, name, arg)
    assert out.code == P.ErrorCode.BAD_REQUEST
    log.flush()
    assert os.path.getsize(log.path) - before < 2 * P.MAX_NAME
    assert all(len(j) <= P.MAX_NAME for j in adm.ledger.jobs)


@pytest.mark.parametrize("header", [
    {"job": "x" * (P.MAX_NAME + 1)},
    {"budget": {"k" * (P.MAX_NAME + 1): 1}},
    {"budget": {f"k{i}": 1 for i in range(P.MAX_KINDS + 1)}},
    {"id": "i" * (P.MAX_NAME + 1)},
])
def test_request_header_names_are_bounded(kern, header):
    router, wire, adm, log = kern
    body = codec.pack({"v": 1, "id": 1, **header})
    router.on_message([b"B", P.MDPC, P.ClientCmd.REQUEST.value, b"echo", body, codec.pack(0)], 0.0, BOB)
    assert error_of(wire, b"B") == P.ErrorCode.BAD_REQUEST
    assert not router.inflight


def test_a_key_directory_others_can_write_grants_nothing(tmp_path):
    """The kernel read roles from a key directory any local user could write: dropping an
    ``operator`` key there made that user the operator over tcp://."""
    from kernel import auth, keys

    kd = str(tmp_path / "keys")
    keys.new(kd, "alice", "client")
    os.chmod(kd, 0o777)
    with pytest.raises(auth.AuthError, match="writable by group or others"):
        auth.Principals(kd)
    os.chmod(kd, 0o700)
    table = auth.Principals(kd)
    assert table.by_name("alice") is not None
    os.chmod(kd, 0o757)  # made writable while the kernel runs: its keys are revoked
    assert table.reload() and table.by_name("alice") is None
    os.chmod(kd, 0o755)
    assert table.reload() and table.by_name("alice") is not None


@pytest.mark.parametrize("who,may", [(BOB, False), (ALICE, True), (OP, True)])
def test_a_clients_priority_preempts_only_what_it_may_pause(kern, who, may):
    """Bob's priority-1000 requests made the kernel pause alice's running request, again after
    every max_pause resume: a client starved another principal's work with a header field."""
    from kernel.auth import Principal

    router, wire, adm, log = kern
    published = []
    router.publish = lambda topic, msg: published.append((topic, msg))
    router.on_message([b"W", P.MDPW, P.WorkerCmd.READY.value, b"echo"], 0.0, Principal("svc", "service:echo"))
    request(router, ALICE, b"A", rid=1)
    (low,) = wire.to(b"W")
    router.on_message([b"X", P.MDPC, P.ClientCmd.REQUEST.value, b"echo",
                       codec.pack({"v": 1, "id": 2, "priority": 1000}), codec.pack(0)], 0.1, who)
    preempts = [m[P.C_TOKEN] for t, m in published if t == P.control_topic("echo", P.ControlOp.PREEMPT)]
    assert preempts == ([low[3]] if may else [])


@pytest.mark.system
def test_the_kernel_measures_only_a_workers_own_pid(sec):
    """A service peer declared another process's pid in READY (the kernel's own, say): the kernel
    then measured that process's CPU time as the worker's, charging callers for it or letting
    the worker's own CPU go uncounted.  Supervised children keep their verified pids."""
    import zmq

    from kernel import auth
    from tests.test_security_why import as_

    with as_(sec, "op") as op:
        stats = op.stats()
    children = {c["pid"] for c in stats["children"] if c["name"].startswith("echo")}
    pids = {w["pid"] for w in stats["workers"] if w["service"] == "echo"}
    assert pids and pids <= children  # each registered child's pid verified and kept
    sock = zmq.Context.instance().socket(zmq.DEALER)
    auth.peer_credentials(os.path.join(sec.keys, "ttc-svc.key_secret"), os.path.join(sec.keys, "kernel.key")).apply(sock)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(sec.endpoint)
    try:
        sock.send_multipart([P.MDPW, P.WorkerCmd.READY.value, b"ttc", codec.pack({"pid": sec.pid})])
        assert sock.poll(20_000)  # the kernel heartbeats registered workers only
        assert sock.recv_multipart() == [P.MDPW, P.WorkerCmd.HEARTBEAT.value]
        with as_(sec, "op") as op:
            ttc = [w for w in op.stats()["workers"] if w["service"] == "ttc"]
        assert ttc and ttc[0]["pid"] is None
    finally:
        sock.send_multipart([P.MDPW, P.WorkerCmd.DISCONNECT.value])
        sock.close(0)


def test_a_client_cannot_grow_the_ledger_without_bound(kern, monkeypatch):
    """Bob opened and closed jobs in a loop (every closed job stayed in the ledger), or just opened
    empty ones: the kernel's memory grew with every call."""
    router, wire, adm, log = kern
    for i in range(50):
        assert call(router, BOB, P.MMI_JOB_OPEN, {"job": f"b{i}"})["ok"]
        assert call(router, BOB, P.MMI_JOB_CLOSE, {"job": f"b{i}"})["ok"]
    assert not any(name.startswith("b") for name in adm.ledger.jobs)
    monkeypatch.setattr(P, "MAX_JOBS_PER_PRINCIPAL", 6)  # default:bob (its top-level jobs' parent) + 5
    for i in range(5):
        assert call(router, BOB, P.MMI_JOB_OPEN, {"job": f"b{i}"})["ok"]
    out = call(router, BOB, P.MMI_JOB_OPEN, {"job": "b5"})
    assert out.code == P.ErrorCode.REFUSED and "close some" in out.message
    assert call(router, BOB, P.MMI_JOB_OPEN, {"job": "c", "parent": "b0"}).code == P.ErrorCode.REFUSED  # children count
    assert call(router, ALICE, P.MMI_JOB_OPEN, {"job": "a0"})["ok"]  # the bound is per principal
    assert call(router, BOB, P.MMI_JOB_CLOSE, {"job": "b4"})["ok"]
    assert call(router, BOB, P.MMI_JOB_OPEN, {"job": "b5"})["ok"]
    assert all(call(router, OP, P.MMI_JOB_OPEN, {"job": f"o{i}"})["ok"] for i in range(6))  # operators: no bound


def test_a_key_name_containing_dot_key_is_not_another_principal(tmp_path):
    """``keys new alice.keyring`` made a second key whose holder the kernel took for ``alice``
    (the name was cut at the first ".key"): it owned alice's jobs, requests and reservations."""
    from kernel import auth, keys

    kd = str(tmp_path / "keys")
    keys.new(kd, "alice", "client")
    keys.new(kd, "alice.keyring", "client")
    table = auth.Principals(kd)
    alice = auth.read_certificate(os.path.join(kd, "alice.key")).public
    ring = auth.read_certificate(os.path.join(kd, "alice.keyring.key")).public
    assert table.by_key(alice).name == "alice" and table.by_key(ring).name == "alice.keyring"
    assert auth.read_certificate(os.path.join(kd, "alice.keyring.key_secret")).name == "alice.keyring"


def test_requests_to_made_up_services_do_not_pile_up(kern):
    """Each request to a new service name (of any length) made a Service the router kept
    forever, and every mmi.stats answer listed it: a client grew the kernel's memory and
    everyone's stats without bound."""
    router, wire, adm, log = kern
    for i in range(200):
        router.on_message([b"B", P.MDPC, P.ClientCmd.REQUEST.value, b"made-up-%d" % i, codec.pack({"v": 1, "id": i}),
                           codec.pack(0)], 0.0, BOB)
    router.on_message([b"B", P.MDPC, P.ClientCmd.REQUEST.value, b"s" * (P.MAX_NAME + 1), codec.pack({"v": 1}),
                       codec.pack(0)], 0.0, BOB)
    router.on_message([b"W", P.MDPW, P.WorkerCmd.READY.value, b"echo"], 0.0, OP)
    router.tick(router.unavailable_wait + 1.0)
    router.tick(router.unavailable_wait + 2.0)
    errors_ = [codec.unpack(m[-1])["error"]["code"] for m in wire.to(b"B")]
    assert errors_.count(P.ErrorCode.UNAVAILABLE) == 200 and errors_.count(P.ErrorCode.BAD_REQUEST) == 1
    assert list(router.services) == [b"echo"]  # served once: kept, with its statistics


def test_a_worker_cannot_grow_the_ledger_with_made_up_kinds(kern):
    """A service reported 10,000 made-up kinds (of any length) in one status: each became an
    entry of the job's totals and of the decision log line, on every reply."""
    from kernel.auth import Principal

    router, wire, adm, log = kern
    svc = Principal("svc", "service:echo")
    router.on_message([b"W", P.MDPW, P.WorkerCmd.READY.value, b"echo"], 0.0, svc)
    call(router, ALICE, P.MMI_JOB_OPEN, {"job": "a", "budget": {"tokens": 1000}})
    request(router, ALICE, b"A", job="a", budget={"tokens": 100})
    (dispatched,) = wire.to(b"W")
    spent = {f"k{i}": 1 for i in range(10_000)} | {"x" * 5000: 1, "tokens": 7}
    status = codec.pack({"v": 1, "id": 1, "status": "ok", "spent": spent})
    router.on_message([b"W", P.MDPW, P.WorkerCmd.FINAL.value, dispatched[3], b"", status, codec.pack(0)], 0.1, svc)
    assert codec.unpack(wire.to(b"A")[-1][4])["status"] == "ok"
    total = adm.ledger.snapshot(0.1)["a"]["spent"]
    assert total["tokens"] == 7 and len(total) <= P.MAX_KINDS
    call(router, OP, P.MMI_STATS, {})  # flushes the log
    assert os.path.getsize(log.path) < 64 * 1024


def test_no_client_takes_roots_budget_from_the_others(kern):
    """Bob opened a top-level job asking for all of root's remainder (or left its limits open and
    drew on root directly): every other client's default job could then no longer be carved, and
    all they sent was answered budget_exceeded.  A non-operator's top-level jobs are now carved
    from its own default job, and it may not close that job to refill it."""
    from tests.test_kernel_enforce import LIMITS, replays

    router, wire, adm, log = kern
    greedy = {k: v * 10 for k, v in LIMITS.items()}  # all of root
    out = call(router, BOB, P.MMI_JOB_OPEN, {"job": "all", "budget": greedy})
    assert out.code == P.ErrorCode.BUDGET_EXCEEDED  # does not fit in bob's default job
    assert call(router, BOB, P.MMI_JOB_OPEN, {"job": "open-ended"})["ok"]
    assert call(router, BOB, P.MMI_JOB_OPEN, {"job": "explicit-root", "parent": "root"})["ok"]
    jobs = adm.ledger.snapshot(0.0)
    assert jobs["open-ended"]["parent"] == jobs["explicit-root"]["parent"] == "default:bob"
    assert call(router, BOB, P.MMI_JOB_CLOSE, {"job": "default:bob"}).code == P.ErrorCode.REFUSED
    request(router, ALICE, b"A")  # alice's default job is still carved from root
    assert error_of(wire, b"A") is None and any(r.job == "default:alice" for r in router.inflight.values())
    assert call(router, OP, P.MMI_JOB_OPEN, {"job": "ops", "budget": {"flops": 1}})["ok"]
    assert adm.ledger.snapshot(0.0)["ops"]["parent"] == "root"  # operators still carve from root
    assert replays(log)
