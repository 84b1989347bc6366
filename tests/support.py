"""Test support: a real ``python -m kernel`` (:class:`clients.launch.LocalKernel`) with short
heartbeats, whose ``stop`` also asserts that nothing the kernel started is left behind.

Every wait is bounded (the launcher's start and stop bounds).
"""

from __future__ import annotations

import signal
import time
from typing import Any, Iterable

import pytest
import zmq

from clients import Client
from clients.launch import REPO, LocalKernel, kernel_config, service_block, short_tmpdir
from kernel import codec
from kernel import protocol as P

__all__ = ["REPO", "KernelProcess", "Wire", "client_fixture", "kernel_fixture", "service_block", "short_tmpdir",
           "wait_restarted"]


class Wire:
    """The ``send`` of an in-process :class:`kernel.router.Router`: keeps every message it sends."""

    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []

    def __call__(self, frames: list[bytes]) -> bool:
        self.sent.append(list(frames))
        return True

    def to(self, identity: bytes, cmd: bytes) -> list[dict]:
        """The status maps of the ``cmd`` messages sent to ``identity``."""
        return [codec.unpack(m[4]) for m in self.sent if m[0] == identity and m[2] == cmd]

    def finals(self) -> list[dict]:
        """The status maps of every FINAL sent to a client, in order."""
        return [codec.unpack(m[4]) for m in self.sent if m[1] == P.MDPC and m[2] == P.ClientCmd.FINAL.value]


def wait_restarted(c: Client, name: str, first: int | None, bound: float = 60.0) -> bool:
    """Whether supervised child ``name``, whose process was ``first``, runs again as another
    process (restarted at least once) within ``bound`` seconds."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        ch = next(ch for ch in c.stats()["children"] if ch["name"] == name)
        if ch["pid"] not in (None, first) and ch["state"] == "running" and ch["restarts"] >= 1:
            return True
        time.sleep(0.1)
    return False


class KernelProcess(LocalKernel):
    """``python -m kernel`` in a fresh runtime directory, configured by :func:`kernel_config`.

    The defaults keep a busy machine from deciding a test: a worker is dropped only after 2 s of
    silence (10 x 0.2 s heartbeats; a loaded CPU or a worker's bounded SymPy step can stall
    0.6 s), and a request waits 5 s for a (re)starting worker before ``unavailable``."""

    def __init__(self, services: str = "", *, heartbeat: float = 0.2, liveness: int = 10,
                 unavailable_wait: float = 5.0, intensity: int = 5, period: float = 10.0,
                 endpoint: str | None = None, extra_args: Iterable[str] = (),
                 kernel_extra: dict | None = None, runtime_dir: str | None = None) -> None:
        super().__init__(kernel_config(services, heartbeat=heartbeat, liveness=liveness,
                                       unavailable_wait=unavailable_wait, intensity=intensity, period=period,
                                       endpoint=endpoint, kernel_extra=kernel_extra),
                         extra_args=extra_args, runtime_dir=runtime_dir)

    @classmethod
    def from_config(cls, config: str, *, extra_args: Iterable[str] = ()) -> "KernelProcess":
        """``python -m kernel`` on the whole TOML ``config``."""
        obj = cls.__new__(cls)
        LocalKernel.__init__(obj, config, extra_args=extra_args)
        return obj

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:  # type: ignore[override]
        """Stop the kernel; returns its exit status and asserts it stopped within the bound and
        that nothing it started survived."""
        rc, alive = super().stop(sig, timeout)
        assert rc != -signal.SIGKILL or sig == signal.SIGKILL, "kernel did not stop within the shutdown bound"
        assert not alive, f"processes left behind: {[p.pid for p in alive]}"
        return rc


def kernel_fixture(services: str, **kwargs: Any) -> Any:
    """A module-scoped ``kern`` fixture: one :class:`KernelProcess` on ``services`` (keyword
    arguments as :class:`KernelProcess`), stopped and checked after the module."""

    @pytest.fixture(scope="module")
    def kern():
        k = KernelProcess(services, **kwargs)
        try:
            yield k
        finally:
            k.stop()

    return kern


def client_fixture(*wait_for: str, timeout: float = 60.0, wait_s: float = 30.0) -> Any:
    """A ``client`` fixture: a :class:`clients.Client` of ``kern`` (no retries, bounded by
    ``timeout``) once each service in ``wait_for`` has a worker (bounded by ``wait_s``)."""

    @pytest.fixture
    def client(kern):
        c = Client(kern.endpoint, timeout=timeout, retries=0, context=zmq.Context.instance())
        for name in wait_for:
            c.wait_for_service(name, wait_s)
        yield c
        c.close()

    return client
