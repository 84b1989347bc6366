"""Per-principal quotas on what grows the ledger and the decision log (issue 24): held
reservations, renewals listing one id many times, ``forbidden`` records."""

from __future__ import annotations

import json

from kernel import errors
from kernel import protocol as P
from kernel.admission import BudgetAdmission
from kernel.auth import Principal
from kernel.decisions import DecisionLog
from kernel.logstore import read_records
from kernel.mmi import Caller, Management
from kernel.router import Router


SENT: list = []


def _kernel(tmp_path):
    log = DecisionLog(str(tmp_path / "d.jsonl"), fsync="never")
    adm = BudgetAdmission(decision_log=log, root_limits={"units": 1e6}, default_limits={"units": 1e5})
    router = Router(lambda frames: SENT.append(frames) or True, admission=adm, management=Management(adm))
    return log, adm, router


def _records(log, op):
    log.flush()
    return [r for r in read_records(log.path) if r["op"] == op]


def test_a_principal_holds_at_most_its_quota_of_reservations(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "MAX_HELD_PER_PRINCIPAL", 5)
    log, adm, router = _kernel(tmp_path)
    alice, bob = Caller(b"a", Principal("alice", "client")), Caller(b"b", Principal("bob", "client"))
    op = Caller(b"o", Principal("op", "operator"))

    def reserve(who, **kw):
        return router.management.handle(router, P.MMI_GATE_RESERVE, {"resource": "units", "amount": 1, **kw}, 0.0, who)

    held = [reserve(alice)["reservation"] for _ in range(5)]
    refused = reserve(alice)
    assert isinstance(refused, errors.Refused) and "the most a principal may hold" in refused.message
    assert reserve(alice, commit=True)["ok"]  # committed at once: nothing held
    assert reserve(bob)["ok"] and all(reserve(op)["ok"] for _ in range(7))  # others are not affected
    assert router.management.handle(router, P.MMI_GATE_RELEASE, {"reservation": held[0]}, 0.0, alice)["ok"]
    assert reserve(alice)["ok"]
    assert adm.ledger.held_by["alice"] == 5
    adm.ledger.check_invariants()


def test_a_renewal_listing_one_id_many_times_renews_and_logs_it_once(tmp_path):
    log, adm, router = _kernel(tmp_path)
    alice = Caller(b"a", Principal("alice", "client"))
    rid = router.management.handle(router, P.MMI_GATE_RESERVE, {"resource": "units", "amount": 1}, 0.0, alice)[
        "reservation"
    ]
    out = router.management.handle(
        router, P.MMI_GATE_RENEW, {"reservations": [rid] * 10_000, "lease_s": 60}, 1.0, alice
    )
    assert out["renewed"] == [rid] and out["unknown"] == []
    (rec,) = _records(log, "renew")
    assert rec["in"]["reservations"] == [rid] and len(json.dumps(rec)) < 1000
    assert len(adm.ledger._expiry_heap) <= 2


def test_refusal_records_past_the_quota_become_a_count(tmp_path):
    log, adm, router = _kernel(tmp_path)
    alice, mallory = Caller(b"a", Principal("alice", "client")), Caller(b"m", Principal("mallory", "client"))
    assert router.management.handle(router, P.MMI_JOB_OPEN, {"job": "a1", "budget": {"units": 4}}, 0.0, alice)["ok"]
    for _ in range(1000):  # mallory tries to close alice's job, a thousand times in one second
        out = router.management.handle(router, P.MMI_JOB_CLOSE, {"job": "a1"}, 0.5, mallory)
        assert isinstance(out, errors.RecaError)
    recorded = _records(log, "forbidden")
    assert len(recorded) == P.FORBIDDEN_RECORDS_PER_MIN
    assert adm.counters["records_suppressed"] == 1000 - P.FORBIDDEN_RECORDS_PER_MIN
    assert router.management.handle(router, P.MMI_JOB_CLOSE, {"job": "a1"}, 61.0, mallory) is not None
    last = _records(log, "forbidden")[-1]
    assert last["out"]["suppressed"] == 1000 - P.FORBIDDEN_RECORDS_PER_MIN  # the count, in one record
    # alice's own refusals have their own quota
    assert adm.refusal_records.pending("alice") == 0


def test_audit_bytes_per_principal_per_minute(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "AUDIT_BYTES_PER_MIN", 10_000)
    log, adm, router = _kernel(tmp_path)
    adm.audit_bytes = type(adm.audit_bytes)(P.AUDIT_BYTES_PER_MIN)
    svc = Caller(b"s", Principal("child:ttc", "service:ttc"))
    event = {"x": "y" * 1000}
    outs = [
        router.management.handle(router, P.MMI_AUDIT, {"source": "ttc", "events": [event] * 3}, 0.0, svc)
        for _ in range(10)
    ]
    assert sum(1 for o in outs if isinstance(o, dict) and o.get("ok")) == 3  # ~3 KB each: 10 KB a minute
    refused = [o for o in outs if isinstance(o, errors.Refused)]
    assert len(refused) == 7 and "bytes per minute" in refused[0].message


def test_a_full_disk_stops_decisions_and_loses_nothing_acknowledged(tmp_path):
    """Writes fail with a real ENOSPC (the log's descriptor pointed at /dev/full): the decisions
    already taken stay buffered, new work that needs a decision is ``unavailable`` naming the
    reason, and once the disk takes writes again every acknowledged decision is in the log."""
    import os

    from kernel.replay import restore

    log, adm, router = _kernel(tmp_path)
    alice = Caller(b"a", Principal("alice", "client"))
    assert router.management.handle(router, P.MMI_JOB_OPEN, {"job": "before", "budget": {"units": 4}}, 0.0, alice)["ok"]
    log.flush()
    # Answered, and its record still in the buffer when the disk fills.
    assert router.management.handle(router, P.MMI_JOB_OPEN, {"job": "acked", "budget": {"units": 4}}, 1.0, alice)["ok"]
    real = os.dup(log._fd)
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, log._fd)
    try:
        assert log.flush() is False and log.error.startswith("ENOSPC")
        refused = router.management.handle(router, P.MMI_JOB_OPEN, {"job": "later"}, 2.0, alice)
        assert isinstance(refused, errors.Unavailable) and "decision log cannot be written" in refused.message
        reserve = router.management.handle(router, P.MMI_GATE_RESERVE, {"resource": "units", "amount": 1}, 2.0, alice)
        assert isinstance(reserve, errors.Unavailable)
        assert router.stats(2.0, {})["decision_log"]["error"].startswith("ENOSPC")
        # A request that needs a decision (every request does: admission) is answered unavailable.
        from kernel import codec

        router.on_message([b"W", P.MDPW, P.WorkerCmd.READY.value, b"echo"], 2.0, Principal("svc", "service:echo"))
        SENT.clear()
        router.on_message(
            [b"C", P.MDPC, P.ClientCmd.REQUEST.value, b"echo", codec.pack({"v": P.VERSION, "id": 1}), codec.pack("x")],
            2.0,
            alice.principal,
        )
        (answer,) = [f for f in SENT if f[0] == b"C"]
        assert codec.unpack(answer[4])["error"]["code"] == "unavailable" and not [f for f in SENT if f[0] == b"W"]
    finally:
        os.dup2(real, log._fd)
        os.close(real)
        os.close(full)
    assert log.flush() and log.error is None  # the disk takes writes again: all of it written
    assert router.management.handle(router, P.MMI_JOB_OPEN, {"job": "after"}, 3.0, alice)["ok"]
    log.close()
    jobs = restore(log.path).ledger.jobs
    assert {"before", "acked", "after"} <= set(jobs) and "later" not in jobs


def test_what_a_principal_sees_in_mmi_stats(tmp_path):
    from kernel import codec

    log, adm, router = _kernel(tmp_path)
    alice, bob = Caller(b"a", Principal("alice", "client")), Caller(b"b", Principal("bob", "client"))
    svc = Caller(b"s", Principal("child:cpcs", "service:cpcs"))
    router.on_message(
        [b"W", P.MDPW, P.WorkerCmd.READY.value, b"echo", codec.pack({"capacity": 3})],
        0.0,
        Principal("child:echo", "service:echo"),
    )
    router.workers[b"W"].pid = 4242
    for who, job in ((alice, "a-job"), (bob, "b-job")):
        assert router.management.handle(router, P.MMI_JOB_OPEN, {"job": job, "budget": {"units": 1}}, 0.0, who)["ok"]
    seen = router.management.handle(router, P.MMI_STATS, {}, 0.0, alice)
    assert set(seen) == {"services", "summary", "jobs"}
    assert seen["services"] == {"echo": {"health": "serving"}}
    assert "a-job" in seen["jobs"] and "b-job" not in seen["jobs"]
    assert "4242" not in json.dumps(seen)
    placed = router.management.handle(router, P.MMI_STATS, {}, 0.0, svc)
    assert placed["workers"] == [{"service": "echo", "inflight": 0, "capacity": 3}]
    assert placed["services"]["echo"]["workers"] == 1 and "4242" not in json.dumps(placed)
    full = router.management.handle(router, P.MMI_STATS, {}, 0.0, Caller(b"o", Principal("op", "operator")))
    assert full["workers"][0]["pid"] == 4242 and {"a-job", "b-job"} <= set(full["jobs"])


def test_cpcs_finds_a_service_past_the_first_page_of_stats(tmp_path):
    """150 made-up names sorted before ``work`` push it off page 0 of mmi.stats; cpcs reads
    every page (issue 24: it refused DAGs with "no worker serves 'work'")."""
    import asyncio

    from services.cpcs.service import all_stats

    log, adm, router = _kernel(tmp_path)
    router.max_workerless = 10_000
    svc = Caller(b"s", Principal("child:cpcs", "service:cpcs"))
    for n in range(150):
        router.on_message(
            [b"C", P.MDPC, P.ClientCmd.REQUEST.value, f"aaa{n}".encode(), b"x"], 0.0, Principal("mallory", "client")
        )
    router.on_message([b"W", P.MDPW, P.WorkerCmd.READY.value, b"work"], 0.0, Principal("child:work", "service:work"))

    class Bus:  # the calls cpcs makes, answered by the real router's management
        async def call(self, name, arg=None, **kw):
            return router.management.handle(router, name, arg or {}, 0.0, svc)

    first = router.management.handle(router, P.MMI_STATS, {}, 0.0, svc)
    assert first["summary"]["pages"] >= 2 and "work" not in first["services"]
    merged = asyncio.run(all_stats(Bus()))
    assert merged["services"]["work"]["workers"] == 1


def test_per_worker_names_registered_and_dropped_in_a_loop_stay_bounded(tmp_path):
    """100,000 READY/DISCONNECT of ``evil@N`` kept 100,001 service entries for a minute; idle
    names now count against the workerless cap and the oldest are forgotten at once."""
    log, adm, router = _kernel(tmp_path)
    router.max_workerless = 50
    evil = Principal("child:evil", "service:evil")
    for n in range(5000):
        ident = f"E{n}".encode()
        router.on_message([ident, P.MDPW, P.WorkerCmd.READY.value, f"evil@{n}".encode()], float(n) * 1e-3, evil)
        router.on_message([ident, P.MDPW, P.WorkerCmd.DISCONNECT.value], float(n) * 1e-3, evil)
    assert len(router.services) <= 51 and router.counters["services_evicted"] >= 4900
    router.check_invariants()


def test_a_principal_with_many_jobs_gets_them_a_page_at_a_time(tmp_path, monkeypatch):
    """mmi.stats below operator costs one page of the caller's own jobs (issue 24: a client
    holding 10,000 jobs x 64 kinds made each of its stats calls cost the kernel about a second)."""
    log, adm, router = _kernel(tmp_path)
    alice = Caller(b"a", Principal("alice", "client"))
    for n in range(250):
        assert router.management.handle(
            router, P.MMI_JOB_OPEN, {"job": f"j{n:03d}", "budget": {"units": 1}}, 0.0, alice
        )["ok"]
    pages = [router.management.handle(router, P.MMI_STATS, {"jobs_page": p}, 0.0, alice) for p in range(3)]
    assert [len(p["jobs"]) for p in pages] == [100, 100, 51]  # 250 and its default job
    assert pages[0]["summary"]["jobs"] == 251 and pages[0]["summary"]["jobs_pages"] == 3
    assert len({name for p in pages for name in p["jobs"]}) == 251
    one = router.management.handle(router, P.MMI_JOB_STATS, {"job": "j007"}, 0.0, alice)
    assert one["owner"] == "alice"


def test_management_calls_per_principal_per_second(tmp_path):
    log, adm, router = _kernel(tmp_path)
    mallory, alice = Caller(b"m", Principal("mallory", "client")), Caller(b"a", Principal("alice", "client"))
    outs = [router.management.handle(router, P.MMI_JOB_STATS, {}, 5.0, mallory) for _ in range(P.MMI_CALLS_PER_S + 200)]
    over = [o for o in outs if isinstance(o, errors.Overloaded)]
    assert len(over) == 200 and "management calls a second" in over[0].message
    assert isinstance(router.management.handle(router, P.MMI_JOB_STATS, {}, 5.0, alice), dict)  # others unaffected
    assert isinstance(router.management.handle(router, P.MMI_JOB_STATS, {}, 6.5, mallory), dict)  # refilled
    op = Caller(b"o", Principal("op", "operator"))
    assert all(isinstance(router.management.handle(router, P.MMI_JOB_STATS, {}, 5.0, op), dict) for _ in range(1500))


def test_an_operators_stats_and_job_stats_cost_one_page_of_jobs(tmp_path):
    """Issue 24: with every job x kind in one reply an operator's mmi.stats cost the kernel's
    thread about a second at 10,000 jobs x 64 kinds; it is one page now, the others by
    ``jobs_page`` (mmi.job.stats: ``page``)."""
    log, adm, router = _kernel(tmp_path)
    op = Caller(b"o", Principal("op", "operator"))
    for n in range(230):
        assert router.management.handle(router, P.MMI_JOB_OPEN, {"job": f"j{n:03d}", "budget": {"units": 1}}, 0.0, op)[
            "ok"
        ]
    pages = [router.management.handle(router, P.MMI_STATS, {"jobs_page": p}, 0.0, op) for p in range(3)]
    assert [len(p["jobs"]) for p in pages] == [100, 100, 32]  # 230, root and default
    assert pages[0]["summary"]["jobs"] == 232 and pages[2]["summary"]["jobs_pages"] == 3
    assert len({name for p in pages for name in p["jobs"]}) == 232
    assert "counters" in pages[0] and "workers" in pages[0]  # still the operator's full view otherwise
    listed = [router.management.handle(router, P.MMI_JOB_STATS, {"page": p}, 0.0, op) for p in range(3)]
    assert [len(p) for p in listed] == [100, 100, 32] and set().union(*listed) == set().union(
        *(p["jobs"] for p in pages)
    )


def test_a_principals_budget_kinds_are_bounded(tmp_path):
    """Issue 24: a bound on the (job, kind) entries one principal's open jobs hold: past it a job
    open with limits is ``refused`` (quota "kinds"), and a new kind charged to its jobs is not
    kept (a kind that limits something is always charged); closing jobs frees the share."""
    log, adm, router = _kernel(tmp_path)
    alice, bob = Caller(b"a", Principal("alice", "client")), Caller(b"b", Principal("bob", "client"))
    ledger = adm.ledger
    # the ledger's bound (P.MAX_KINDS_PER_PRINCIPAL), lowered on the ledger itself: the compiled core
    # inlines the Final constant, so patching P would reach only the pure path
    assert ledger.max_kinds == P.MAX_KINDS_PER_PRINCIPAL
    ledger.max_kinds = 10

    def open_(who, job, kinds):
        return router.management.handle(router, P.MMI_JOB_OPEN, {"job": job, "budget": kinds}, 0.0, who)

    four = {f"k{i}": 1.0 for i in range(4)}
    assert open_(alice, "a1", four)["ok"]  # opens her default job too ([limits] default: one kind)
    base = ledger.kinds_of("alice")
    assert base == 5
    while ledger.kinds_of("alice") + 4 <= 10:
        assert open_(alice, f"a{ledger.kinds_of('alice')}", four)["ok"]
    refused = open_(alice, "a-over", four)
    assert isinstance(refused, errors.Refused) and refused.detail["quota"] == "kinds"
    assert "bound of 10" in str(refused)
    assert open_(bob, "b1", four)["ok"]  # bob's share is his own
    # charges of new kinds at the bound are not kept; a limited kind still is
    held = ledger.kinds_of("alice")
    ledger.charge(0.0, "a1", {"k0": 0.5, **{f"new{i}": 1.0 for i in range(20)}})
    assert ledger.jobs["a1"].spent["k0"] == 0.5
    assert ledger.kinds_of("alice") == 10 >= held and ledger.kinds_dropped >= 20 - (10 - held)
    ledger.check_invariants()
    assert router.management.handle(router, P.MMI_JOB_CLOSE, {"job": "a1"}, 0.0, alice)["ok"]
    assert ledger.kinds_of("alice") < 10
    assert open_(alice, "a-after", {"k0": 1.0})["ok"]
    ledger.check_invariants()
    restored = type(ledger).load(ledger.dump())  # a snapshot restores the counts
    assert restored.kinds_of("alice") == ledger.kinds_of("alice")
    restored.check_invariants()
