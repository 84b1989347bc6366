"""A kernel never starts silently from nothing over a log it cannot restore (issue 24): a real
``python -m kernel`` refuses with the file and the offset, ``--fresh`` moves the log aside, and
a torn tail is cut at start with a loud note."""

from __future__ import annotations

import os
import shutil

import pytest

from clients import Client
from clients.launch import KernelStartError, LocalKernel, kernel_config
from kernel.admission import BudgetAdmission
from kernel.decisions import DecisionLog
from kernel.logstore import iter_lines
from tests.support import short_tmpdir

pytestmark = pytest.mark.system


@pytest.fixture
def rt():
    d = short_tmpdir()
    runtime = os.path.join(d, "rt")
    os.mkdir(runtime, 0o700)
    yield runtime
    shutil.rmtree(d, ignore_errors=True)


def _log(runtime: str) -> str:
    path = os.path.join(runtime, "decisions.jsonl")
    log = DecisionLog(path, fsync="never")
    adm = BudgetAdmission(decision_log=log)
    for n in range(5):
        adm.decide("open", float(n), job=f"kept{n}", limits={"flops": 10.0})
    log.close()
    return path


def _kernel(runtime: str, *extra: str) -> LocalKernel:
    config = os.path.join(os.path.dirname(runtime), "reca.toml")
    with open(config, "w") as fh:
        fh.write(kernel_config(""))
    return LocalKernel(None, runtime_dir=runtime, extra_args=["--config", config, *extra])


def test_a_damaged_log_refuses_the_start_and_fresh_moves_it_aside(rt):
    path = _log(rt)
    data = open(path, "rb").read()
    starts = [off for off, _ in iter_lines(data)]
    bad = bytearray(data)
    bad[starts[2] + 3] ^= 0x20  # a decision with good ones after it
    with open(path, "wb") as fh:
        fh.write(bytes(bad))
    with pytest.raises(KernelStartError) as info:
        _kernel(rt).stop()
    msg = str(info.value)
    assert "refusing to start" in msg and f"{path} at byte {starts[2]}" in msg and "fsck" in msg
    assert open(path, "rb").read() == bytes(bad)  # untouched
    k = _kernel(rt, "--fresh")
    try:
        with Client(k.endpoint, timeout=10, retries=0) as c:
            assert not [j for j in c.stats()["jobs"] if str(j).startswith("kept")]
    finally:
        k.stop()
    aside = [d for d in os.listdir(rt) if d.startswith("decisions.jsonl.old-")]
    assert len(aside) == 1 and open(os.path.join(rt, aside[0], "decisions.jsonl"), "rb").read() == bytes(bad)


def test_a_torn_tail_is_cut_at_start_and_said_so(rt):
    path = _log(rt)
    with open(path, "ab") as fh:
        fh.write(b'{"seq":6,"op":"op')
    k = _kernel(rt)
    try:
        assert any("torn tail cut" in line for line in k.lines)
        with Client(k.endpoint, timeout=10, retries=0) as c:
            jobs = c.stats()["jobs"]
            assert all(f"kept{n}" in jobs for n in range(5))
    finally:
        k.stop()


def test_a_zeroed_young_log_refuses_the_start(rt):
    """Review F7: a one-segment log of NUL bytes (a crash left the size, not the blocks) used to be
    cut as a torn first record and the kernel started with nothing, saying nothing."""
    path = _log(rt)
    zeroed = b"\0" * os.path.getsize(path)
    with open(path, "wb") as fh:
        fh.write(zeroed)
    with pytest.raises(KernelStartError) as info:
        _kernel(rt).stop()
    msg = str(info.value)
    assert "refusing to start" in msg and f"{path} at byte 0" in msg and "fsck" in msg
    assert open(path, "rb").read() == zeroed  # untouched
