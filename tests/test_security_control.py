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
            c.open_job("ctl-a", {"flops": 1e9})  # an order must name an open job (not_found otherwise)
            c.open_job("ctl-b", {"flops": 1e9})
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not heard_own:
                c.call(P.MMI_PREEMPT, {"job": "ctl-a", "service": "echo"})
                heard_own = _heard(own, 200)
            assert heard_own and all(t.startswith(b"ctl/echo/") for t in heard_own)
            c.call(P.MMI_PREEMPT, {"job": "ctl-b", "service": "echo"})
            assert any(t.startswith(b"ctl/echo/") for t in _heard(op, 1000))
            assert _heard(evil, 1000) == [] and _heard(alice, 500) == []
            assert c.stats()["counters"].get("subscriptions_refused", 0) >= 2  # counted, and logged
    finally:
        ctx.destroy(linger=0)
