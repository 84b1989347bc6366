"""System tests of ``scch`` through a real kernel, with both backends: SQLite (WAL, a file) and
Redis (a real ``redis-server`` on a private unix socket, killed mid-run)."""

from __future__ import annotations

import shutil
import uuid

import pytest
import sympy as sp
import zmq

from clients import Client
from kernel import errors
from kernel import protocol as P
from services.scch.redis_local import RedisServer
from tests.support import KernelProcess, service_block, short_tmpdir

pytestmark = pytest.mark.system

WAIT = 60.0
NAMES = ("scch", "scch_redis")


@pytest.fixture(scope="module")
def env():
    d = short_tmpdir("reca-scch-")
    redis = RedisServer(d).start()
    services = (service_block("scch", "services.scch", args=["--db", f"{d}/scch.db"])
                + service_block("scch_redis", "services.scch",
                                args=["--name", "scch_redis", "--backend", "redis", "--redis-url", redis.url]))
    k = KernelProcess(services, heartbeat=0.2, liveness=10)
    try:
        with Client(k.endpoint, timeout=10, retries=0, context=zmq.Context.instance()) as c:
            for name in NAMES:
                c.wait_for_service(name, WAIT)
        yield k, redis, d
    finally:
        k.stop()
        redis.stop()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def client(env):
    c = Client(env[0].endpoint, timeout=30, retries=0, context=zmq.Context.instance())
    yield c
    c.close()


def new_job(c: Client) -> str:
    job = f"t-{uuid.uuid4().hex[:8]}"
    c.open_job(job, {})
    return job


@pytest.mark.parametrize("service", NAMES)
def test_miss_is_charged_hit_is_free_and_translated(client, service):
    job = new_job(client)
    miss = client.call(service, {"op": "solve", "subgoal": {"kind": "integrate", "expr": "k*x**2*exp(x)", "var": "x"}},
                       job=job)
    assert miss["hit"] is False, miss
    assert miss["admission"]["admitted"], miss["admission"]
    spent = client.call(P.MMI_JOB_STATS, {"job": job})["spent"]
    assert spent["solver_calls"] == 1
    hit = client.call(service, {"op": "solve", "subgoal": {"kind": "integrate", "var": "t",
                                                          "expr": "exp(2*t - 1)*(2*t - 1)**2*m"}}, job=job)
    assert hit["hit"] is True
    assert client.call(P.MMI_JOB_STATS, {"job": job})["spent"]["solver_calls"] == 1  # the hit cost nothing
    t, m = sp.symbols("t m")
    answer = sp.sympify(hit["answer"], locals={"t": t, "m": m})
    assert sp.simplify(sp.diff(answer, t) - m * (2 * t - 1) ** 2 * sp.exp(2 * t - 1)) == 0
    stats = client.call(service, {"op": "stats"})
    assert stats["hits"] >= 1 and stats["backend"] == ("redis" if service == "scch_redis" else "sqlite")


@pytest.mark.parametrize("service", NAMES)
@pytest.mark.parametrize("payload, kind", [
    ({"op": "get", "subgoal": {"kind": "integrate", "expr": "__import__('os')"}}, "ParseError"),
    ({"op": "get", "subgoal": {"kind": "simplify", "expr": "(a+b+c+d+e+f)**60"}}, "TooLarge"),
    ({"op": "put", "subgoal": {"kind": "integrate", "expr": "cos(x)"}, "answer": "cos(x)"}, "VerifierRejected"),
    ({"op": "put", "subgoal": {"kind": "solve", "expr": "x**2 = 9"}, "answer": ["3"]}, "VerifierRejected"),
    ({"op": "get", "subgoal": "x"}, "ParseError"),
])
def test_bad_input_is_typed_and_the_service_keeps_serving(client, service, payload, kind):
    with pytest.raises(errors.BadRequest) as info:
        client.call(service, payload)
    assert info.value.detail.get("kind") == kind
    assert client.call(service, {"op": "get", "subgoal": {"kind": "simplify", "expr": "a + a"}})["hit"] in (True, False)


def test_put_then_get_across_renaming(client):
    for service in NAMES:
        put = client.call(service, {"op": "put", "subgoal": {"kind": "solve", "expr": "p**2*x**2 = 4", "var": "x"},
                                    "answer": ["2/p", "-2/p"]})
        assert put["admitted"]
        got = client.call(service, {"op": "get", "subgoal": {"kind": "solve", "expr": "4 = q**2*z**2", "var": "z"}})
        assert got["hit"] and sorted(got["answer"]) == sorted(["2/q", "-2/q"])


def test_solver_time_bound_kills_a_runaway_call(client):
    job = f"t-{uuid.uuid4().hex[:8]}"
    client.open_job(job, {"wall_ms": 60_000})
    with pytest.raises((errors.BadRequest, errors.BudgetExceeded)):
        client.call("scch", {"op": "solve", "subgoal": {"kind": "integrate", "expr": "exp(x**3)*sin(x)**2/log(x)**2"}},
                    job=job, budget={"wall_ms": 1500})
    assert client.call("scch", {"op": "stats"})["gets"] >= 1  # still serving


def test_redis_lost_mid_run_is_typed_and_solve_falls_back(env, client):
    _, redis, d = env
    sg = {"kind": "integrate", "expr": "sin(3*x)*x", "var": "x"}
    client.call("scch_redis", {"op": "solve", "subgoal": sg})
    redis.kill()
    with pytest.raises(errors.Unavailable) as info:
        client.call("scch_redis", {"op": "get", "subgoal": sg})
    assert info.value.detail.get("kind") == "BackendUnavailable"
    out = client.call("scch_redis", {"op": "solve", "subgoal": sg})
    assert out["cache"] == "bypassed" and out["hit"] is False
    assert "backend_error" in client.call("scch_redis", {"op": "stats"})
    fresh = RedisServer(d).start()  # the server comes back (empty): the cache serves again
    env_redis = fresh
    try:
        assert client.call("scch_redis", {"op": "get", "subgoal": sg})["hit"] is False
        client.call("scch_redis", {"op": "solve", "subgoal": sg})
        assert client.call("scch_redis", {"op": "get", "subgoal": sg})["hit"] is True
    finally:
        env_redis.stop()
