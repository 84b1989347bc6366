"""A short fixed-seed soak (bench/soak.py): hostile peers, SIGKILL/SIGSTOP of services and of the
kernel; no peer-caused abort, every honest request answered, bounded RSS, spent amounts equal to
a replay after every kernel restart.  (The p99 ratio is reported by the benchmark, not asserted:
no timed assertions in tests.)"""

from __future__ import annotations

import pytest

from bench import soak

pytestmark = pytest.mark.system


def test_short_fixed_seed_soak():
    result = soak.run(minutes=0.3, seed=7)
    m = result.metrics
    assert m["peer_caused_aborts"] == 0
    assert m["honest_unanswered"] == 0 and m["honest_requests"] > 1000
    assert m["kernel_rss_max_mb"] <= 300
    assert m["replay_mismatches"] == 0
    assert m["state_lost_after_restart"] == 0 and m["deep_frames_unanswered"] == 0 and m["fsck_status"] == 0
