"""The async client and the async gate on anyio: the same tests under asyncio and under trio
(anyio's pytest plugin), against a real ``python -m kernel``."""

from __future__ import annotations

import anyio
import pytest

from clients import AsyncClient
from clients.core import ConnectError
from kernel import errors
from kernel import protocol as P
from kernel.gate import AsyncKernelGate
from tests.support import kernel_fixture, service_block, short_tmpdir

pytestmark = [pytest.mark.system, pytest.mark.anyio]

kern = kernel_fixture(service_block("echo", "services.echo", replicas=2))


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


async def test_calls_stream_and_run_concurrently_from_many_tasks(kern, anyio_backend):
    async with AsyncClient(kern.endpoint, timeout=30, retries=0) as client:
        await client.wait_for_service("echo", 30)
        seen = []
        assert await client.call("echo", {"partials": 3}, on_partial=lambda r: seen.append(r.payload)) == {
            "partials": 3
        }
        assert seen == [{"i": 0}, {"i": 1}, {"i": 2}]
        results: dict[int, object] = {}

        async def one(i: int) -> None:
            results[i] = await client.call("echo", {"n": i})

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(one, i)
        assert results == {i: {"n": i} for i in range(50)}
        with pytest.raises(errors.ServiceError):
            await client.call("echo", {"fail": "no"})


async def test_the_reader_is_owned_by_the_async_with_block(kern, anyio_backend):
    async with AsyncClient(kern.endpoint, timeout=30, retries=0) as client:
        assert await client.call("echo", 1) == 1
        assert client._tasks is not None
    assert client._tasks is None and client._sock.closed
    with pytest.raises(errors.BadRequest, match="closed"):
        await client.call("echo", 2)


async def test_silence_is_a_timeout_bounded_by_anyio(kern, anyio_backend):
    async with AsyncClient(kern.endpoint, timeout=30, retries=0) as client:
        await client.wait_for_service("echo", 30)
        with pytest.raises(errors.Timeout, match="went silent"):
            # one partial, then 6 s of steps without a reply: silence longer than the 2 s bound; the
            # bound leaves a loaded machine room to deliver the first partial (before it a silence
            # is a retry, "no reply after", not "went silent")
            await client.call("echo", {"partials": 1, "steps": 600, "step_ms": 10}, timeout=2.0)


async def test_first_contact_fails_at_once(anyio_backend):
    d = short_tmpdir()
    async with AsyncClient(f"ipc://{d}/kernel.sock", timeout=600) as client:
        with pytest.raises(ConnectError, match="does not exist"):
            await client.stats()
    async with AsyncClient("tcp://127.0.0.1:1", timeout=600) as client:
        with pytest.raises(ConnectError, match="nothing is listening at tcp://127.0.0.1:1"):
            await client.stats()


async def test_the_async_gate_reserves_commits_and_renews(kern, anyio_backend):
    job = f"gate-{anyio_backend}"
    async with AsyncClient(kern.endpoint, timeout=30, retries=0) as client:
        await client.open_job(job, {"units": 5})
        gate = AsyncKernelGate(client, job, hold=True, lease_s=60)
        assert await gate.reserve("units", 2, "a") and await gate.reserve("units", 2, "b")
        assert not await gate.reserve("units", 2, "c") and gate.refusals == 1
        assert await gate.renew() == 2
        await client.call(P.MMI_GATE_RELEASE, {"reservation": gate.held["b"].reservation})  # lost behind its back
        assert await gate.renew() == 1 and gate.retaken == 1
        await gate.commit("a")
        await gate.release("units", key="b")
        stats = await client.call(P.MMI_JOB_STATS, {"job": job})
        assert stats["spent"]["units"] == 2 and stats["remaining"]["units"] == 3
        spend = AsyncKernelGate(client, job)
        assert await spend.reserve_up_to("units", 10) == 3
        await client.close_job(job)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_without_async_with_under_asyncio_the_reader_starts_and_close_ends_it(kern, anyio_backend):
    import asyncio

    client = AsyncClient(kern.endpoint, timeout=30, retries=0)
    try:
        assert await client.call("echo", "x") == "x"
        tasks = client._legacy
        assert tasks and not any(t.done() for t in tasks[:1])
    finally:
        await client.close()
    assert all(t.done() for t in tasks)
    await asyncio.sleep(0)


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_without_async_with_under_trio_is_a_clear_error(kern, anyio_backend):
    client = AsyncClient(kern.endpoint, timeout=30, retries=0)
    try:
        with pytest.raises(RuntimeError, match="async with AsyncClient"):
            await client.call("echo", 1)
    finally:
        await client.close()


@pytest.fixture(scope="module")
def curve_kernel():
    import os

    from kernel import keys
    from tests.support import KernelProcess

    tmp = short_tmpdir()
    kd = os.path.join(tmp, "keys")
    _, alice = keys.new(kd, "alice", "client")
    _, mallory = keys.new(os.path.join(tmp, "other"), "mallory", "client")
    k = KernelProcess.from_config(
        f'[kernel]\nendpoint = "tcp://127.0.0.1:0"\nheartbeat_s = 0.2\n\n[auth]\nkeys = "{kd}"\n'
    )
    try:
        yield k, alice, mallory, os.path.join(kd, "kernel.key"), os.path.join(tmp, "other", "kernel.key")
    finally:
        k.stop()


async def test_curve_failures_name_the_certificate(curve_kernel, anyio_backend):
    k, alice, mallory, right, wrong = curve_kernel
    async with AsyncClient(k.endpoint, timeout=600, cert=alice, server_cert=right) as client:
        assert "services" in await client.stats()
    async with AsyncClient(k.endpoint, timeout=600, cert=mallory, server_cert=right) as client:
        with pytest.raises(ConnectError, match=f"refused this client's key .RECA_CERT={mallory}"):
            await client.stats()
    async with AsyncClient(k.endpoint, timeout=600, cert=alice, server_cert=wrong) as client:
        with pytest.raises(ConnectError, match=f"RECA_SERVER_CERT={wrong} is not this kernel's public key"):
            await client.stats()


async def test_wait_for_service_waits_for_a_kernel_still_starting(anyio_backend):
    """First contact fails fast per call, but not for good: a client made before its kernel
    starts reaches it once it is there (wait_for_service retries through ConnectError)."""
    from clients.launch import LocalKernel, kernel_config, service_block as block

    rundir = short_tmpdir()
    box: dict = {}
    async with AsyncClient(f"ipc://{rundir}/kernel.sock", timeout=10, retries=0) as client:
        with pytest.raises(ConnectError):
            await client.stats()  # no kernel yet

        def start() -> None:
            box["k"] = LocalKernel(kernel_config(block("echo", "services.echo")), runtime_dir=rundir)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.wait_for_service, "echo", 120)
                await anyio.to_thread.run_sync(start)
            assert await client.call("echo", "up") == "up"
        finally:
            if "k" in box:
                box["k"].stop()
