"""The README's first command, ``python -m clients demo``, end to end: it starts ``python -m
kernel`` with the embedded default config, runs every section, stops the kernel and replays its
decision log; nothing it started is left running."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import psutil
import pytest

from tests.support import REPO

pytestmark = pytest.mark.system


def test_demo_runs_end_to_end_and_its_decision_log_replays():
    before = {p.pid for p in psutil.process_iter()}
    out = subprocess.run([sys.executable, "-m", "clients", "demo"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    with open(f"{REPO}/kernel/default.toml", "rb") as fh:
        config = tomllib.load(fh)
    processes = sum(s.get("replicas", 1) for s in config["service"])
    assert f"reca kernel ready ({processes} service process(es))" in text
    assert "kernel stopped (exit 0)" in text
    assert re.search(r"watch it live in a browser: http://127\.0\.0\.1:\d+/\?token=\S+", text), text[:3000]
    m = re.search(r"(\d+) ledger decisions replayed, (\d+) divergences; (\d+) other records", text)
    assert m is not None, text[-2000:]
    assert int(m.group(1)) > 100 and int(m.group(2)) == 0 and int(m.group(3)) > 0
    rundir = re.search(r"runtime (/\S+)\)", text).group(1)
    left = []
    for p in psutil.process_iter():
        if p.pid in before:
            continue
        try:
            if p.environ().get("RECA_RUNTIME_DIR") == rundir:
                left.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    assert not left, [p.pid for p in left]
