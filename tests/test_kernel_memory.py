"""Memory returned after a flood (issue 24): 1,000 requests of 1 MiB each leave the kernel's
resident set where it was (glibc's mmap threshold fixed by kernel.peers.bound_allocator), instead
of holding hundreds of MB for the rest of its life."""

from __future__ import annotations

import psutil
import pytest
import zmq

from kernel import protocol as P
from tests.support import KernelProcess, kernel_config

pytestmark = pytest.mark.system

ROOMY_LIMITS = """
[limits]
root = { wall_ms = 1e13, cpu_ms = 1e13, tokens = 1e13, flops = 1e18, vm_steps = 1e13 }
default = { wall_ms = 1e12, cpu_ms = 1e12, tokens = 1e12, flops = 1e17, vm_steps = 1e12 }
"""


def test_the_kernel_gives_back_what_a_flood_of_large_frames_took():
    # 500 x 1 MiB sent at once per connection is past the default inbound budget (peer_in_bytes)
    # whenever the kernel lags (two CPU burners): it would drop the connection, which
    # tests/test_kernel_peer_drop.py covers; this test is about memory given back after answers
    config = kernel_config("", heartbeat=0.5, unavailable_wait=0.05,
                           kernel_extra={"peer_in_bytes": 1 << 30, "peers_in_bytes": 1 << 31}) + ROOMY_LIMITS
    with KernelProcess.from_config(config) as k:
        proc = psutil.Process(k.pid)
        ctx = zmq.Context()
        try:
            socks = [ctx.socket(zmq.DEALER) for _ in range(2)]
            for s in socks:
                s.setsockopt(zmq.LINGER, 0)
                s.connect(k.endpoint)
            # Warm up: the first requests allocate what the kernel keeps anyway.
            for s in socks:
                s.send_multipart([P.MDPC, P.ClientCmd.REQUEST.value, b"nosuch", b"w" * 1024])
                assert s.poll(10_000)
                s.recv_multipart()
            before = proc.memory_info().rss
            frame = b"m" * (1 << 20)
            for n in range(500):
                for s in socks:
                    s.send_multipart([P.MDPC, P.ClientCmd.REQUEST.value, f"nosuch{n % 7}".encode(), frame])
            answered = 0
            poller = zmq.Poller()
            for s in socks:
                poller.register(s, zmq.POLLIN)
            while answered < 1000:
                ready = dict(poller.poll(30_000))
                assert ready, f"only {answered} of 1,000 requests answered within the bound"
                for s in ready:
                    s.recv_multipart()
                    answered += 1
            after = proc.memory_info().rss
            assert after - before < 100e6, f"kernel RSS {before / 1e6:.0f} MB -> {after / 1e6:.0f} MB"
            assert k.proc.poll() is None
        finally:
            ctx.destroy(linger=0)
