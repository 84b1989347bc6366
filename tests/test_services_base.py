"""The service runtime's shell (services/base.py) against a fake kernel: a ROUTER and a control
PUB driven by the test, the runtime in the test's own event loop.

These pin what the callback-driven shell must keep: no lost wake-up (a reply sent while input is
waiting consumes the descriptor's edge), heartbeats and reconnects, control messages reaching a
handler's safe point, stop(), and an error raised in a turn ending run().  Waits are bounded (a
stall fails the test), never timed."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import pytest
import zmq

from kernel import codec
from kernel import protocol as P
from services.base import Context, Service, WorkerRuntime

W = P.WorkerCmd
STALL_S = 20.0  # generous: a loaded machine must not fail these


class Echo(Service):
    name = "echo"
    capacity = 64

    def __init__(self) -> None:
        self.control: list[tuple[str, dict]] = []
        self.fail_on_control = False
        self.gate = asyncio.Event()
        self.before_reply: Callable[[], None] = lambda: None

    async def handle(self, ctx: Context, payload: Any) -> Any:
        if isinstance(payload, dict) and payload.get("gate"):
            await self.gate.wait()
            self.before_reply()
            # compute past libzmq's command throttle (max_command_delay, ~1 ms): the reply's send
            # then processes the socket's pending commands, consuming the edge of what arrived
            end = time.monotonic() + 0.01
            while time.monotonic() < end:
                pass
            return payload
        if isinstance(payload, dict) and payload.get("spin"):
            while True:  # until a control message cancels it at a safe point
                await ctx.checkpoint()
                await asyncio.sleep(0.001)
        if isinstance(payload, dict) and payload.get("yield"):
            await asyncio.sleep(0)  # the reply leaves on a later loop turn than the request
        return payload

    def on_control(self, op: str, message: dict) -> None:
        self.control.append((op, message))
        if self.fail_on_control:
            raise RuntimeError("service bug in on_control")


class FakeKernel:
    def __init__(self, ctx: zmq.Context, tmp_path) -> None:
        self.endpoint = f"ipc://{tmp_path}/k.sock"
        self.control = f"ipc://{tmp_path}/c.sock"
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.SNDHWM, 0)
        self.router.setsockopt(zmq.RCVHWM, 0)
        self.router.bind(self.endpoint)
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(self.control)

    def close(self) -> None:
        self.router.close(0)
        self.pub.close(0)

    async def recv(self, cmd: bytes | None = None) -> list[bytes]:
        """The next message from a worker ([identity, MDPW, cmd, ...]); with ``cmd``, the next of
        that command (others skipped)."""
        deadline = time.monotonic() + STALL_S
        while time.monotonic() < deadline:
            if self.router.poll(0):
                frames = self.router.recv_multipart()
                assert frames[1] == P.MDPW
                if cmd is None or frames[2] == cmd:
                    return frames
                continue
            await asyncio.sleep(0.001)
        raise AssertionError(f"no {cmd!r} from the worker")

    def request(self, identity: bytes, token: bytes, payload: Any, rid: int = 1) -> None:
        header = codec.pack({P.H_VERSION: P.VERSION, P.H_ID: rid})
        self.router.send_multipart([identity, P.MDPW, W.REQUEST.value, token, b"", header, codec.pack(payload)])


@pytest.fixture
def kernel(zctx, tmp_path):
    k = FakeKernel(zctx, tmp_path)
    yield k
    k.close()


def runtime_for(kernel: FakeKernel, zctx, service: Service | None = None, **kw: Any) -> WorkerRuntime:
    return WorkerRuntime(service or Echo(), kernel.endpoint, kernel.control, context=zctx, **kw)


async def finish(rt: WorkerRuntime, task: asyncio.Task) -> None:
    rt.stop()
    await asyncio.wait_for(task, STALL_S)


async def test_pipelined_requests_are_all_answered(kernel, zctx):
    """Replies are sent while requests wait on the socket (the send may consume the descriptor's
    edge): every request is still answered, with a window of 64 in flight."""
    rt = runtime_for(kernel, zctx)
    task = asyncio.create_task(rt.run())
    ready = await kernel.recv(W.READY.value)
    who = ready[0]
    n, window, sent, answered = 3000, 64, 0, set()
    while len(answered) < n:
        while sent < n and sent - len(answered) < window:
            kernel.request(who, b"t%d" % sent, {"i": sent, "yield": sent % 3 == 0}, rid=sent)
            sent += 1
        frames = await kernel.recv()
        if frames[2] == W.FINAL.value:
            assert codec.unpack(frames[6]) == {"i": int(frames[3][1:]), "yield": int(frames[3][1:]) % 3 == 0}
            answered.add(frames[3])
    assert len(answered) == n and not rt.active
    assert rt.registered.is_set()
    await finish(rt, task)


async def test_input_whose_edge_a_reply_consumed_is_not_lost(kernel, zctx):
    """A request arrives after the loop last polled the descriptor and before a handler's reply
    is sent; the send consumes the descriptor's edge (libzmq processes its pending commands).
    The shell looks at ZMQ_EVENTS after the send and takes a turn for it.  (Heartbeats are 100 s
    apart here: no timer turn rescues a request the shell missed.)"""
    service = Echo()
    rt = runtime_for(kernel, zctx, service, heartbeat=100.0)
    task = asyncio.create_task(rt.run())
    who = (await kernel.recv(W.READY.value))[0]
    kernel.request(who, b"A", {"gate": True})
    deadline = time.monotonic() + STALL_S
    while not rt.active:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.01)  # the handler waits at its gate; the socket is drained
    service.before_reply = lambda: kernel.request(who, b"B", {"x": 1})
    service.gate.set()
    finals = {(await kernel.recv(W.FINAL.value))[3] for _ in range(2)}
    assert finals == {b"A", b"B"}
    await finish(rt, task)


async def test_heartbeats_then_reconnect_when_the_kernel_is_silent(kernel, zctx):
    rt = runtime_for(kernel, zctx, heartbeat=0.02, liveness=3)
    task = asyncio.create_task(rt.run())
    first = await kernel.recv(W.READY.value)
    await kernel.recv(W.HEARTBEAT.value)  # idle: the session's timer fires the heartbeat
    again = await kernel.recv(W.READY.value)  # silent past the liveness window: a fresh socket
    assert again[0] != first[0] and rt.session.connects >= 2
    # the new link works: a request on it is answered
    kernel.request(again[0], b"t1", {"x": 1})
    final = await kernel.recv(W.FINAL.value)
    assert final[0] == again[0] and codec.unpack(final[6]) == {"x": 1}
    await finish(rt, task)


async def test_control_cancel_reaches_the_handlers_safe_point(kernel, zctx):
    service = Echo()
    rt = runtime_for(kernel, zctx, service)
    task = asyncio.create_task(rt.run())
    who = (await kernel.recv(W.READY.value))[0]
    kernel.request(who, b"spin", {"spin": True})
    topic = P.control_topic("echo", P.ControlOp.CANCEL)
    deadline = time.monotonic() + STALL_S
    while True:  # the SUB socket may join late: publish until the handler stops
        assert time.monotonic() < deadline, "the cancel never reached the handler"
        kernel.pub.send_multipart([topic, codec.pack({P.C_TOKEN: b"spin", P.C_REASON: "test"})])
        await asyncio.sleep(0.01)
        if kernel.router.poll(0):
            frames = kernel.router.recv_multipart()
            if frames[2] == W.FINAL.value:
                break
    status = codec.unpack(frames[5])
    assert frames[3] == b"spin" and status[P.S_STATUS] == P.STATUS_ERROR
    assert status[P.S_ERROR]["code"] == P.ErrorCode.CANCELLED
    assert service.control and service.control[0][0] == "cancel"
    await finish(rt, task)


async def test_stop_says_disconnect_and_cancels_handlers(kernel, zctx):
    rt = runtime_for(kernel, zctx)
    task = asyncio.create_task(rt.run())
    who = (await kernel.recv(W.READY.value))[0]
    kernel.request(who, b"spin", {"spin": True})
    deadline = time.monotonic() + STALL_S
    while not rt.active:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.001)
    handler = rt.active[b"spin"].task
    rt.stop()
    assert (await kernel.recv())[2] == W.DISCONNECT.value  # and no FINAL before it
    await asyncio.wait_for(task, STALL_S)
    assert handler is not None and handler.cancelled() and not rt.active
    assert not kernel.router.poll(50)  # nothing after the DISCONNECT


async def test_an_error_raised_in_a_turn_ends_run(kernel, zctx):
    """A bug the shell meets while feeding the session (here the service's control hook) is not
    swallowed by the event loop: run() raises it, as before callbacks drove the input."""
    service = Echo()
    service.fail_on_control = True
    rt = runtime_for(kernel, zctx, service)
    task = asyncio.create_task(rt.run())
    await kernel.recv(W.READY.value)
    topic = P.control_topic("echo", P.ControlOp.RESUME)
    deadline = time.monotonic() + STALL_S
    while not task.done():
        assert time.monotonic() < deadline, "the control message never reached the runtime"
        kernel.pub.send_multipart([topic, codec.pack({"all": True})])
        await asyncio.sleep(0.01)
    with pytest.raises(RuntimeError, match="service bug"):
        task.result()
    assert rt.sock is None and rt.sub is None  # run() closed what it owned


def test_context_granted_is_the_handlers_own_copy():
    from kernel.worker import RequestState

    granted = {"tokens": 5.0}
    state = RequestState(b"t", {P.H_VERSION: P.VERSION, P.H_GRANTED: granted})
    rt = WorkerRuntime(Echo(), "ipc:///nonexistent", None, context=zmq.Context.instance())
    ctx = Context(rt, state)
    assert ctx.granted == granted and ctx.granted is not granted
    ctx.granted["tokens"] = 1.0
    assert granted == {"tokens": 5.0} and ctx.granted == {"tokens": 1.0}
    budget = RequestState(b"u", {P.H_VERSION: P.VERSION, P.H_BUDGET: {"flops": 2.0}})
    assert Context(rt, budget).granted == {"flops": 2.0}
    assert Context(rt, RequestState(b"v", None)).granted == {}
