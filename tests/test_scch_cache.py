"""Unit tests of the subgoal cache's logic (:mod:`services.scch.logic`) over both real backends
(SQLite in WAL mode on a file, and Redis against a real ``redis-server``), with a fake clock."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import sympy as sp

from reason.errors import VerifierRejected
from reason.solve import timed_compute
from services.scch.logic import SubgoalCache, bump, score_at
from services.scch.store import BackendUnavailable, Entry, open_backend
from services.scch.redis_local import RedisServer
from tests.support import short_tmpdir


@pytest.fixture(scope="module")
def redis_server():
    d = short_tmpdir("reca-redis-")
    server = RedisServer(d).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=["sqlite", "redis"])
def backend(request, tmp_path):
    if request.param == "sqlite":
        b = open_backend("sqlite", path=str(tmp_path / "scch.db"))
    else:
        server = request.getfixturevalue("redis_server")
        b = open_backend("redis", url=server.url, prefix=f"t{os.urandom(4).hex()}:")
    yield b
    b.close()


def q(expr: str, var: str = "x", kind: str = "integrate") -> dict:
    return {"kind": kind, "expr": expr, "var": var}


def test_scores_decay_by_half_life():
    z = bump(None, 0.0, 10.0)
    assert score_at(z, 0.0, 10.0) == pytest.approx(1.0)
    assert score_at(z, 10.0, 10.0) == pytest.approx(0.5)
    z2 = bump(z, 10.0, 10.0)
    assert score_at(z2, 10.0, 10.0) == pytest.approx(1.5)


def test_hit_after_renaming_and_affine_substitution(backend):
    cache = SubgoalCache(backend, capacity=10, half_life=100.0, seed=1)
    first = cache.solve(q("t*exp(t)", "t"), 0.0, timed_compute)
    assert not first["hit"]
    second = cache.solve(q("(3*s + 1)*exp(3*s + 1)", "s"), 1.0, timed_compute)
    assert second["hit"] and second["cpu_s"] == 0.0
    s = sp.Symbol("s")
    answer = sp.sympify(second["answer"], locals={"s": s})
    assert sp.simplify(sp.diff(answer, s) - (3 * s + 1) * sp.exp(3 * s + 1)) == 0
    assert cache.counts.hits == 1 and cache.counts.misses == 1


def test_eviction_takes_the_least_recently_reused(backend):
    cache = SubgoalCache(backend, capacity=2, half_life=10.0, seed=1)
    cache.solve(q("x"), 0.0, timed_compute)
    cache.solve(q("x**2"), 1.0, timed_compute)
    for t in (2.0, 3.0, 4.0):  # x**2 is reused; x is not
        assert cache.solve(q("y**2", "y"), t, timed_compute)["hit"]
    cache.get(q("x**3"), 50.0)  # observed, so it may compete for a place
    out = cache.solve(q("x**3"), 50.0, timed_compute)
    assert out["admission"]["admitted"] and out["admission"]["evicted"] is not None
    assert not cache.get(q("z", "z"), 51.0)[2]  # x was evicted
    assert cache.get(q("z**2", "z"), 51.0)[2] is not None


def test_admission_needs_observations(backend):
    cache = SubgoalCache(backend, capacity=10, half_life=100.0, admit_min=1.5, seed=1)
    out = cache.solve(q("exp(x)"), 0.0, timed_compute)
    assert out["admission"] == {"key": out["key"], "admitted": False, "how": out["how"], "reason": "observed too rarely"}
    out = cache.solve(q("exp(w)", "w"), 1.0, timed_compute)  # the key's second observation
    assert out["admission"]["admitted"]
    assert cache.solve(q("exp(v)", "v"), 2.0, timed_compute)["hit"]


def test_put_verifies_and_refuses_wrong_artifacts(backend):
    cache = SubgoalCache(backend, capacity=10, half_life=100.0, seed=1)
    cache.get(q("cos(k*x)"), 0.0)
    with pytest.raises(VerifierRejected):
        cache.put(q("cos(k*x)"), "sin(k*x)", 0.0)
    assert backend.count() == 0
    assert cache.put(q("cos(k*x)"), "sin(k*x)/k", 0.0)["admitted"]
    _, answer, entry = cache.get(q("cos(m*t)", "t"), 1.0)
    assert entry is not None
    assert sp.simplify(sp.sympify(answer["answer"]) - sp.sin(sp.Symbol("m") * sp.Symbol("t")) / sp.Symbol("m")) == 0


def test_tampered_entry_is_rejected_not_served(backend):
    cache = SubgoalCache(backend, capacity=10, half_life=100.0, seed=1)
    key = cache.solve(q("x*sin(x)"), 0.0, timed_compute)["key"]
    good = backend.load(key)
    # a wrong artifact with a valid digest (as if a buggy writer had stored it): the quick check
    # at random points rejects it
    wrong = Entry(key, good.kind, json.dumps("x**2"), good.verifier, good.how, good.z, good.hits).sealed()
    backend.store(wrong)
    assert cache.get(q("t*sin(t)", "t"), 1.0)[1] is None
    assert cache.counts.rejected == 1 and backend.load(key) is None
    # a right artifact whose digest does not match its content is not served either
    cache.solve(q("x*sin(x)"), 2.0, timed_compute)
    e = backend.load(key)
    backend.store(Entry(e.key, e.kind, e.artifact, e.verifier, e.how, e.z, e.hits, digest="0" * 32))
    assert cache.get(q("x*sin(x)"), 3.0)[1] is None
    assert cache.counts.rejected == 2


def test_lost_redis_is_a_typed_error_and_nothing_is_corrupted(tmp_path):
    d = short_tmpdir("reca-redis-")
    server = RedisServer(d).start()
    try:
        backend = open_backend("redis", url=server.url)
        cache = SubgoalCache(backend, capacity=10, half_life=100.0, seed=1)
        cache.solve(q("exp(2*x)"), 0.0, timed_compute)
        server.kill()
        with pytest.raises(BackendUnavailable):
            cache.get(q("exp(2*y)", "y"), 1.0)
        server = RedisServer(d).start()  # a fresh, empty server on the same socket
        _, answer, entry = cache.get(q("exp(2*y)", "y"), 2.0)
        assert entry is None and answer is None  # a miss, not an error, not a wrong answer
        backend.close()
    finally:
        server.stop()
        shutil.rmtree(d, ignore_errors=True)


def test_get_score_writes_are_buffered_and_written_before_admission(backend):
    cache = SubgoalCache(backend, capacity=10, half_life=100.0, admit_min=1.5, seed=1)
    sg = q("x*exp(x)")
    cn, served, _ = cache.get(sg, 0.0)
    assert served is None and backend.observed(cn.key) is None  # buffered, not written yet
    cache.get(q("w*exp(w)", "w"), 0.5)  # the same key, observed again
    answer, _ = timed_compute(cn.kind, cn.form)
    # admission writes the buffered observations first: 2 observations, above admit_min
    assert cache.admit(cn, answer, 0.5)["admitted"]
    for i in range(3):
        assert cache.get(sg, 0.6 + 0.1 * i)[1] is not None
    assert backend.load(cn.key).hits == 0
    cache.flush()
    entry = backend.load(cn.key)
    assert entry.hits == 3 and score_at(entry.z, 0.8, 100.0) == pytest.approx(5.0, rel=0.02)  # 2 observations + 3 hits
    # time flushes too: a get FLUSH_SECONDS later writes what was buffered before it
    other = cache.get(q("sin(x)"), 1.0)[0]
    assert backend.observed(other.key) is None
    cache.get(q("cos(x)"), 3.0)
    assert backend.observed(other.key) is not None


def test_hit_check_runs_once_per_proved_artifact_and_on_every_hit_of_a_points_one(backend, monkeypatch):
    from reason.check import QuickCheck

    calls = []
    real = QuickCheck.check

    def counted(self, *a, **k):  # the real check, counted
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(QuickCheck, "check", counted)
    cache = SubgoalCache(backend, capacity=10, half_life=100.0, seed=1)
    out = cache.solve(q("x*cos(x)"), 0.0, timed_compute)
    assert out["how"].startswith("proved")
    assert cache.get(q("t*cos(t)", "t"), 1.0)[1] is not None  # first hit: checked
    calls.clear()
    for t in (2.0, 3.0):
        assert cache.get(q("t*cos(t)", "t"), t)[1] is not None
    assert calls == []  # the same content, proved symbolically: not re-sampled
    e = backend.load(out["key"])
    backend.store(Entry(e.key, e.kind, e.artifact, e.verifier, "points", e.z, e.hits).sealed())
    assert cache.get(q("t*cos(t)", "t"), 4.0)[1] is not None
    calls.clear()
    for t in (5.0, 6.0):
        assert cache.get(q("t*cos(t)", "t"), t)[1] is not None
    assert len(calls) == 2  # verified at points only: fresh points on every hit
    # new content under the same key (a buggy writer, digest resealed) is checked again
    backend.store(Entry(e.key, e.kind, json.dumps("x**2"), e.verifier, e.how, e.z, e.hits).sealed())
    assert cache.get(q("x*cos(x)"), 7.0)[1] is None and backend.load(out["key"]) is None
