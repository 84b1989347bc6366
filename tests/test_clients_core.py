"""The clients' shared, socket-free parts: the one retry policy and the table printer."""

from __future__ import annotations

import itertools

import pytest

from clients.core import RetryPolicy
from clients.table import render
from kernel import codec, errors
from kernel import protocol as P


def test_every_attempt_has_a_fresh_id_and_the_same_idempotency_key():
    policy = RetryPolicy("echo", timeout=0.5, retries=2)
    attempts = list(policy.attempts(itertools.count(7), {"x": 1}, job="j", budget=None, priority=None,
                                    deadline_ms=None, idem=None, txn=None))
    assert [rid for rid, _ in attempts] == [7, 8, 9]
    headers = [codec.unpack(frames[3]) for _, frames in attempts]
    assert len({h[P.H_IDEM] for h in headers}) == 1 and all(h[P.H_JOB] == "j" for h in headers)
    assert all(frames[:3] == [P.MDPC, P.ClientCmd.REQUEST.value, b"echo"] for _, frames in attempts)
    assert codec.unpack(attempts[0][1][4]) == {"x": 1}


def test_a_silent_started_stream_is_a_timeout_and_a_silent_attempt_is_retried():
    policy = RetryPolicy("echo", timeout=0.5, retries=0)
    policy.went_silent(False)  # nothing heard: the caller retries
    with pytest.raises(errors.Timeout, match="went silent"):
        policy.went_silent(True)
    assert "1 attempt(s)" in policy.exhausted().message


def test_table_formats_floats_nones_maps_and_missing_cells():
    text = render([{"a": 1.23456, "b": None}, {"a": 2, "c": {"k": 0.5}}], digits=3)
    lines = text.splitlines()
    assert lines[0].split() == ["a", "b", "c"] and set(lines[1]) == {"-", " "}
    assert lines[2].split() == ["1.23", "-"] and lines[3].split() == ["2", "k=0.5"]
    assert render([]) == ""
