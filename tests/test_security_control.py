"""Control traffic by authority (issue 24): the kernel's control socket applies a subscription
only when the subscriber's principal may receive that topic.  A real ``python -m kernel`` over
tcp:// with CURVE: a service key hears its own service's orders, an operator any, and a foreign
subscription -- another service's topic, everything (the empty prefix), ``ctl/`` -- gets nothing."""

from __future__ import annotations

import os
import shutil
import textwrap
import time

import pytest
import zmq

from clients import Client
from kernel import auth, keys
from kernel import protocol as P
from tests.support import KernelProcess, service_block, short_tmpdir

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def kern():
    d = short_tmpdir()
    kd = os.path.join(d, "keys")
    for name, role in (("op", "operator"), ("alice", "client"), ("evil", "service:evil"), ("echo-svc", "service:echo")):
        keys.new(kd, name, role)
    config = textwrap.dedent(f"""
        [kernel]
        endpoint = "tcp://127.0.0.1:0"
        control = "tcp://127.0.0.1:0"
        heartbeat_s = 0.2
        liveness = 5
        [auth]
        keys = "{kd}"
    """) + service_block("echo", "services.echo")
    k = KernelProcess.from_config(config)
    k.keys = kd
    try:
        yield k
    finally:
        k.stop()
        shutil.rmtree(d, ignore_errors=True)


def _sub(kern, ctx, name: str, topics: list[bytes]) -> zmq.Socket:
    creds = auth.peer_credentials(os.path.join(kern.keys, f"{name}.key_secret"), os.path.join(kern.keys, "kernel.key"))
    s = auth.secure_socket(ctx, zmq.SUB, kern.control, creds)
    for t in topics:
        s.setsockopt(zmq.SUBSCRIBE, t)
    s.connect(kern.control)
    return s


def _heard(s: zmq.Socket, wait_ms: int) -> list[bytes]:
    got = []
    deadline = time.monotonic() + wait_ms / 1000
    while time.monotonic() < deadline:
        if s.poll(50):
            got.append(s.recv_multipart()[0])
    return got


def test_a_foreign_subscription_gets_nothing(kern):
    ctx = zmq.Context()
    try:
        own = _sub(kern, ctx, "echo-svc", [b"ctl/echo/"])
        op = _sub(kern, ctx, "op", [b""])
        evil = _sub(kern, ctx, "evil", [b"", b"ctl/", b"ctl/echo/", b"ctl/ech"])
        alice = _sub(kern, ctx, "alice", [b"", b"ctl/echo/", b"ctl/all/"])
        with Client(
            kern.endpoint,
            timeout=20,
            retries=0,
            context=ctx,
            cert=os.path.join(kern.keys, "op.key_secret"),
            server_cert=os.path.join(kern.keys, "kernel.key"),
        ) as c:
            c.wait_for_service("echo", 30)
            # Orders on ctl/echo/ until the subscribers that may hear them do (subscriptions
            # travel asynchronously; bounded).
            heard_own: list[bytes] = []
            # An order is published only while its target is in flight: control messages for echo.
            message = {"op": "fidelity", "service": "echo", "message": {"level": 1}}
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not heard_own:
                c.call(P.MMI_CONTROL, message)
                heard_own = _heard(own, 200)
            assert heard_own and all(t.startswith(b"ctl/echo/") for t in heard_own)
            c.call(P.MMI_CONTROL, message)
            assert any(t.startswith(b"ctl/echo/") for t in _heard(op, 1000))
            assert _heard(evil, 1000) == [] and _heard(alice, 500) == []
            assert c.stats()["counters"].get("subscriptions_refused", 0) >= 2  # counted, and logged
    finally:
        ctx.destroy(linger=0)


def _client(kern, ctx, name: str) -> Client:
    return Client(kern.endpoint, timeout=20, retries=0, context=ctx, cert=os.path.join(kern.keys, f"{name}.key_secret"),
                  server_cert=os.path.join(kern.keys, "kernel.key"))


def _frames(s: zmq.Socket, wait_ms: int) -> list[list[bytes]]:
    got = []
    deadline = time.monotonic() + wait_ms / 1000
    while time.monotonic() < deadline:
        if s.poll(50):
            got.append(s.recv_multipart())
    return got


def test_a_job_order_reaches_only_the_services_holding_its_requests(kern):
    """Review F5: a job order with no ``service`` was published on ``ctl/all/``, which every service
    key may read, so a foreign service heard other principals' job names.  Now it goes to the
    services holding the job's requests; ``ctl/all/`` carries operator broadcasts only."""
    job = "alice-acquisition-target"
    ctx = zmq.Context()
    try:
        own = _sub(kern, ctx, "echo-svc", [b"ctl/echo/"])
        evil = _sub(kern, ctx, "evil", [b"ctl/all/", b"ctl/evil/"])
        with _client(kern, ctx, "op") as op, _client(kern, ctx, "alice") as a, _client(kern, ctx, "alice") as ctl:
            op.wait_for_service("echo", 30)
            broadcast = {"op": "fidelity", "message": {"level": 1}}  # service "all"

            def evil_hears_a_broadcast() -> list[list[bytes]]:
                heard: list[list[bytes]] = []
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and not any(f[0] == b"ctl/all/fidelity" for f in heard):
                    op.call(P.MMI_CONTROL, broadcast)
                    heard += _frames(evil, 200)
                assert any(f[0] == b"ctl/all/fidelity" for f in heard), "evil's ctl/all/ subscription never applied"
                return heard

            heard_evil = evil_hears_a_broadcast()  # evil's subscription is live from here on
            a.open_job(job, {"flops": 1e12})
            run = a.stream("echo", {"report_token": True, "steps": 100000, "step_ms": 5}, job=job)
            next(run)  # the token partial: the request is at its worker
            heard_own: list[list[bytes]] = []
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not heard_own:
                assert ctl.call(P.MMI_PREEMPT, {"job": job}) == {"ok": True, "targets": 1}
                heard_own = _frames(own, 200)
            assert heard_own and {f[0] for f in heard_own} == {b"ctl/echo/preempt"}
            assert ctl.call(P.MMI_CANCEL, {"job": job}) == {"ok": True, "targets": 1}
            # PUB keeps order per subscriber: a broadcast evil hears after the orders proves it
            # would have heard them had they been published where it listens.
            heard_evil += evil_hears_a_broadcast()
            assert {f[0] for f in heard_evil} == {b"ctl/all/fidelity"}
            assert not any(job.encode() in b"".join(f) for f in heard_evil)
            for reply in run:  # the cancelled request ends (bounded by the client's timeout)
                if reply.final:
                    break
    finally:
        ctx.destroy(linger=0)


def test_a_closed_subscribers_unsubscriptions_leave_the_control_socket_working(kern):
    """CI failure of 2026-12-07: when a subscriber's connection closes, libzmq's XPUB makes that
    subscriber's unsubscriptions itself, with no metadata; reading ``ZMQ_SRCFD`` of such a message
    fails (EINVAL), and the kernel's inbound meter raised in the middle of its subscription loop:
    the next operator broadcast answered ``internal_error`` and later subscriptions were not applied.
    Now such a message credits nothing and the socket goes on applying subscriptions."""
    ctx = zmq.Context()
    try:
        with _client(kern, ctx, "op") as op:
            broadcast = {"op": "fidelity", "message": {"level": 1}}  # service "all"

            def hears(s: zmq.Socket) -> bool:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    assert op.call(P.MMI_CONTROL, broadcast) == {"ok": True}  # never internal_error
                    if any(f[0] == b"ctl/all/fidelity" for f in _frames(s, 200)):
                        return True
                return False

            for round_ in range(3):  # each round's subscriber closes, and libzmq unsubscribes it
                s = _sub(kern, ctx, "echo-svc", [b"ctl/all/", b"ctl/echo/"])
                assert hears(s), f"round {round_}: a new subscriber's subscription was never applied"
                s.close(linger=0)
        assert not [line for line in kern.lines if "Traceback" in line or "internal error" in line]
    finally:
        ctx.destroy(linger=0)
