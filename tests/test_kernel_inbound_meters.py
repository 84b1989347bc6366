"""The inbound meter (issue 24): what libzmq holds for a tcp connection before the kernel sees it,
from the OS's count of bytes received less the wire size of the frames the kernel read
(kernel.quotas.InboundMeters; pure, time and evidence passed in).  Real connections:
tests/test_kernel_inbound.py."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kernel import quotas
from kernel.quotas import HANDSHAKE_ALLOWANCE as HS
from kernel.quotas import IN, InboundMeters, subscription_wire, wire_bytes

MIB = 1 << 20


def test_wire_sizes_match_what_tcp_info_counted():
    # Measured on real connections (tcpi_bytes_received - SIOCINQ after each message, libzmq
    # 4.3.5): a flags byte + a 1-byte size up to 255, an 8-byte size past it; CURVE frames are
    # MESSAGE commands 33 bytes longer than their payload.
    assert [wire_bytes(n, False) for n in (0, 3, 255, 256, 70000)] == [2, 5, 257, 265, 70009]
    assert [wire_bytes(n, True) for n in (0, 222, 223, MIB)] == [35, 257, 265, MIB + 42]
    # A subscription of a 30-byte topic (31-byte message) was 42 bytes plain, 75 under CURVE.
    topic = b"t" * 30
    assert subscription_wire(b"\x01" + topic, False) == 42 and subscription_wire(b"\x01" + topic, True) == 75
    # A cancel travels as a CANCEL command (6 bytes more); any other frame at its own size.
    assert subscription_wire(b"\x00" + topic, False) == 39
    assert subscription_wire(b"x" + topic, False) == wire_bytes(31, False) == 33
    assert subscription_wire(b"", False) == 2


def test_a_message_still_coming_in_is_cut_past_the_budget():
    m = InboundMeters(in_bytes=4 * MIB)
    meter = m.meter(fd=9, ino=90)
    assert m.look(meter, received=0, read=HS, now=0.0) is None  # the handshake only
    assert meter.unread == 0
    assert m.look(meter, received=0, read=HS + 3 * MIB, now=0.1) is None  # 3 MiB of frames held
    assert meter.unread == 3 * MIB and m.total == 3 * MIB
    assert m.look(meter, received=0, read=HS + 4 * MIB + 1, now=0.2) == IN
    assert meter.cut and m.total == 0 and m.stats()["dropped_unread"] == 1
    # A cut meter is not cut again, and its later looks do not count in the total.
    assert m.look(meter, received=0, read=HS + 9 * MIB, now=0.3) is None
    assert m.total == 0 and m.stats()["unread_max"] == 9 * MIB
    m.check_invariants()


def test_what_the_kernel_read_is_not_held_and_nothing_is_banked():
    m = InboundMeters(in_bytes=4 * MIB)
    meter = m.meter(fd=9, ino=90)
    # 100 MiB through the connection, each message read by the kernel: never past the budget.
    for k in range(1, 101):
        meter.received += MIB
        assert m.look(meter, meter.received, HS + k * MIB + 100, now=float(k)) is None
        assert meter.unread == 100
    # More credited than the socket's count (over-credit): 0, and kept as the meter's offset, not
    # as credit against later bytes.
    assert m.look(meter, received=101 * MIB, read=HS + 100 * MIB, now=101.0) is None
    assert meter.unread == 0 and meter.offset == MIB - HS
    assert m.look(meter, received=101 * MIB, read=HS + 104 * MIB + HS + 1, now=102.0) == IN
    m.check_invariants()


def test_over_credit_seen_at_a_look_never_offsets_a_later_message():
    # 1M one-byte control frames credited 9 bytes too many each (review finding 3): 9 MB banked
    # would hide an 8 MB unfinished message from a 1 MiB budget.
    m = InboundMeters(in_bytes=MIB)
    meter = m.meter(fd=9, ino=90)
    meter.received = 1_000_000 * 12
    assert m.look(meter, meter.received, HS + 1_000_000 * 3, now=0.0) is None
    assert meter.unread == 0
    assert m.look(meter, meter.received, HS + 1_000_000 * 3 + 8 * MIB, now=0.1) == IN


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2 * MIB), st.integers(0, 2 * MIB)), max_size=30), st.integers(0, 3 * MIB))
def test_surplus_never_accumulates_past_a_look(steps, held):
    # Each step: ``real`` bytes read by the kernel, credited ``real + over``; a look after each.
    # Then an unfinished message: past the budget (and the allowance) it is cut, whatever came before.
    m = InboundMeters(in_bytes=MIB)
    meter = m.meter(fd=9, ino=90)
    read = HS
    for real, over in steps:
        read += real
        meter.received += real + over
        m.look(meter, meter.received, read, now=0.0)
        assert meter.unread <= max(0, read - meter.received + meter.offset - HS)
        m.check_invariants()
    if not meter.cut:
        why = m.look(meter, meter.received, read + held, now=1.0)
        if held > MIB + HS:  # past the budget and the whole allowance: cut
            assert why == IN
        elif held <= MIB:  # within the budget: never
            assert why is None


def test_a_reused_descriptor_is_a_new_connection():
    m = InboundMeters(in_bytes=4 * MIB)
    old = m.meter(fd=9, ino=90)
    old.received = 50 * MIB
    m.look(old, old.received, HS + 50 * MIB + 2 * MIB, now=0.0)
    assert m.total == 2 * MIB
    assert m.meter(fd=9, ino=90) is old  # the same connection: the same meter
    new = m.meter(fd=9, ino=91)  # another socket on the same number
    assert new is not old and new.received == 0 and m.total == 0
    m.close(9, ino=90)  # the old one's close: not this one's
    assert m.meters[9] is new
    m.close(9)
    assert m.meters == {} and m.total == 0
    m.check_invariants()


def test_every_connection_together_loses_the_largest():
    m = InboundMeters(in_bytes=8 * MIB, total_bytes=10 * MIB)
    meters = {fd: m.meter(fd, fd * 10) for fd in (3, 4, 5)}
    for fd, held in ((3, 3 * MIB), (4, 5 * MIB), (5, 1 * MIB)):
        assert m.look(meters[fd], 0, HS + held, now=0.0) is None  # each under its own budget
    assert m.largest() is None  # 9 MiB together
    m.look(meters[5], 0, HS + 3 * MIB, now=0.1)  # 11 MiB together
    assert m.largest() == 4
    m.cut(meters[4], quotas.IN_TOTAL)
    assert m.largest() is None and m.total == 6 * MIB
    assert m.stats()["dropped_unread_total"] == 1 and m.stats()["dropped_unread"] == 0
    m.check_invariants()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("mlrcx"), st.integers(0, 3), st.integers(0, 6 * MIB)), max_size=60))
def test_invariants_hold_under_any_sequence(ops):
    m = InboundMeters(in_bytes=4 * MIB, total_bytes=8 * MIB)
    read: dict[int, int] = {}
    now = 0.0
    for op, fd, n in ops:
        now += 0.01
        if op == "m":
            m.meter(fd, ino=fd + 100 * (n % 2))
        elif op == "l" and fd in m.meters:
            read[fd] = read.get(fd, 0) + n
            meter = m.meters[fd]
            why = m.look(meter, meter.received, read[fd], now)
            assert (why == IN) == (meter.cut and meter.unread > m.in_bytes and why is not None)
        elif op == "r" and fd in m.meters:
            m.meters[fd].received += n
        elif op == "c":
            m.close(fd)
            read.pop(fd, None)
        elif op == "x":
            big = m.largest()
            if big is not None:
                m.cut(m.meters[big], quotas.IN_TOTAL)
        m.check_invariants()
        assert all(meter.unread <= max(0, read.get(fd, 0) - HS) for fd, meter in m.meters.items())


def test_every_connection_is_looked_at_once_the_resident_set_grew_a_step():
    m = InboundMeters(in_bytes=8 * MIB)
    step = quotas.INBOUND_SCAN_STEP
    base = 40 * MIB
    assert not m.due(base, now=0.0)  # the first reading is the base
    assert not m.due(base + step - 1, now=0.01)
    assert m.due(base - 10 * MIB, now=0.02) is False  # memory given back: the base follows it down
    assert m.due(base - 10 * MIB + step, now=0.03)  # a step above the least seen: look
    m.scanned(base - 10 * MIB + step, now=0.04, spent=0.01)  # the look took 10 ms
    assert m.stats()["scans"] == 1
    # Past another step, but within 4 x the look's time of it: not yet (a fifth of a CPU at most).
    grown = base - 10 * MIB + 3 * step
    assert not m.due(grown, now=0.06)
    assert m.due(grown, now=0.04 + quotas.INBOUND_PAUSE_PER_LOOK * 0.01)


def test_past_the_resident_set_ceiling_the_largest_holder_is_cut_then_it_settles():
    # The backstop for what the wire meter does not see (libzmq's 64-byte msg_t per empty frame).
    m = InboundMeters(in_bytes=24 * MIB, total_bytes=96 * MIB, rss_ceiling=32 * MIB)
    small, big, idle = m.meter(fd=7, ino=70), m.meter(fd=8, ino=80), m.meter(fd=9, ino=90)
    tiny = m.meter(fd=10, ino=100)
    m.look(tiny, received=0, read=HS + quotas.TCP_UNREAD_MIN - 1, now=0.0)  # a request in flight
    m.look(small, received=0, read=HS + MIB, now=0.0)
    m.look(big, received=0, read=HS + 4 * MIB, now=0.0)  # 4 MB on the wire, far under its budget
    m.look(idle, received=0, read=HS, now=0.0)
    assert not m.over_ceiling(50 * MIB, now=0.0)  # the first reading is the baseline
    assert not m.over_ceiling(50 * MIB + 32 * MIB, now=0.01)  # at the ceiling, not past it
    assert m.over_ceiling(50 * MIB + 32 * MIB + 1, now=0.02)
    assert m.holder(now=0.02) == 8  # the one holding the most unread, not the first or the idle one
    assert m.cut(big, quotas.IN_RSS) == quotas.IN_RSS
    assert m.stats()["dropped_unread_rss"] == 1 and m.total == MIB + quotas.TCP_UNREAD_MIN - 1
    # Still past it (memory is freed on libzmq's thread): no second cut before the settling time
    # ... unless it grows on (another connection adds to it; the cut one cannot).
    assert not m.over_ceiling(50 * MIB + 32 * MIB + 1, now=0.02 + quotas.RSS_CEILING_SETTLE_S / 2)
    grown = 50 * MIB + 32 * MIB + 1 + quotas.CEILING_REGROW * quotas.INBOUND_SCAN_STEP
    assert not m.over_ceiling(grown - 1, now=0.02 + quotas.RSS_CEILING_SETTLE_S / 2)
    assert m.over_ceiling(grown, now=0.02 + quotas.RSS_CEILING_SETTLE_S / 2)
    assert m.over_ceiling(100 * MIB, now=0.02 + quotas.RSS_CEILING_SETTLE_S)
    assert m.holder(now=0.6) == 7
    m.cut(small, quotas.IN_RSS)
    # Nobody left holding anything: nothing is cut, it is counted; one passing counted once.
    assert m.over_ceiling(100 * MIB, now=1.2) and m.holder(now=1.2) is None and m.holder_unix(now=1.2) is None
    st_ = m.stats()
    assert st_["rss_ceiling_nothing_to_cut"] == 1 and st_["rss_ceiling_passes"] == 1, st_
    assert st_["rss_above_max"] == 50 * MIB and st_["rss_ceiling"] == 32 * MIB
    # Back under it, then past it again: a second passing.
    assert not m.over_ceiling(60 * MIB, now=2.0)
    assert m.over_ceiling(90 * MIB, now=2.1) and m.stats()["rss_ceiling_passes"] == 2
    m.check_invariants()


def test_the_resident_set_baseline_only_falls_and_the_ceiling_defaults_to_twice_the_total():
    m = InboundMeters(in_bytes=24 * MIB, total_bytes=96 * MIB)
    assert m.rss_ceiling == 192 * MIB == quotas.rss_ceiling_for(96 * MIB)
    assert InboundMeters(in_bytes=MIB).rss_ceiling == 2 * quotas.PEERS_IN_BYTES
    assert InboundMeters(in_bytes=MIB, total_bytes=MIB).rss_ceiling == quotas.RSS_CEILING_MIN  # a floor
    m.over_ceiling(100 * MIB, now=0.0)
    m.over_ceiling(80 * MIB, now=0.1)
    # A slow climb does not move the ceiling up with it: measured from the least seen.
    for n in range(1, 200):
        m.over_ceiling(80 * MIB + n * MIB, now=0.1 + n)
    assert m.rss_baseline == 80 * MIB and m.over and m.rss_above == 199 * MIB
    # What the kernel holds by its own account (queued requests, replies) does not count; nor
    # does it move the baseline.
    assert not m.over_ceiling(80 * MIB + 250 * MIB, now=300.0, accounted=100 * MIB)
    assert m.rss_baseline == 80 * MIB and m.rss_above == 150 * MIB


def test_free_memory_is_handed_back_for_a_while_after_a_cut_or_close():
    m = InboundMeters(in_bytes=MIB, rss_ceiling=64 * MIB)
    m.over_ceiling(40 * MIB, now=0.0)
    m.freed(1.0)
    assert not m.trim_due(now=2.0)  # at rest (the baseline): nothing to hand back
    late = 1.0 + quotas.TRIM_AFTER_CUT_S + 1
    m.over_ceiling(40 * MIB + quotas.INBOUND_SCAN_STEP, now=late)
    assert not m.trim_due(now=late)  # held, but nothing cut or closed lately, and under the ceiling
    m.freed(100.0)
    due = [100 + t / 100 for t in range(0, int(quotas.TRIM_AFTER_CUT_S * 100) + 200) if m.trim_due(100 + t / 100)]
    # every settling time within TRIM_AFTER_CUT_S of the cut, then no more
    assert due[0] == 100.0 + quotas.TRIM_EVERY_S and due[-1] < 100.0 + quotas.TRIM_AFTER_CUT_S
    assert len(due) == round(quotas.TRIM_AFTER_CUT_S / quotas.TRIM_EVERY_S) - 1
    assert all(b - a >= quotas.TRIM_EVERY_S - 1e-9 for a, b in zip(due, due[1:]))


def test_past_the_ceiling_an_ipc_connection_sending_while_nothing_reaches_the_kernel_is_cut():
    # A unix socket has no count of bytes received: past half the ceiling each look samples every
    # ipc connection's receive queue; one the kernel read nothing from while it was seen sending
    # (an unfinished message) is the holder when no tcp connection holds unread bytes.
    m = InboundMeters(in_bytes=24 * MIB, total_bytes=96 * MIB, rss_ceiling=64 * MIB)
    worker, idle, bad = (m.meter(fd=fd, ino=fd * 10, unix=True) for fd in (5, 6, 7))
    m.over_ceiling(40 * MIB, now=0.0)
    m.over_ceiling(40 * MIB + 32 * MIB, now=0.1)  # half the ceiling: a window opens
    assert m.window and m.epoch == 1
    for n in range(20):
        worker.received += 40  # a heartbeat read each time: it completes messages
        m.sample_unix(worker, worker.received, 200_000)
        m.sample_unix(idle, idle.received, 0)
        m.sample_unix(bad, bad.received, 150_000)  # sending, nothing read
    assert m.over_ceiling(40 * MIB + 65 * MIB, now=0.2)
    assert m.holder(now=0.2) is None  # no tcp connection holds anything
    assert m.holder_unix(now=0.2) == 7
    m.cut(bad, quotas.IN_RSS)
    # Nothing left with evidence: counted, nothing cut.
    assert m.over_ceiling(40 * MIB + 65 * MIB, now=1.0) and m.holder_unix(now=1.0) is None
    assert worker.queued == 0 and idle.queued == 0 and bad.queued == 19 * 150_000
    assert m.stats()["rss_ceiling_nothing_to_cut"] == 1
    # A new window forgets the old evidence.
    m.over_ceiling(40 * MIB, now=2.0)
    m.over_ceiling(40 * MIB + 40 * MIB, now=2.1)
    assert m.epoch == 2 and m.over_ceiling(40 * MIB + 65 * MIB, now=2.2)
    assert m.holder_unix(now=2.2) is None
    m.check_invariants()
