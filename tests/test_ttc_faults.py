"""The fault-injection harness in CI: a fixed list of seeded schedules, each with one SIGKILL of the
ttc service, the running tool worker, the client process or the kernel itself (plus control
schedules with no kill), at a random point of the prepare / commit / abort / attach sequence.
After each schedule the independent checker (log + process table) and the restarted client count
orphaned heavy runs, lost committed results, results delivered twice, calls stuck undecided and
tools run to completion twice: all must be 0.  The long run is ``python -m bench ttc_faults``."""

from __future__ import annotations

import shutil

import pytest

from bench.ttc_faults import TARGETS, make_schedule, run_schedules
from tests.support import short_tmpdir

pytestmark = pytest.mark.system

SEEDS = (11, 12)
#: Schedules per seed: every target four times, in rotation.
PER_SEED = 2 * len(TARGETS)


def test_schedules_are_reproducible_and_cover_every_target():
    assert make_schedule(11, 3) == make_schedule(11, 3)
    assert make_schedule(11, 3) != make_schedule(12, 3)
    seen = {make_schedule(7, i)["target"] for i in range(200)}
    assert seen == set(TARGETS)
    s = make_schedule(7, 5, "kernel")
    assert s["target"] == "kernel" and 0 <= s["kill_at"] < len(s["ops"])
    assert [op for op, _ in s["ops"][:len(s["calls"])]] == ["prepare"] * len(s["calls"])


@pytest.mark.parametrize("seed", SEEDS)
def test_seeded_kill_schedules_leave_no_orphan_no_lost_no_double_no_stuck(seed):
    workdir = short_tmpdir("ttcf-")
    try:
        out = run_schedules(PER_SEED, seed, workdir, list(TARGETS))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    counts = out["counts"]
    for key in ("orphaned_runs", "lost", "twice", "stuck", "completed_twice", "withdraw_kept_wrong_state"):
        assert counts[key] == 0, (key, dict(counts))
    assert not [k for k in counts if k.startswith("prepare_error") or k == "idem_broken"], dict(counts)
    # the faults really happened: every ttc, client and kernel kill landed and was recovered from;
    # a tool kill waits for the run a commit starts (these seeds' tool schedules all commit), and
    # lands unless that run finished in the instant before the signal
    for target in ("ttc", "client", "kernel"):
        assert out["kills"][target] == 2 and len(out["recovery"][target]) == 2, (target, out)
    assert out["kills"]["tool"] + out["tool_kills_late"] == 2 and out["kills"]["tool"] >= 1, out
    assert len(out["recovery"]["tool"]) == out["kills"]["tool"], out
    assert out["kernel_starts"] == 3
    assert all(0 <= r < 30 for v in out["recovery"].values() for r in v)
