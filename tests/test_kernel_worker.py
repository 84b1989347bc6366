"""Unit tests of the sans-I/O worker session (kernel/worker.py): time is passed in, frames are
collected from the send callable; no sockets, no sleeps."""

from __future__ import annotations

import pytest

from kernel import codec, errors
from kernel import protocol as P
from kernel.worker import Link, LinkLost, NewRequest, SafePoint, WorkerSession, targets

W = P.WorkerCmd


@pytest.fixture
def sent():
    return []


@pytest.fixture
def session(sent):
    s = WorkerSession("echo", sent.append, capacity=2, pid=42, heartbeat=1.0, liveness=3)
    s.connect(0.0)
    return s


def cmds(sent):
    return [frames[1] for frames in sent]


def request(session, token=b"T1", header=None, payload=None, now=0.1):
    header = {P.H_VERSION: P.VERSION, P.H_ID: 7, P.H_JOB: "j"} if header is None else header
    events = session.on_message([P.MDPW, W.REQUEST.value, token, b"", codec.pack(header), codec.pack(payload)], now)
    return events


def status_of(frames):
    return codec.unpack(frames[4])


def test_connect_sends_ready_with_capacity_and_pid(session, sent):
    assert sent[0][:3] == [P.MDPW, W.READY.value, b"echo"]
    assert codec.unpack(sent[0][3]) == {P.R_VERSION: P.VERSION, P.R_CAPACITY: 2, P.R_PID: 42}
    assert session.link is Link.READY_SENT and not session.registered


def test_heartbeat_only_after_an_interval_of_silence(session, sent):
    assert session.next_wakeup() == 1.0
    session.tick(0.99)
    assert cmds(sent) == [W.READY.value]
    session.on_message([P.MDPW, W.HEARTBEAT.value], 0.5)
    assert session.registered
    session.tick(1.0)
    assert cmds(sent) == [W.READY.value, W.HEARTBEAT.value]
    assert session.next_wakeup() == 2.0  # the next heartbeat; the kernel is alive until 3.5


def test_kernel_lost_after_the_liveness_window_and_backoff_doubles_then_resets(session, sent):
    session.on_message([P.MDPW, W.HEARTBEAT.value], 0.5)
    assert session.tick(3.49) == ()
    (lost,) = session.tick(3.5)
    assert isinstance(lost, LinkLost) and "silent" in lost.reason
    assert session.link is Link.BACKOFF and session.reconnect_at == pytest.approx(3.5 + P.RECONNECT_INITIAL)
    assert session.next_wakeup() == session.reconnect_at
    delays = []
    now = 4.0
    for _ in range(8):  # the kernel never answers: 0.05, 0.1, ... capped at RECONNECT_MAX
        session.connect(now)
        now += session.window
        (lost,) = session.tick(now)
        delays.append(round(session.reconnect_at - now, 6))
    assert delays[:3] == [0.1, 0.2, 0.4] and delays[-1] == P.RECONNECT_MAX
    session.connect(now)
    session.on_message([P.MDPW, W.HEARTBEAT.value], now)  # registered: the backoff starts over
    lost = session.lost("test", now)
    assert session.reconnect_at - now == pytest.approx(P.RECONNECT_INITIAL)


def test_disconnect_from_the_kernel_drops_every_request(session, sent):
    request(session, b"A")
    request(session, b"B")
    (lost,) = session.on_message([P.MDPW, W.DISCONNECT.value], 0.2)
    assert isinstance(lost, LinkLost) and {s.token for s in lost.dropped} == {b"A", b"B"}
    assert session.active == {} and not session.final(b"A", 0.3, "late")  # nothing sent for it
    assert session.late_replies == 1 and cmds(sent) == [W.READY.value]


def test_exactly_one_final_and_partials_only_while_active(session, sent):
    (ev,) = request(session, b"T", payload={"x": 1})
    assert isinstance(ev, NewRequest) and ev.payload == {"x": 1} and ev.state.id == 7 and ev.state.job == "j"
    ev.state.spent["tokens"] = 3
    assert session.partial(b"T", {"i": 0}, 0.2)
    assert session.final(b"T", 0.3, {"done": True})
    assert not session.final(b"T", 0.4, error=errors.ServiceError("again"))
    assert not session.partial(b"T", {"i": 1}, 0.5)
    replies = [f for f in sent if f[1] in (W.PARTIAL.value, W.FINAL.value)]
    assert [f[1] for f in replies] == [W.PARTIAL.value, W.FINAL.value]
    final = status_of(replies[1])
    assert final[P.S_STATUS] == P.STATUS_OK and final[P.S_SPENT] == {"tokens": 3} and final[P.S_ID] == 7
    assert codec.unpack(replies[1][5]) == {"done": True}


def test_undecodable_payload_is_answered_bad_request_at_once(session, sent):
    header = codec.pack({P.H_VERSION: P.VERSION, P.H_ID: 1})
    events = session.on_message([P.MDPW, W.REQUEST.value, b"T", b"", header, b"\xc1"], 0.1)
    assert events == () and session.active == {}
    st = status_of(sent[-1])
    assert sent[-1][1] == W.FINAL.value and st[P.S_ERROR]["code"] == P.ErrorCode.BAD_REQUEST


def test_opaque_requests_get_raw_frames_back(session, sent):
    (ev,) = session.on_message([P.MDPW, W.REQUEST.value, b"T", b"", b"hello", b"world"], 0.1)
    assert ev.payload == [b"hello", b"world"] and not ev.state.reca
    session.final(b"T", 0.2, [b"a", b"b"])
    assert sent[-1][3:] == [b"", b"a", b"b"]


def test_control_targets_token_job_id_and_all(session):
    (a,) = request(session, b"A", header={P.H_VERSION: 1, P.H_ID: 1, P.H_JOB: "j1"})
    (b,) = request(session, b"B", header={P.H_VERSION: 1, P.H_ID: 1, P.H_JOB: "j2"})
    a, b = a.state, b.state
    assert targets({P.C_TOKEN: b"A", P.C_JOB: "j2"}, a) and not targets({P.C_TOKEN: b"A"}, b)
    assert targets({P.C_JOB: "j2"}, b) and not targets({P.C_JOB: "j2"}, a)
    assert targets({P.C_ID: 1}, a) and targets({P.C_ID: 1}, b)
    assert not targets({P.C_ID: 1, P.C_JOB: "j3"}, a)  # an id is only read without a job
    assert targets({"all": True}, a)
    assert session.on_control(P.ControlOp.PREEMPT, {P.C_JOB: "j1"}) == [a]
    assert a.pause_requested and not b.pause_requested
    assert session.on_control(P.ControlOp.PREEMPT, "not a map") == []


def test_pause_at_a_safe_point_then_resume(session, sent):
    (ev,) = request(session, b"T")
    assert session.safe_point(b"T", 0.2) is SafePoint.CONTINUE
    session.on_control(P.ControlOp.PREEMPT, {P.C_TOKEN: b"T"})
    assert session.pending(b"T") is SafePoint.PAUSE and len(sent) == 1  # a query sends nothing
    assert session.safe_point(b"T", 0.3) is SafePoint.PAUSE and ev.state.paused
    paused = status_of(sent[-1])
    assert paused[P.S_STATUS] == P.STATUS_PAUSED and codec.unpack(sent[-1][5]) == {"paused_at": 0.3}
    assert session.still_paused(b"T", 0.4) is SafePoint.PAUSE and len(sent) == 2
    session.on_control(P.ControlOp.RESUME, {P.C_TOKEN: b"T"})
    assert session.still_paused(b"T", 0.5) is SafePoint.CONTINUE and not ev.state.paused
    assert status_of(sent[-1])[P.S_STATUS] == P.STATUS_RESUMED
    assert codec.unpack(sent[-1][5]) == {"resumed_at": 0.5}
    assert session.paused_acks == 1


def test_a_preempt_after_a_resume_the_paused_handler_has_not_seen_is_acknowledged_again(session, sent):
    # Regression (bench ray, 03:30): the kernel resumed a paused request (its slot freed) and a
    # new higher-priority request preempted it again before the paused handler looked: both
    # control messages were applied first, the handler saw pause_requested and went on waiting
    # silently.  The kernel, which had resumed it and now waited for a new ``paused`` to lend
    # its slot, never got one: the high request waited max_pause (60 s).  Every preempt after a
    # resume must be acknowledged: ``resumed`` then ``paused`` again.
    (ev,) = request(session, b"T")
    session.on_control(P.ControlOp.PREEMPT, {P.C_TOKEN: b"T"})
    assert session.safe_point(b"T", 0.2) is SafePoint.PAUSE
    session.on_control(P.ControlOp.RESUME, {P.C_TOKEN: b"T"})
    session.on_control(P.ControlOp.PREEMPT, {P.C_TOKEN: b"T"})
    assert session.still_paused(b"T", 0.3) is SafePoint.PAUSE and ev.state.paused
    assert [status_of(f)[P.S_STATUS] for f in sent[1:]] == [P.STATUS_PAUSED, P.STATUS_RESUMED, P.STATUS_PAUSED]
    assert codec.unpack(sent[-2][5]) == {"resumed_at": 0.3} and codec.unpack(sent[-1][5]) == {"paused_at": 0.3}
    assert session.paused_acks == 2
    assert session.still_paused(b"T", 0.4) is SafePoint.PAUSE and len(sent) == 4  # nothing new: no resend
    session.on_control(P.ControlOp.PREEMPT, {P.C_TOKEN: b"T"})  # a repeated preempt is no new pause
    assert session.still_paused(b"T", 0.5) is SafePoint.PAUSE and len(sent) == 4
    session.on_control(P.ControlOp.RESUME, {P.C_TOKEN: b"T"})
    assert session.still_paused(b"T", 0.6) is SafePoint.CONTINUE and status_of(sent[-1])[P.S_STATUS] == P.STATUS_RESUMED


def test_cancel_wins_over_pause_and_carries_its_code(session):
    request(session, b"T")
    session.on_control(P.ControlOp.PREEMPT, {P.C_TOKEN: b"T"})
    assert session.safe_point(b"T", 0.2) is SafePoint.PAUSE
    session.on_control(
        P.ControlOp.CANCEL, {P.C_TOKEN: b"T", P.C_CODE: P.ErrorCode.BUDGET_EXCEEDED, P.C_REASON: "spent"}
    )
    assert session.still_paused(b"T", 0.3) is SafePoint.CANCEL
    state = session.active[b"T"]
    assert isinstance(state.cancel, errors.BudgetExceeded) and state.cancel.message == "spent"
    session.on_control(P.ControlOp.CANCEL, {P.C_TOKEN: b"T"})  # the first reason stays
    assert isinstance(state.cancel, errors.BudgetExceeded)
    assert session.safe_point(b"T", 0.4) is SafePoint.CANCEL


def test_resume_before_the_safe_point_means_no_pause(session, sent):
    request(session, b"T")
    session.on_control(P.ControlOp.PREEMPT, {P.C_TOKEN: b"T"})
    session.on_control(P.ControlOp.RESUME, {P.C_TOKEN: b"T"})
    assert session.safe_point(b"T", 0.2) is SafePoint.CONTINUE and len(sent) == 1


def test_stop_says_disconnect_and_drops(session, sent):
    request(session, b"T")
    dropped = session.stop(1.0)
    assert [s.token for s in dropped] == [b"T"] and cmds(sent)[-1] == W.DISCONNECT.value
    assert session.link is Link.STOPPED and session.on_message([P.MDPW, W.HEARTBEAT.value], 1.1) == ()
    with pytest.raises(RuntimeError):
        session.connect(1.2)


def test_malformed_kernel_messages_are_counted_not_fatal(session):
    assert session.on_message([b"XX", W.HEARTBEAT.value], 0.1) == ()
    assert session.on_message([P.MDPW, b"\x09"], 0.2) == ()
    assert session.on_message([P.MDPW, W.REQUEST.value, b"T"], 0.3) == ()
    assert session.malformed == 3 and session.connected
