"""Per-service log files (kernel.supervisor.ChildLog): rotation by size, the last line as the exit
reason, and what status says about an exit."""

from __future__ import annotations

import os
import signal

from clients.logs import Follower, log_files, tail
from kernel.supervisor import ChildLog, exit_reason
from tests.support import short_tmpdir


def test_child_log_rotates_and_keeps_the_last_line():
    d = short_tmpdir()
    log = ChildLog(d, "svc#0", max_bytes=100, backups=2)
    follower_start = None
    for i in range(30):
        log.write(f"line {i:02d} of the service's output\n".encode())
        if i == 0:
            follower_start = Follower(log.path, from_start=True)
    log.write(b"Traceback ...\nValueError: no such model file m.bin\n")
    assert log.last_line() == "ValueError: no such model file m.bin"
    names = sorted(os.listdir(d))
    assert names == ["svc#0.log", "svc#0.log.1", "svc#0.log.2"]  # older files beyond 2 are gone
    assert all(os.path.getsize(os.path.join(d, n)) < 100 + 40 for n in names)
    log.write(b"partial line without newline")
    assert log.last_line() == "partial line without newline"
    log.close()
    assert tail(log.path, 1) == ["partial line without newline"]
    assert log_files(d, "svc") == {"svc#0": log.path}
    lines = follower_start.read()  # followed across the rotations: it reads on into the newest file
    assert lines[0] == "line 00 of the service's output" and lines
    follower_start.close()


def test_exit_reasons_name_the_signal_or_the_last_line():
    assert exit_reason(1, "boom") == "exit 1: boom"
    assert exit_reason(0, "bye") == "exit 0"
    assert exit_reason(-signal.SIGKILL, "x") == "killed by SIGKILL: x"
    assert exit_reason(3, "y" * 1000).startswith("exit 3: yyy") and len(exit_reason(3, "y" * 1000)) == 300
