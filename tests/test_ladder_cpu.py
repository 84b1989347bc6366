"""The ladder's CPU trigger and its policy for workers a kill would hurt (issue 23): the pure
state machine with a fake clock and fake CPU readings (kernel/ladder.py).

* a worker holding an answered request but burning nothing is not frozen (an exclusive one is
  killed when a burning one would be: its slot comes back);
* a spinning one is frozen at the grace; a service's declared grace is CPU time;
* a spared worker (its service keeps state; or it serves live requests) is throttled -- frozen,
  thawed, frozen again -- instead of killed, and killed only past the CPU or hold ceiling;
* the CPU a tombstone burns is attributed to it (split over the requests in its worker's slots)
  and billed."""

from __future__ import annotations

import pytest

from kernel.ladder import Held, Ladder

A, B = b"tok-a", b"tok-b"
W1 = b"w1"


def _rungs(acts):
    return [(a.rung, a.why) for a in acts]


def test_an_idle_waiting_tombstone_is_not_frozen_and_an_exclusive_one_is_killed_at_the_kill_point():
    lad = Ladder(0.02, 1.0, 0.1)
    held = [Held(A, 10, W1)]
    assert lad.observe(held, {W1}, 0.0, {10: 5.0}) == []
    for now in (0.02, 0.1, 0.5, 1.0):  # the group's CPU does not move: it waits, nothing to stop
        assert lad.observe(held, {W1}, now, {10: 5.0 + 1e-5}) == []
    assert lad.counts["frozen"] == 0
    assert _rungs(lad.observe(held, {W1}, 1.12, {10: 5.0 + 1e-5})) == [("kill", "idle")]
    assert lad.tracks == {}


def test_a_spinning_tombstone_is_frozen_at_the_grace():
    lad = Ladder(0.02, 1.0, 0.1)
    held = [Held(A, 10, W1)]
    lad.observe(held, {W1}, 0.0, {10: 5.0})
    assert lad.observe(held, {W1}, 0.01, {10: 5.01}) == []  # burning, inside the grace
    acts = lad.observe(held, {W1}, 0.02, {10: 5.02})
    assert _rungs(acts) == [("freeze", "burning")]
    assert acts[0].burnt_s == pytest.approx(0.02)


def test_a_tombstone_that_starts_burning_late_is_frozen_then():
    lad = Ladder(0.02, 1.0, 0.1)
    held = [Held(A, 10, W1)]
    lad.observe(held, {W1}, 0.0, {10: 1.0})
    assert lad.observe(held, {W1}, 0.5, {10: 1.0}) == []
    assert _rungs(lad.observe(held, {W1}, 0.6, {10: 1.05})) == [("freeze", "burning")]


def test_the_declared_grace_is_cpu_time():
    # decode declares 2 s: a beam burning 1.5 s of CPU past the answer is never frozen, however
    # long in wall time a busy machine makes it
    lad = Ladder(0.02, 1.0, 0.1)
    held = [Held(A, 10, W1, grace=2.0, keeps=True)]
    lad.observe(held, {W1}, 0.0, {10: 0.0})
    assert lad.observe(held, {W1}, 30.0 - 1e-3, {10: 1.5}) == []
    assert _rungs(lad.observe(held, {W1}, 30.0 - 1e-3, {10: 2.01})) == [("freeze", "burning")]


def test_a_worker_that_keeps_state_is_throttled_not_killed_and_answers():
    lad = Ladder(0.02, 1.0, 0.1, cpu_ceiling=5.0)
    held = [Held(A, 10, W1, keeps=True)]
    cpu = 0.0
    lad.observe(held, {W1}, 0.0, {10: cpu})
    assert _rungs(lad.observe(held, {W1}, 0.02, {10: 0.02})) == [("freeze", "burning")]
    assert _rungs(lad.observe(held, {W1}, 1.02, {10: 0.02})) == [("thaw", "answer window")]
    # its answer window passes and it is still burning: frozen again, not killed (its state lives)
    assert _rungs(lad.observe(held, {W1}, 1.12, {10: 0.12})) == [("freeze", "burning")]
    assert _rungs(lad.observe(held, {W1}, 2.12, {10: 0.12})) == [("thaw", "answer window")]
    assert lad.observe([], {W1}, 2.15, {10: 0.15}) == []  # its late FINAL came
    assert lad.counts == {"frozen": 2, "thawed": 2, "killed": 0, "answered": 1}
    ((token, burnt, billed),) = lad.ended
    assert token == A and burnt == pytest.approx(0.15) and billed == 0.0  # up to its FINAL


def test_a_worker_that_keeps_state_is_killed_past_the_cpu_ceiling():
    lad = Ladder(0.02, 1.0, 0.1, cpu_ceiling=0.3)
    held = [Held(A, 10, W1, keeps=True)]
    lad.observe(held, {W1}, 0.0, {10: 0.0})
    assert _rungs(lad.observe(held, {W1}, 0.02, {10: 0.02})) == [("freeze", "burning")]
    now, cpu, rungs = 0.02, 0.02, []
    while lad.tracks and now < 100:
        now += 0.01
        frozen = next(iter(lad.tracks.values())).rung == "frozen"
        cpu += 0.0 if frozen else 0.01  # it burns only while thawed
        rungs += _rungs(lad.observe(held, {W1}, now, {10: cpu}))
    assert rungs[-1] == ("kill", "cpu ceiling")
    assert ("kill", "answer window") not in rungs
    assert lad.ended[0][1] == pytest.approx(0.3, abs=0.011)
    # throttled in between: about answer_grace / (kill_grace + answer_grace) of a CPU
    assert now > 2.0


def test_the_cpu_ceiling_is_at_least_twice_the_declared_grace():
    lad = Ladder(0.02, 1.0, 0.1, cpu_ceiling=0.3)
    held = [Held(A, 10, W1, grace=2.0, shared=True, slots=2)]
    lad.observe(held, {W1}, 0.0, {10: 0.0})
    assert lad.observe(held, {W1}, 1.0, {10: 3.9 * 2}) == []  # 2 slots: half of it is the tombstone's
    assert _rungs(lad.observe(held, {W1}, 1.1, {10: 4.1 * 2})) == [("kill", "cpu ceiling")]


def test_a_worker_serving_live_requests_is_never_frozen_and_gets_its_share_of_the_cpu():
    lad = Ladder(0.02, 1.0, 0.1, cpu_ceiling=1.0)
    held = [Held(A, 10, W1, shared=True, slots=4)]  # one tombstone, three live requests
    lad.observe(held, {W1}, 0.0, {10: 0.0})
    assert lad.observe(held, {W1}, 1.0, {10: 2.0}) == []
    assert lad.tracks[A].burnt == pytest.approx(0.5)  # a quarter of the group's 2 s
    assert lad.counts["frozen"] == 0
    assert _rungs(lad.observe(held, {W1}, 2.0, {10: 4.0})) == [("kill", "cpu ceiling")]


def test_an_idle_tombstone_on_a_spared_worker_is_killed_only_past_the_hold_ceiling():
    lad = Ladder(0.02, 1.0, 0.1, hold_ceiling=30.0)
    held = [Held(A, 10, W1, keeps=True)]
    lad.observe(held, {W1}, 0.0, {10: 1.0})
    assert lad.observe(held, {W1}, 29.9, {10: 1.0}) == []
    assert _rungs(lad.observe(held, {W1}, 30.0, {10: 1.0})) == [("kill", "hold ceiling")]


def test_tombstones_of_one_process_move_together_and_split_its_cpu():
    lad = Ladder(0.02, 1.0, 0.1)
    lad.observe([Held(A, 10, W1, slots=2)], {W1}, 0.0, {10: 0.0})
    both = [Held(A, 10, W1, slots=2), Held(B, 10, W1, slots=2)]
    lad.observe(both, {W1}, 0.005, {10: 0.004})
    lad.observe(both, {W1}, 0.01, {10: 0.014})
    # A alone first (a quarter... half: 2 slots), then both: B gets nothing of what burnt before its answer
    assert lad.tracks[A].burnt == pytest.approx(0.007) and lad.tracks[B].burnt == pytest.approx(0.005)
    acts = lad.observe(both, {W1}, 0.02, {10: 0.024})
    assert _rungs(acts) == [("freeze", "burning")]  # one freeze of the process
    assert {t.rung for t in lad.tracks.values()} == {"frozen"}


def test_burnt_cpu_is_billed_in_steps_and_at_the_end():
    lad = Ladder(10.0, 1.0, 0.1)  # a long grace: no rung in this test
    held = [Held(A, 10, W1)]
    lad.observe(held, {W1}, 0.0, {10: 0.0})
    lad.observe(held, {W1}, 0.1, {10: 0.03})
    assert lad.unbilled(0.05) == []
    lad.observe(held, {W1}, 0.2, {10: 0.07})
    assert lad.unbilled(0.05) == [(A, pytest.approx(0.07))]
    lad.observe(held, {W1}, 0.3, {10: 0.09})
    lad.observe([], {W1}, 0.4, {10: 0.09})
    ((token, burnt, billed),) = lad.ended
    assert token == A and burnt - billed == pytest.approx(0.02)


def test_a_worker_without_cpu_readings_is_judged_by_wall_time():
    lad = Ladder(0.02, 1.0, 0.1)
    lad.observe([Held(A, 10, W1), Held(B, 11, b"w2")], {W1, b"w2"}, 0.0, {11: 0.0})
    acts = lad.observe([Held(A, 10, W1), Held(B, 11, b"w2")], {W1, b"w2"}, 0.02, {11: 0.0})
    assert [(a.rung, a.pid) for a in acts] == [("freeze", 10)]  # pid 10 has no reading; 11 is idle


def test_ceilings_must_be_positive():
    with pytest.raises(ValueError):
        Ladder(0.02, 1.0, cpu_ceiling=0)


def test_a_killed_workers_tombstones_are_not_tracked_again_until_it_is_dropped():
    lad = Ladder(0.02, 1.0, 0.1)
    held = [Held(A, 10, W1)]
    lad.observe(held, {W1}, 0.0, {10: 0.0})
    assert _rungs(lad.observe(held, {W1}, 1.12, {10: 0.0})) == [("kill", "idle")]
    # the router lists the dead worker until its liveness runs out: nothing to act on
    assert lad.observe(held, {W1}, 1.2) == [] and lad.tracks == {}
    assert lad.observe(held, {W1}, 5.0) == []
    lad.observe([], set(), 6.0)  # dropped
    assert lad.killed == set()


def test_a_starved_worker_that_waits_for_a_cpu_counts_as_burning():
    # a busy machine gives the spinning worker 0.6 ms of CPU in its 20 ms grace, and it waited
    # runnable 18 ms: it wants the CPU, so it is frozen at the grace (by CPU alone: not until it got 2 ms)
    lad = Ladder(0.02, 1.0, 0.1)
    held = [Held(A, 10, W1)]
    lad.observe(held, {W1}, 0.0, {10: 1.0}, {10: 3.0})
    assert lad.observe(held, {W1}, 0.01, {10: 1.0003}, {10: 3.009}) == []  # inside the grace
    assert _rungs(lad.observe(held, {W1}, 0.02, {10: 1.0006}, {10: 3.018})) == [("freeze", "burning")]
    by_cpu = Ladder(0.02, 1.0, 0.1)
    by_cpu.observe(held, {W1}, 0.0, {10: 1.0})
    assert by_cpu.observe(held, {W1}, 0.02, {10: 1.0006}) == []


def test_an_idle_worker_whose_heartbeat_waits_long_on_a_busy_runqueue_is_not_burning():
    # waiting without getting CPU (a heartbeat's wake-up, 5 ms in the queue, 0.05 ms run) is not burning
    lad = Ladder(0.02, 1.0, 0.1)
    held = [Held(A, 10, W1)]
    lad.observe(held, {W1}, 0.0, {10: 1.0}, {10: 3.0})
    assert lad.observe(held, {W1}, 0.05, {10: 1.00005}, {10: 3.005}) == []
    assert lad.observe(held, {W1}, 0.5, {10: 1.0001}, {10: 3.010}) == []
    assert lad.counts["frozen"] == 0


def test_an_idle_worker_held_a_second_on_a_busy_machine_is_killed_idle_never_frozen():
    # load 16-20: over the second it holds the request, an idle worker's wake-ups got 0.9 ms of CPU
    # and waited 40 ms runnable -- past burn_min together, but a few percent of the time: not burning
    lad = Ladder(0.02, 1.0, 0.1)
    held = [Held(A, 10, W1)]
    lad.observe(held, {W1}, 0.0, {10: 1.0}, {10: 3.0})
    rungs = []
    for i in range(1, 61):  # every 20 ms past the idle kill (1.12 s)
        now = 0.02 * i
        rungs += _rungs(lad.observe(held, {W1}, now, {10: 1.0 + 0.0009 * now}, {10: 3.0 + 0.04 * now}))
    assert rungs == [("kill", "idle")]
    assert lad.counts["frozen"] == 0


def test_a_wait_count_that_drops_adds_nothing_and_the_declared_grace_stays_cpu():
    # a task that exits takes its runqueue wait with it: the group's sum drops, nothing is added
    lad = Ladder(0.02, 1.0, 0.1)
    held = [Held(A, 10, W1)]
    lad.observe(held, {W1}, 0.0, {10: 1.0}, {10: 3.0})
    assert lad.observe(held, {W1}, 0.02, {10: 1.001}, {10: 1.0}) == []
    assert lad.tracks[A].waited == 0.0
    # a declared grace (CPU the service may spend) is not shortened by time spent waiting
    lad = Ladder(0.02, 1.0, 0.1)
    held = [Held(A, 10, W1, grace=0.5)]
    lad.observe(held, {W1}, 0.0, {10: 0.0}, {10: 0.0})
    assert lad.observe(held, {W1}, 0.6, {10: 0.1}, {10: 0.5}) == []
    assert _rungs(lad.observe(held, {W1}, 0.7, {10: 0.5}, {10: 0.6})) == [("freeze", "burning")]
