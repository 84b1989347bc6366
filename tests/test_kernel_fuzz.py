"""Property-based fuzzing of a live kernel: random multipart messages (random frames, hostile
msgpack, MDP look-alikes) from random peers, after which a normal request still succeeds and
the kernel process is alive."""

from __future__ import annotations

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, example, given, settings, strategies as st

from clients import Client
from kernel import protocol as P
from tests.support import KernelProcess, service_block

pytestmark = pytest.mark.system

CMDS = [b"\x00", b"\x01", b"\x02", b"\x03", b"\x04", b"\x05", b"\x06", b"\x07", b"\xff"]


def hostile_msgpack() -> st.SearchStrategy[bytes]:
    deep = st.integers(1, 3000).map(lambda n: b"\x91" * n + b"\x00")  # nested arrays
    huge_len = st.sampled_from([b"\xdd\xff\xff\xff\xff", b"\xdb\x7f\xff\xff\xff", b"\xdf\xff\xff\xff\xff",
                                b"\xc6\xff\xff\xff\xff"])
    header_like = st.dictionaries(st.sampled_from(["v", "id", "job", "budget", "priority", "deadline", "idem"]),
                                  st.one_of(st.none(), st.integers(-2**63, 2**63 - 1), st.text(max_size=5),
                                            st.floats(allow_nan=True), st.lists(st.integers(-9, 9), max_size=3),
                                            st.dictionaries(st.text(max_size=3), st.integers(-2**31, 2**31), max_size=2)),
                                  max_size=6).map(lambda d: msgpack.packb(d))
    return st.one_of(deep, huge_len, header_like, st.binary(max_size=64))


frame = st.one_of(st.binary(max_size=32), st.sampled_from([b"", P.MDPC, P.MDPW, b"echo", b"mmi.stats",
                                                           b"mmi.service", b"mmi.gate.reserve"] + CMDS),
                  hostile_msgpack())
message = st.lists(frame, min_size=0, max_size=10)


# The fuzz names ``echo`` (its requests reach a real worker); the kernel's health is checked on
# ``probe``, a second echo service the fuzz never names.  Without it the check was a matter of luck:
# a fuzzed ``[MDPW, READY, "echo"]`` legitimately registers its sender as an echo worker (no
# authentication in this config), and the check's call, given to that silent "worker", failed with
# ``worker_died`` (a valid answer, not a stall).
PROBE = "probe"


@pytest.fixture(scope="module")
def kern():
    services = service_block("echo", "services.echo") + service_block(PROBE, "services.echo", args=["--name", PROBE])
    k = KernelProcess(services, heartbeat=0.3, liveness=5)
    try:
        with Client(k.endpoint, timeout=30, retries=0) as c:
            for name in ("echo", PROBE):
                c.wait_for_service(name, 60)  # "ready" means started, not yet registered
        yield k
    finally:
        k.stop()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(st.tuples(st.booleans(), message), min_size=1, max_size=8))
@example(batch=[(False, [P.MDPW, P.WorkerCmd.READY.value, b"echo"])])  # a peer posing as an echo worker
def test_random_messages_never_crash_or_stall_the_kernel(kern, batch):
    ctx = zmq.Context.instance()
    socks = []
    try:
        for as_empty_prefix, frames in batch:
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(kern.endpoint)
            socks.append(s)
            if as_empty_prefix:
                frames = [b""] + frames
            if frames:
                s.send_multipart(frames)
        with Client(kern.endpoint, timeout=30, retries=0) as c:  # a bound, not a speed check
            assert c.call(PROBE, {"ok": 1}) == {"ok": 1}
        assert kern.proc.poll() is None
    finally:
        for s in socks:
            s.close(0)


def test_oversized_message_drops_only_its_sender(kern):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(kern.endpoint)
    try:
        s.send_multipart([P.MDPC, P.ClientCmd.REQUEST.value, b"echo", b"x" * (P.MAX_MESSAGE_SIZE + 1)])
        with Client(kern.endpoint, timeout=30, retries=0) as c:
            assert c.call(PROBE, "after") == "after"
            assert c.stats()["counters"].get("internal_errors", 0) == 0
    finally:
        s.close(0)
