"""Pure parts of issue 24's bounds: rate quotas whose excess is a counter, and which control
topics a principal may subscribe to."""

from __future__ import annotations

from kernel.auth import LOCAL_OPERATOR, Principal
from kernel.control import may_subscribe
from kernel.quotas import RateQuota


def test_a_rate_quota_turns_the_excess_into_one_number():
    q = RateQuota(60, burst=3)  # one per second
    assert [q.take("m", 0.0)[0] for _ in range(10)] == [True] * 3 + [False] * 7
    assert q.pending("m") == 7 and q.take("a", 0.0) == (True, 0)  # another key is not affected
    assert q.take("m", 0.5) == (False, 0)
    assert q.take("m", 1.5) == (True, 8)  # the next record carries the count, once
    assert q.take("m", 10.0) == (True, 0)
    big = RateQuota(1024, burst=1024)  # bytes per minute
    assert big.take("s", 0.0, cost=1000)[0] and not big.take("s", 0.0, cost=100)[0]


def test_rate_quota_keys_are_bounded():
    q = RateQuota(1, burst=1, max_keys=100)
    for n in range(1000):
        q.take(f"p{n}", 0.0)
    assert len(q._buckets) == 100


def test_control_subscriptions_by_authority():
    ttc = Principal("child:ttc", "service:ttc")
    alice = Principal("alice", "client")
    assert may_subscribe(ttc, b"ctl/ttc/") and may_subscribe(ttc, b"ctl/ttc/preempt")
    assert may_subscribe(ttc, b"ctl/ttc@2/") and may_subscribe(ttc, b"ctl/all/")
    for foreign in (b"", b"ctl/", b"ctl/t", b"ctl/ttc", b"ctl/decode/", b"ctl/ttcx/"):
        assert not may_subscribe(ttc, foreign), foreign
    assert not any(may_subscribe(alice, t) for t in (b"", b"ctl/", b"ctl/all/", b"ctl/ttc/"))
    assert may_subscribe(LOCAL_OPERATOR, b"") and may_subscribe(Principal("op", "operator"), b"ctl/")
