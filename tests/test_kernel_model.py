"""The kernel core as one state machine, in-process: hypothesis drives router + admission +
ledger with random clients, workers, management calls, crashes, garbage and time (a fake host,
no sockets), checks every invariant after every step, that every request gets at most one FINAL,
and that replaying the decision log reproduces the ledger (kernel.replay, as on a restart).

Bounded (few examples of bounded length) so it runs in CI on every push."""

from __future__ import annotations

import collections

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kernel import codec, errors
from kernel import protocol as P
from kernel.admission import BudgetAdmission
from kernel.host import FakeHost
from kernel.mmi import Caller, Management
from kernel.principal import Principal
from kernel.replay import _norm, replay_lines
from kernel.router import Router
from kernel.logstore import encode_record

_encode = encode_record
SERVICES = [b"a", b"b", b"ghost"]  # ghost: no worker ever registers
WORKERS = [b"W0", b"W1", b"W2"]
CLIENTS = [b"C0", b"C1", b"C2"]
PRINCIPALS = [Principal("local", "operator"), Principal("alice", "client"), Principal("bob", "client")]
JOBS = [None, None, "j1", "j2"]
LIMITS = {"wall_ms": 50_000.0, "cpu_ms": 50_000.0, "tokens": 300.0, "flops": 1e9}


class MemoryLog:
    """The decision log's records, in memory (the same records kernel.decisions writes)."""

    def __init__(self, session: str) -> None:
        self.session = session
        self.state = None
        self.lines = [_encode({"seq": 0, "op": "session", "t": 0.0, "session": session, "restored": False})]

    def append(self, op: str, now: float, inputs: dict, outputs: dict) -> None:
        self.lines.append(_encode({"seq": len(self.lines), "t": now, "op": op, "in": inputs, "out": outputs}))

    def flush(self) -> None:
        pass

    def restarted(self, session: str) -> None:
        """A new kernel run continues this log (its session line says so)."""
        self.session = session
        self.lines.append(_encode({"seq": 0, "op": "session", "t": 0.0, "session": session, "restored": True}))


class Wire:
    def __init__(self) -> None:
        self.finals: collections.Counter = collections.Counter()  # (client, rid) -> FINALs
        self.to_worker: dict[bytes, list[bytes]] = collections.defaultdict(list)  # worker -> tokens
        self.unroutable: set[bytes] = set()

    def __call__(self, frames: list[bytes]) -> bool:
        if frames[0] in self.unroutable:
            return False
        if frames[1] == P.MDPC and frames[2] == P.ClientCmd.FINAL.value and len(frames) > 4:
            try:
                status = codec.unpack(frames[4])
            except Exception:
                status = None
            if isinstance(status, dict) and status.get("id") is not None:
                self.finals[frames[0], status["id"]] += 1
        if frames[1] == P.MDPW and frames[2] == P.WorkerCmd.REQUEST.value:
            self.to_worker[frames[0]].append(frames[3])
        return True


class KernelModel(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.host = FakeHost(seed=7)
        self.journal = MemoryLog("m.")
        self.runs = 0
        self.steps = self.last_restart = 0  # steps taken (counted by the invariant), at the last restart
        self.now = 0.0
        self.rid = 0
        self.reservations: list[str] = []
        self.seen: collections.Counter[str] = collections.Counter()  # what the run exercised
        self.wire = Wire()
        self.boot(None)

    def boot(self, restored: object) -> None:
        """A kernel run: a fresh admission (restoring ``restored``, a replay report, as
        kernel/__main__ does) and a fresh router; the workers register again."""
        self.adm = BudgetAdmission(
            decision_log=self.journal,
            root_limits={k: v * 4 for k, v in LIMITS.items()},
            default_limits=LIMITS,
            max_pause=3.0,
            host=self.host,
            restored=restored,
            restored_at=self.now,
        )
        self.published: list[tuple[bytes, dict]] = []
        self.router = Router(
            self.wire,
            admission=self.adm,
            management=Management(self.adm),
            host=self.host,
            heartbeat_interval=1.0,
            liveness=3,
            unavailable_wait=2.0,
            max_queue=8,
            max_queued_bytes=4096,
            publish=lambda t, m: self.published.append((t, m)),
        )
        self.ready(WORKERS[0], b"a", 2)
        self.ready(WORKERS[1], b"b", 1)

    @precondition(lambda self: self.steps - self.last_restart >= 12)  # runs between restarts are long
    @rule()
    def kernel_restart(self) -> None:
        """The kernel dies and starts again from its decision log: the restored ledger is the
        logged one with every request that was running finished; connections start over."""
        report = replay_lines(self.journal.lines)
        assert report.divergences == []
        self.runs += 1
        self.last_restart = self.steps
        self.journal.restarted(f"m{self.runs}.")
        self.wire.to_worker.clear()
        self.wire.unroutable.clear()
        self.boot(report)
        assert all(j.running == 0 and j.wall_running == 0 for j in self.adm.ledger.jobs.values())
        self.seen["kernel_restart"] += 1

    # -- peers ------------------------------------------------------------------------------------

    @rule(w=st.sampled_from(WORKERS), service=st.sampled_from(SERVICES[:2]), capacity=st.integers(1, 3))
    def ready(self, w: bytes, service: bytes, capacity: int) -> None:
        self.wire.unroutable.discard(w)  # a new process on that routing id
        self.router.on_message(
            [w, P.MDPW, P.WorkerCmd.READY.value, service, codec.pack({"capacity": capacity})], self.now
        )

    @rule(
        c=st.integers(0, 2),
        service=st.sampled_from([b"a", b"a", b"b", b"ghost"]),
        job=st.sampled_from(JOBS),
        priority=st.sampled_from([None, 0, 5, -3]),
        tokens=st.sampled_from([None, 1, 50, 1000]),
        deadline=st.sampled_from([None, 100, 5000]),
        idem=st.booleans(),
        size=st.sampled_from([1, 2000]),
    )
    def request(self, c, service, job, priority, tokens, deadline, idem, size) -> None:
        self.rid += 1
        header = {"v": 1, "id": self.rid}
        if job is not None:
            header["job"] = job
        if priority is not None:
            header["priority"] = priority
        if tokens is not None:
            header["budget"] = {"tokens": tokens}
        if deadline is not None:
            header["deadline"] = deadline
        if idem:
            header["idem"] = f"k{self.rid}"
        self.router.on_message(
            [CLIENTS[c], P.MDPC, P.ClientCmd.REQUEST.value, service, codec.pack(header), b"x" * size],
            self.now,
            PRINCIPALS[c],
        )

    @rule(c=st.integers(0, 2), service=st.sampled_from(SERVICES))
    def opaque_request(self, c, service) -> None:
        self.router.on_message(
            [CLIENTS[c], b"", P.MDPC, P.MajortomoClientCmd.REQUEST.value, service, b"raw"], self.now, PRINCIPALS[c]
        )

    @rule(
        w=st.sampled_from(WORKERS),
        data=st.data(),
        final=st.booleans(),
        status=st.sampled_from(["ok", "paused", "resumed", "error", "junk"]),
        tokens=st.sampled_from([0, 5, 200, 600]),
    )
    def reply(self, w, data, final, status, tokens) -> None:
        sent = self.wire.to_worker.get(w)
        self.seen["reply" if sent else "reply_to_nothing"] += 1
        if not sent:
            return
        token = data.draw(st.sampled_from(sent))
        if final:
            sent.remove(token)
        body = (
            b"not msgpack" if status == "junk" else codec.pack({"v": 1, "status": status, "spent": {"tokens": tokens}})
        )
        cmd = P.WorkerCmd.FINAL if final else P.WorkerCmd.PARTIAL
        self.router.on_message([w, P.MDPW, cmd.value, token, b"", body, b"out"], self.now)

    @rule(w=st.sampled_from(WORKERS))
    def heartbeat(self, w) -> None:
        if w in self.router.workers:
            self.router.on_message([w, P.MDPW, P.WorkerCmd.HEARTBEAT.value], self.now)

    @rule(w=st.sampled_from(WORKERS))
    def disconnect(self, w) -> None:
        self.router.on_message([w, P.MDPW, P.WorkerCmd.DISCONNECT.value], self.now)
        self.wire.to_worker.pop(w, None)

    @rule(w=st.sampled_from(WORKERS))
    def park(self, w) -> None:
        """The ladder froze the worker for a tombstone (a worker holding none is parked too: the
        router must keep its invariants whatever the shell asks)."""
        self.router.park(w, self.now)

    @rule(w=st.sampled_from(WORKERS))
    def crash(self, w) -> None:
        """The worker's process is gone: sends to it fail, it never answers again."""
        self.wire.unroutable.add(w)
        self.wire.to_worker.pop(w, None)

    @rule(
        frames=st.lists(
            st.sampled_from(
                [
                    b"",
                    P.MDPC,
                    P.MDPW,
                    b"\x01",
                    b"\x03",
                    b"\x04",
                    b"a",
                    b"mmi.x",
                    codec.pack({"v": 1, "id": [1]}),
                    codec.pack({"v": 2}),
                ]
            ),
            min_size=1,
            max_size=6,
        ),
        who=st.sampled_from([*CLIENTS, b"X", WORKERS[0]]),
    )
    def garbage(self, frames, who) -> None:
        self.router.on_message([who, *frames], self.now)

    # -- management -------------------------------------------------------------------------------

    def mmi(self, c: int, name: str, arg: object) -> object:
        return self.router.management.handle(self.router, name, arg, self.now, Caller(CLIENTS[c], PRINCIPALS[c]))

    @rule(
        c=st.integers(0, 2),
        job=st.sampled_from(JOBS[2:]),
        tokens=st.sampled_from([10, 100, 10_000]),
        priority=st.sampled_from([0, 3]),
    )
    def job_open(self, c, job, tokens, priority) -> None:
        self.mmi(c, P.MMI_JOB_OPEN, {"job": job, "budget": {"tokens": tokens}, "priority": priority})

    @rule(c=st.integers(0, 2), job=st.sampled_from(JOBS[2:]))
    def job_close(self, c: int, job: str) -> None:
        self.mmi(c, P.MMI_JOB_CLOSE, {"job": job})

    @rule(c=st.integers(0, 2), amount=st.sampled_from([1, 3, 1000]), commit=st.booleans())
    def reserve(self, c, amount, commit) -> None:
        out = self.mmi(
            c, P.MMI_GATE_RESERVE, {"resource": "tokens", "amount": amount, "commit": commit, "lease_s": 2.0}
        )
        if isinstance(out, dict) and "reservation" in out:
            self.reservations.append(out["reservation"])

    @precondition(lambda self: self.reservations)
    @rule(c=st.integers(0, 2), data=st.data(), op=st.sampled_from([P.MMI_GATE_COMMIT, P.MMI_GATE_RELEASE]))
    def settle(self, c, data, op) -> None:
        self.mmi(c, op, {"reservation": data.draw(st.sampled_from(self.reservations))})

    @rule(c=st.integers(0, 2), data=st.data(), op=st.sampled_from([P.MMI_PREEMPT, P.MMI_RESUME, P.MMI_CANCEL]))
    def order(self, c, data, op) -> None:
        tokens = list(self.router.inflight)
        if tokens and data.draw(st.booleans()):
            self.mmi(c, op, {"token": data.draw(st.sampled_from(tokens))})
        else:
            self.mmi(c, op, {"job": data.draw(st.sampled_from(JOBS[2:]))})

    @rule(
        c=st.integers(0, 2),
        name=st.sampled_from(sorted(P.MMI_OPS)),
        arg=st.one_of(
            st.none(),
            st.binary(max_size=4),
            st.dictionaries(
                st.sampled_from(
                    [
                        "job",
                        "parent",
                        "budget",
                        "limits",
                        "priority",
                        "resource",
                        "amount",
                        "commit",
                        "up_to",
                        "lease_s",
                        "reservation",
                        "reservations",
                        "token",
                        "id",
                        "service",
                        "op",
                        "message",
                        "source",
                        "events",
                        "page",
                        "child",
                        "nice",
                        "cpus",
                    ]
                ),
                st.one_of(
                    st.none(),
                    st.booleans(),
                    st.integers(-(2**70), 2**70),
                    st.floats(),
                    st.text(max_size=4),
                    st.binary(max_size=4),
                    st.lists(st.integers(-3, 3), max_size=3),
                    st.dictionaries(st.text(max_size=3), st.floats(), max_size=2),
                ),
                max_size=4,
            ),
        ),
    )
    def mmi_garbage(self, c, name, arg) -> None:
        """Any argument gets an answer or a typed refusal; never an internal error."""
        out = self.mmi(c, name, arg)
        assert not isinstance(out, errors.InternalError), (name, arg)

    @rule(c=st.integers(0, 2))
    def stats(self, c) -> None:
        out = self.mmi(c, P.MMI_STATS, {})
        assert isinstance(out, dict) and "summary" in out

    # -- time -------------------------------------------------------------------------------------

    @rule(dt=st.sampled_from([0.01, 0.3, 1.0, 4.0]))
    def advance(self, dt) -> None:
        """Time passes; live workers (not crashed) heartbeat on the way."""
        step = min(dt, 1.0)
        target = self.now + dt
        while self.now < target:
            self.now = min(target, self.now + step)
            for w in list(self.router.workers):
                if w not in self.wire.unroutable:
                    self.router.on_message([w, P.MDPW, P.WorkerCmd.HEARTBEAT.value], self.now)
            self.router.tick(self.now)

    # -- invariants -------------------------------------------------------------------------------

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "router"):
            return
        self.steps += 1
        self.router.check_invariants()
        over = {k: n for k, n in self.wire.finals.items() if n > 1}
        assert not over, f"more than one FINAL: {over}"

    def teardown(self) -> None:
        if not hasattr(self, "router"):
            return
        # Replaying the decision log (as a restarted kernel does) reproduces the ledger.
        report = replay_lines(self.journal.lines)
        assert report.divergences == []
        assert report.ledger is not None
        assert _norm(report.ledger.dump()) == _norm(self.adm.ledger.dump())


KernelModel.TestCase.settings = settings(
    max_examples=25, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestKernelModel = KernelModel.TestCase


# -- the kernel with its workers' sessions, in one process ------------------------------------------


class SystemModel(RuleBasedStateMachine):
    """Router + admission + ledger with real worker sessions (kernel.worker) wired to it in
    process: requests, handler steps at safe points (pause, resume, cancel), PARTIALs, FINALs,
    control orders delivered to the sessions, lost links, time.  Every invariant of both sides
    after every step; every request a client sent gets at most one FINAL."""

    @initialize()
    def start(self) -> None:
        from kernel.worker import WorkerSession

        self.host = FakeHost(seed=3)
        self.journal = MemoryLog("s.")
        self.adm = BudgetAdmission(
            decision_log=self.journal,
            root_limits={k: v * 4 for k, v in LIMITS.items()},
            default_limits=LIMITS,
            max_pause=2.0,
            host=self.host,
        )
        self.now = 0.0
        self.wire = Wire()
        self.router = Router(
            self.send,
            admission=self.adm,
            management=Management(self.adm),
            host=self.host,
            heartbeat_interval=1.0,
            liveness=3,
            unavailable_wait=2.0,
            publish=self.publish,
        )
        self.sessions = {}
        for w, service, cap in ((b"W0", "a", 2), (b"W1", "a", 1), (b"W2", "b", 1)):
            self.sessions[w] = WorkerSession(
                service,
                lambda frames, w=w: self.router.on_message([w, *frames], self.now),
                capacity=cap,
                heartbeat=1.0,
                liveness=3,
            )
            self.sessions[w].connect(self.now)
        self.rid = 0
        self.seen: collections.Counter[str] = collections.Counter()  # what the run exercised

    def send(self, frames: list[bytes]) -> bool:
        self.wire(frames)
        session = self.sessions.get(frames[0])
        if session is not None:
            session.on_message(frames[1:], self.now)
        return True

    def publish(self, topic: bytes, message: dict) -> None:
        _, service, op = topic.decode().split("/", 2)
        for session in self.sessions.values():
            if service in (P.CTL_ALL, session.service):
                session.on_control(op, message)

    def active(self, data, w: bytes):
        tokens = sorted(self.sessions[w].active)
        return data.draw(st.sampled_from(tokens)) if tokens else None

    @rule(
        c=st.integers(0, 2),
        service=st.sampled_from([b"a", b"b"]),
        priority=st.sampled_from([None, 0, 9]),
        tokens=st.sampled_from([None, 20, 1000]),
        job=st.sampled_from([None, "j1"]),
    )
    def request(self, c, service, priority, tokens, job) -> None:
        self.rid += 1
        header = {"v": 1, "id": self.rid}
        if priority is not None:
            header["priority"] = priority
        if tokens is not None:
            header["budget"] = {"tokens": tokens}
        if job is not None:
            header["job"] = job
        self.router.on_message(
            [CLIENTS[c], P.MDPC, P.ClientCmd.REQUEST.value, service, codec.pack(header), codec.pack({"x": 1})],
            self.now,
            PRINCIPALS[c],
        )

    @rule(c=st.integers(0, 2), priority=st.sampled_from([0, 5]))
    def job_open(self, c, priority) -> None:
        self.router.management.handle(
            self.router,
            P.MMI_JOB_OPEN,
            {"job": "j1", "budget": {"tokens": 100}, "priority": priority},
            self.now,
            Caller(CLIENTS[c], PRINCIPALS[c]),
        )

    @rule(w=st.sampled_from([b"W0", b"W1", b"W2"]), data=st.data(), spent=st.sampled_from([0, 10, 400]))
    def step(self, w, data, spent) -> None:
        """A handler reaches a safe point (or looks again while paused), reporting what it spent."""
        token = self.active(data, w)
        if token is None:
            return
        session = self.sessions[w]
        state = session.active[token]
        state.spent = {"tokens": spent}
        self.seen["step"] += 1
        self.seen[
            "step_paused" if state.paused else "step_pause_requested" if state.pause_requested else "step_plain"
        ] += 1
        point = session.still_paused(token, self.now) if state.paused else session.safe_point(token, self.now)
        if point.value == "cancel":
            session.final(token, self.now, error=state.cancel)
        elif point.value == "continue" and data.draw(st.booleans()):
            session.partial(token, {"progress": 1}, self.now)

    @rule(w=st.sampled_from([b"W0", b"W1", b"W2"]), data=st.data())
    def finish(self, w, data) -> None:
        token = self.active(data, w)
        if token is not None and not self.sessions[w].active[token].paused:
            self.sessions[w].final(token, self.now, result={"ok": 1})

    @rule(c=st.integers(0, 2), op=st.sampled_from([P.MMI_PREEMPT, P.MMI_RESUME, P.MMI_CANCEL]), data=st.data())
    def order(self, c, op, data) -> None:
        tokens = list(self.router.inflight)
        if tokens:
            self.router.management.handle(
                self.router,
                op,
                {"token": data.draw(st.sampled_from(tokens))},
                self.now,
                Caller(CLIENTS[c], PRINCIPALS[c]),
            )

    @rule(w=st.sampled_from([b"W0", b"W1", b"W2"]))
    def link_lost(self, w) -> None:
        """The worker's socket breaks: it reconnects after its backoff; the kernel notices by liveness."""
        session = self.sessions[w]
        if session.connected:
            session.lost("socket closed", self.now)

    @rule(dt=st.sampled_from([0.1, 0.5, 1.5, 3.0]))
    def advance(self, dt) -> None:
        target = self.now + dt
        while self.now < target:
            self.now = min(target, self.now + 0.25)
            for session in self.sessions.values():
                if session.link.value == "backoff" and self.now >= session.reconnect_at:
                    session.connect(self.now)
                session.tick(self.now)
                # Every running handler reaches a safe point as time passes (paused ones look again).
                for token, state in list(session.active.items()):
                    point = (
                        session.still_paused(token, self.now) if state.paused else session.safe_point(token, self.now)
                    )
                    self.seen[f"auto_{point.value}"] += 1
                    if point.value == "cancel" and token in session.active:
                        session.final(token, self.now, error=state.cancel)
            self.router.tick(self.now)

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "router"):
            return
        self.router.check_invariants()
        for w, session in self.sessions.items():
            session.check_invariants()
            worker = self.router.workers.get(w)
            if worker is not None and session.connected:
                # What the worker holds, the kernel has in flight on it (or answered: a tombstone).
                assert set(session.active) <= set(worker.inflight), (w, session.active.keys(), worker.inflight.keys())
        over = {k: n for k, n in self.wire.finals.items() if n > 1}
        assert not over, f"more than one FINAL: {over}"

    def teardown(self) -> None:
        if hasattr(self, "router"):
            report = replay_lines(self.journal.lines)
            assert report.divergences == []
            assert _norm(report.ledger.dump()) == _norm(self.adm.ledger.dump())


SystemModel.TestCase.settings = settings(
    max_examples=20, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestSystemModel = SystemModel.TestCase


def test_paused_request_ended_keeps_its_lent_slot_lent() -> None:
    """Regression (found by SystemModel): a request paused by kernel preemption lent its slot to
    the preempting one; when the paused request ended (its job's budget ran out) and its late
    FINAL came, the slot went back to the free list although the borrower still held it: the
    worker was over capacity."""
    m = SystemModel()
    m.start()
    # (one more 3 s before the preempting request since queued time stopped spending wall_ms:
    # the job still runs out while the preempted request is paused, as the bug needed)
    steps: list[float | int | None] = [None, None, 0.1, 0.1, 0.1, 3.0, None, 0.1, 0.1, 0.1, 0.1, 3.0,
                                       None, 0.1, 3.0, 3.0, 0.1, 0.1, 3.0, 9, 3.0]
    for step in steps:
        if step is None:
            m.request(c=1, job=None, priority=None, service=b"a", tokens=None)
        elif isinstance(step, int):
            m.request(c=0, job=None, priority=step, service=b"a", tokens=None)
        else:
            m.advance(step)
        m.consistent()
    assert m.adm.counters["preempts"] == 1 and m.adm.counters["exhausted"] >= 1
    m.teardown()


def test_a_request_preempted_again_before_its_handler_saw_the_resume_lends_its_slot_again() -> None:
    """Regression (bench ray, 03:30: a high-priority request waited max_pause): the kernel resumed
    a paused request when its borrower ended and a new higher-priority request preempted it again
    before the paused handler looked (both control messages applied first).  The handler went on
    waiting without a word, the kernel waited for a new ``paused`` to lend the slot: the new
    request stayed queued until max_pause.  Capacity-1 service ``b``, one principal."""
    m = SystemModel()
    m.start()
    w2 = m.sessions[b"W2"]

    def queued_high_runs() -> bool:
        return m.router.services[b"b"].queued == 0 and len(w2.active) == 2

    m.request(c=0, job=None, priority=0, service=b"b", tokens=None)
    (low,) = w2.active
    for cycle in range(2):
        m.request(c=0, job=None, priority=9, service=b"b", tokens=None)  # the kernel preempts low
        assert w2.active[low].pause_requested, cycle
        if cycle == 0:
            assert w2.safe_point(low, m.now).value == "pause"
        else:  # resumed and preempted again, both before the paused handler looks
            assert w2.still_paused(low, m.now).value == "pause"
        m.consistent()
        assert queued_high_runs(), f"cycle {cycle}: the high request waits for a slot that is never lent"
        (high,) = set(w2.active) - {low}
        w2.final(high, m.now, result={"ok": 1})  # the kernel resumes low (RESUME published)
        assert not w2.active[low].pause_requested
        m.consistent()
    assert m.adm.counters["preempts"] == 2 and m.adm.counters["resumes"] == 2
    m.teardown()
