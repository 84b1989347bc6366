"""A short fixed-seed soak (bench/soak.py): hostile peers, SIGKILL/SIGSTOP of services and of the
kernel; no peer-caused abort, every honest request answered, bounded RSS, spent amounts equal to
a replay after every kernel restart.  (The p99 ratio is reported by the benchmark, not asserted:
no timed assertions in tests.)

It runs through the benchmark's command line and checks the document it writes as
tests/test_bench_quick.py does for every other benchmark, which therefore leaves ``soak`` out (one
soak per suite run instead of two: each starts a kernel, restarts it and runs hostile peers)."""

from __future__ import annotations

import json

import pytest

from bench import __main__ as bench_main
from bench._common import SCHEMA

pytestmark = pytest.mark.system


def test_short_fixed_seed_soak(tmp_path, capsys):
    out = tmp_path / "soak.json"
    rc = bench_main.main(["soak", "--runs", "1", "--minutes", "0.3", "--seed", "7", "--json", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, f"bench soak returned {rc}:\n{printed.out[-3000:]}\n{printed.err[-3000:]}"
    doc = json.loads(out.read_text())
    assert doc["schema"] == SCHEMA and doc["bench"] == "soak" and "error" not in doc
    assert all(k in doc["metrics"] for k in doc["targets"]), "every target names a reported metric"
    assert doc["env"]["commit"] is not None and doc["env"]["load_start"]
    m = doc["metrics"]
    assert m["peer_caused_aborts"] == 0
    assert m["honest_unanswered"] == 0 and m["honest_requests"] > 1000
    assert m["kernel_rss_max_mb"] <= 300
    assert m["replay_mismatches"] == 0
    assert m["state_lost_after_restart"] == 0 and m["deep_frames_unanswered"] == 0 and m["fsck_status"] == 0
